"""`slmforge` command line: a thin table of verbs. Heavy imports happen inside the verbs, so that
`slmforge --help` answers instantly (no torch, no transformers)."""

from __future__ import annotations

import argparse
import sys

from slmforge import __version__
from slmforge.stages import STAGES

STAGE_HELP = {
    "ingest": "read files/folders/globs into Document shards (Parquet)",
    "curate": "quality filters, dedup, PII redaction, train/val/test split (datatrove)",
    "tokenizer": "train a byte-level BPE on the train split and compare it with a general one",
    "plan": "what model should I train? (also without a recipe: slmforge plan --hours 24 --device h100 ...)",
    "pretrain": "train the specialist and a same-size generalist baseline",
    "compress": "prune the teacher (a DAPT specialist or a base) to a smaller student with domain importance, then "
                "distil it on the teacher's logits (and compare with LM-only and scratch students)",
    "synth": "synthetic QA/MCQ/completion/summary/instruction/rationale or evidence/preference/reading data from "
             "the train split",
    "sft": "fine-tune the specialist on the synth data (trl SFTTrainer), plain and with rationale distillation",
    "dpo": "preference-optimise the SFT model on the synth pairs (trl DPOTrainer)",
    "bench": "domain benchmarks (mcq, completion, qa, summarization) from the test split, as lm-eval tasks",
    "evaluate": "every model on the benchmarks (lm-eval), bits-per-byte on each test split, the quality gate",
    "report": "one HTML page and a Markdown summary of the run: data, tokenizer, models, scores, charts",
    "export": "Hugging Face folders with model cards, GGUF files and Ollama Modelfiles; adds them to the catalog",
}


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set tokenizer.vocab_size=4096 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slmforge",
        description="Turn a domain corpus into a measured, deployable specialized small language model.",
        epilog="Pipeline: " + " -> ".join(STAGES) + ". Start with `slmforge init my-domain/`.",
    )
    parser.add_argument("--version", action="version", version=f"slmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("init", help="write a commented recipe for your own corpus into DIR")
    p.add_argument("dir", help="folder for the recipe (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite an existing recipe.yaml")

    p = sub.add_parser("run", help="run every stage the recipe names, in order (cached stages are skipped)")
    p.add_argument("recipe")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--force", metavar="STAGE", action="append", default=[], help="re-run this stage even if cached")
    _add_set(p)

    p = sub.add_parser("status", help="list each stage as done (key, wall time), incomplete, or not run")
    p.add_argument("recipe")
    _add_set(p)

    p = sub.add_parser("chat", help="talk to a model folder: greedy or sampled completions")
    p.add_argument("model", help="a model folder, e.g. runs/demo/pretrain/<key>/specialist")
    p.add_argument("--prompt", help="complete this text and exit (else read prompts from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)

    # Verbs with their own argument parsers (main() hands them the rest of the command line).
    sub.add_parser("models", help="the catalog of exported specialists: list, show, add, rm (see `slmforge models -h`)",
                   add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible server for catalog models, with a router (`slmforge serve -h`)",
                   add_help=False)
    sub.add_parser("base", help="pretrained bases to compare with and adapt: add NAME PATH (HF folder or .gguf), "
                   "list (`slmforge base -h`)", add_help=False)

    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run one stage: {STAGE_HELP.get(stage, stage)}")
        p.add_argument("--recipe", required=stage != "plan", help="the recipe YAML")
        p.add_argument("--force", action="store_true", help="re-run even if cached")
        _add_set(p)
    return parser


def _init(directory: str, force: bool) -> None:
    from importlib.resources import files
    from pathlib import Path

    from slmforge.console import info
    from slmforge.errors import UserError

    d = Path(directory)
    target = d / "recipe.yaml"
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to overwrite it, or choose another folder")
    d.mkdir(parents=True, exist_ok=True)
    (d / "data").mkdir(exist_ok=True)
    text = files("slmforge").joinpath("templates/recipe.yaml").read_text(encoding="utf-8")
    text = text.replace("__NAME__", d.resolve().name.lower().replace(" ", "-") or "my-domain")
    tmp = target.with_name(".recipe.yaml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    info(f"wrote {target}\nnext: put your documents in {d / 'data'}/ (txt, md, rst, html, jsonl, parquet, pdf), "
         f"then `slmforge run {target}`")


def _chat(args) -> None:
    import torch

    from slmforge.lm import generate
    from slmforge.modeling import load_model

    model, tok = load_model(args.model)
    model.eval()
    prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    if args.prompt is None and sys.stdin.isatty():
        print("type a prompt and press Enter (Ctrl-D to quit)", file=sys.stderr)
    for prompt in prompts:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample \
            else {"do_sample": False}
        text = generate(model, tok, [{"role": "user", "content": prompt}] if args.chat else prompt,
                        args.max_new_tokens, **sampling)
        print(prompt + text, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"] and "--recipe" not in argv and not {"-h", "--help"} & set(argv):
        from slmforge.stages.plan import cli_main

        return cli_main(argv[1:])
    if argv[:1] == ["models"]:
        from slmforge.catalog import cli_main

        return cli_main(argv[1:])
    if argv[:1] == ["base"]:
        from slmforge.bases import cli_main

        return cli_main(argv[1:])
    if argv[:1] == ["serve"]:
        from slmforge.serve.cli import cli_main

        return cli_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 0
    from slmforge.errors import UserError

    try:
        if args.verb == "init":
            _init(args.dir, args.force)
            return 0
        if args.verb == "chat":
            _chat(args)
            return 0
        from slmforge.config import load_recipe
        from slmforge.pipeline import print_status, run_recipe

        if args.verb == "status":
            print_status(load_recipe(args.recipe, args.overrides))
        elif args.verb == "run":
            run_recipe(load_recipe(args.recipe, args.overrides), until=args.until, force=tuple(args.force))
        else:
            recipe = load_recipe(args.recipe, args.overrides, default_section=args.verb)
            run_recipe(recipe, only=args.verb, force=(args.verb,) if args.force else ())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
