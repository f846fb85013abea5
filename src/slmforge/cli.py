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


FORCE_HELP = "re-run this stage even if it is cached (the stages it needs are reused when cached)"


def _add_set(p) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set tokenizer.vocab_size=4096 (repeatable)")


def _add_recipe(p, what: str = "the recipe YAML") -> None:
    """RECIPE as a positional argument or as --recipe RECIPE: every verb that reads a recipe takes both."""
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help=f"{what} (or --recipe RECIPE)")
    p.add_argument("--recipe", dest="recipe_flag", metavar="RECIPE", help="the same as the RECIPE argument")


def _add_stage(p) -> None:
    _add_recipe(p)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    _add_set(p)


def recipe_arg(args, verb: str, required: bool = True) -> str | None:
    """The recipe given as RECIPE or --recipe RECIPE; a UserError if both name different files, or if
    neither is given where `required`."""
    from pathlib import Path

    from slmforge.errors import UserError

    pos, flag = getattr(args, "recipe", None), getattr(args, "recipe_flag", None)
    if pos is not None and flag is not None and Path(pos).resolve() != Path(flag).resolve():
        raise UserError(f"two recipes given: RECIPE {pos} and --recipe {flag}; give one")
    recipe = pos if pos is not None else flag
    if recipe is None and required:
        raise UserError(f"`slmforge {verb}` needs a recipe: slmforge {verb} RECIPE (or --recipe RECIPE)")
    return recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slmforge",
        description="Turn a domain corpus into a measured, deployable specialized small language model.",
        epilog="Pipeline: " + " -> ".join(STAGES) + ". Start with `slmforge init my-domain/`. Every verb that "
               "reads a recipe takes it as RECIPE or --recipe RECIPE; --force re-runs what the verb runs.",
    )
    parser.add_argument("--version", action="version", version=f"slmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("init", help="write a commented recipe for your own corpus into DIR")
    p.add_argument("dir", help="folder for the recipe (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite an existing recipe.yaml")

    p = sub.add_parser("run", help="run every stage the recipe names, in order (cached stages are skipped)",
                       epilog="`--force` re-runs every stage this command runs; `--force-stage STAGE` only that "
                              "one (the old `run RECIPE --force STAGE` still means --force-stage STAGE).")
    _add_recipe(p)
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--force", action="store_true", help="re-run every stage it runs (up to --until), even if cached")
    p.add_argument("--force-stage", metavar="STAGE", action="append", default=[],
                   help="re-run this one stage even if cached (repeatable)")
    _add_set(p)

    p = sub.add_parser("status", help="list each stage as done (key, wall time), incomplete, or not run")
    _add_recipe(p)
    _add_set(p)

    p = sub.add_parser("path", help="print the folder of a stage's latest completed run (<workdir>/<stage>/latest)",
                       epilog="example: ls $(slmforge path export recipes/demo.yaml)")
    p.add_argument("stage", metavar="STAGE", choices=STAGES, help="one of: " + ", ".join(STAGES))
    _add_recipe(p, "the recipe YAML, or its workdir folder")
    p.add_argument("--workdir", metavar="DIR", help="the workdir to look in, instead of a recipe's")
    _add_set(p)

    p = sub.add_parser("chat", help="talk to a model folder: greedy or sampled completions")
    p.add_argument("model", help="a model folder, e.g. runs/demo/pretrain/<key>/specialist")
    p.add_argument("--prompt", help="complete this text and exit (else read prompts from stdin, one per line)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("llama-server", help="serve an exported GGUF with llama.cpp's OpenAI-compatible server "
                       "(the fastest CPU decoding; an endpoint for serve.fallback)")
    p.add_argument("gguf", help="a .gguf file (export writes one per model folder)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--context", type=int, default=None, help="tokens per request (default: the model's)")
    p.add_argument("--parallel", type=int, default=4, help="requests decoded together (continuous batching)")
    p.add_argument("--alias", default=None, help="the model name clients send (default: the file's stem)")
    p.add_argument("--threads", type=int, default=None)

    # Verbs with their own argument parsers (main() hands them the rest of the command line).
    sub.add_parser("models", help="the catalog of exported specialists: list, show, add, rm (see `slmforge models -h`)",
                   add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible server for catalog models, with a router (`slmforge serve -h`)",
                   add_help=False)
    sub.add_parser("base", help="pretrained bases to compare with and adapt: add NAME PATH (HF folder or .gguf), "
                   "list (`slmforge base -h`)", add_help=False)

    for stage in STAGES:
        if stage == "plan":  # its own parser (plan_parser), which loads the no-recipe flags
            sub.add_parser(stage, help=f"run one stage: {STAGE_HELP[stage]}", add_help=False)
            continue
        p = sub.add_parser(stage, help=f"run one stage: {STAGE_HELP.get(stage, stage)}")
        _add_stage(p)
    return parser


def plan_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """`slmforge plan`: the stage's arguments (a recipe) and the no-recipe flags, in one --help."""
    from slmforge.flags import add_flags
    from slmforge.stages.plan import CliConfig

    p = argparse.ArgumentParser(
        prog="slmforge plan",
        description="What model should I train? Chinchilla-optimal size, corrected for repeated domain data "
                    "(Muennighoff et al. 2023) and for inference cost (Sardana et al. 2023). With a recipe it "
                    "runs the plan stage on the recipe's tokenized data; without one, the budget and the domain "
                    "data size come from the flags.",
        epilog="examples: slmforge plan my-domain/recipe.yaml --hours 24 ; "
               "slmforge plan --hours 168 --device rtx4090 --domain-tokens 1e9",
    )
    _add_stage(p)
    g = p.add_argument_group("budget", "with a recipe they override its plan: section (as --set plan.KEY=VALUE "
                                       "would); without one they are the whole question, --domain-tokens included")
    flags = add_flags(g, CliConfig)
    g.add_argument("--json", action="store_true", help="without a recipe: print the recommendation as JSON")
    return p, flags


def _plan(argv: list[str]) -> int:
    from slmforge.errors import UserError

    p, flags = plan_parser()
    args = p.parse_args(argv)
    recipe = recipe_arg(args, "plan", required=False)
    given = {dest: getattr(args, dest) for dest in flags if getattr(args, dest) is not None}
    if recipe is None:
        if args.force or args.overrides:
            raise UserError("--force and --set need a recipe: slmforge plan RECIPE --force")
        from slmforge.stages.plan import cli_main

        return cli_main(argv)
    if args.json:
        raise UserError("--json is for `slmforge plan` without a recipe; with one, the plan stage writes "
                        "plan.json in its folder (`slmforge path plan RECIPE`)")
    if "domain_tokens" in given:
        raise UserError("--domain-tokens is for `slmforge plan` without a recipe; with one, the plan stage counts "
                        "the recipe's tokenized domain data")
    overrides = [f"plan.{flags[d]}={v}" for d, v in given.items()] + args.overrides
    return _run_stage("plan", recipe, overrides, args.force)


def _run_stage(stage: str, recipe_path: str, overrides: list[str], force: bool) -> int:
    from slmforge.config import load_recipe
    from slmforge.pipeline import run_recipe

    recipe = load_recipe(recipe_path, overrides, default_section=stage)
    run_recipe(recipe, only=stage, force=(stage,) if force else ())
    return 0


def _old_force(argv: list[str]) -> list[str]:
    """`run RECIPE --force STAGE` (before --force was a switch everywhere) -> `--force-stage STAGE`."""
    import os

    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--force" and i + 1 < len(argv) and argv[i + 1] in STAGES and not os.path.isfile(argv[i + 1]):
            out += ["--force-stage", argv[i + 1]]
            print(f"note: `--force {argv[i + 1]}` is now `--force-stage {argv[i + 1]}` (--force alone re-runs "
                  "every stage)", file=sys.stderr)
            i += 2
            continue
        if a.startswith("--force=") and a[8:] in STAGES:
            out += ["--force-stage", a[8:]]
        else:
            out.append(a)
        i += 1
    return out


def _path(args) -> None:
    from pathlib import Path

    from slmforge.artifacts import ArtifactStore
    from slmforge.errors import UserError

    recipe = recipe_arg(args, "path", required=False)
    if args.workdir is not None and recipe is not None:
        raise UserError("give a RECIPE or --workdir DIR, not both")
    if args.workdir is not None:
        workdir = Path(args.workdir)
    elif recipe is not None and Path(recipe).is_dir():
        workdir = Path(recipe)
    elif recipe is not None:
        from slmforge.config import load_recipe

        workdir = load_recipe(recipe, args.overrides).workdir
    else:
        raise UserError(f"`slmforge path {args.stage}` needs a recipe or a workdir: slmforge path {args.stage} "
                        "RECIPE (or --workdir DIR)")
    print(ArtifactStore(workdir).resolve(f"{args.stage}:latest").path)


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


def _prompts(given: str | None, interactive: bool):
    """The prompts to answer: --prompt, or stdin's lines (asked for with "> " on a terminal)."""
    if given is not None:
        yield given
        return
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            print(file=sys.stderr)
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def _chat(args) -> None:
    """Each prompt, quoted with "> " (unless the user has just typed it on a terminal), then the answer on
    its own lines, streamed as it is generated, and a blank line before the next prompt."""
    import torch
    from transformers import TextStreamer

    from slmforge.models.lm import generate
    from slmforge.models.modeling import load_model

    class Answer(TextStreamer):
        """transformers' stdout streamer, without the whitespace that a continuation starts with."""

        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    model, tok = load_model(args.model)
    model.eval()
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print("type a prompt and press Enter (Ctrl-D to quit)", file=sys.stderr)
    for i, prompt in enumerate(_prompts(args.prompt, interactive)):
        if not interactive:
            print(("\n" if i else "") + "\n".join("> " + line for line in prompt.split("\n")), flush=True)
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample \
            else {"do_sample": False}
        generate(model, tok, [{"role": "user", "content": prompt}] if args.chat else prompt, args.max_new_tokens,
                 streamer=Answer(tok, skip_prompt=True, skip_special_tokens=True), **sampling)
        if interactive:
            print()


def _llama_server(args) -> None:
    from pathlib import Path

    from slmforge.deploy.gguf import llama_server

    llama_server(Path(args.gguf).expanduser(), args.host, args.port, args.context, args.parallel, args.alias,
                 args.threads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["models"]:
        from slmforge.deploy.catalog import cli_main

        return cli_main(argv[1:])
    if argv[:1] == ["base"]:
        from slmforge.models.bases import cli_main

        return cli_main(argv[1:])
    if argv[:1] == ["serve"]:
        from slmforge.serve.cli import cli_main

        return cli_main(argv[1:])
    from slmforge.errors import UserError

    try:
        if argv[:1] == ["plan"]:
            return _plan(argv[1:])
        if argv[:1] == ["run"]:
            argv = ["run", *_old_force(argv[1:])]
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.verb:
            parser.print_help()
            return 0
        if args.verb == "init":
            _init(args.dir, args.force)
            return 0
        if args.verb == "chat":
            _chat(args)
            return 0
        if args.verb == "path":
            _path(args)
            return 0
        if args.verb == "llama-server":
            _llama_server(args)
            return 0
        from slmforge.config import load_recipe
        from slmforge.pipeline import print_status, run_recipe

        recipe_path = recipe_arg(args, args.verb)
        if args.verb == "status":
            print_status(load_recipe(recipe_path, args.overrides))
        elif args.verb == "run":
            recipe = load_recipe(recipe_path, args.overrides)
            force = tuple(recipe.stages) if args.force else tuple(args.force_stage)
            run_recipe(recipe, until=args.until, force=force)
        else:
            return _run_stage(args.verb, recipe_path, args.overrides, args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
