"""`slmforge` command line: one parser built from one table of verbs (`VERBS`), and one place where a
UserError becomes its message and exit code 2. Library modules hold no argparse: a verb's handler calls them
with plain arguments.

Heavy imports happen inside the handlers, and a verb's arguments are added only when that verb is named
(plan's and serve's flags are derived from pydantic Configs), so that `slmforge --help` answers instantly
(no torch, no transformers, no pydantic)."""

from __future__ import annotations

import argparse
import sys

from slmforge import __version__
from slmforge.errors import UserError
from slmforge.stages import STAGE_HELP, STAGES

FORCE_HELP = "re-run this stage even if it is cached (the stages it needs are reused when cached)"


# ---- arguments that several verbs share -----------------------------------------------------------------------

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

    pos, flag = getattr(args, "recipe", None), getattr(args, "recipe_flag", None)
    if pos is not None and flag is not None and Path(pos).resolve() != Path(flag).resolve():
        raise UserError(f"two recipes given: RECIPE {pos} and --recipe {flag}; give one")
    recipe = pos if pos is not None else flag
    if recipe is None and required:
        raise UserError(f"`slmforge {verb}` needs a recipe: slmforge {verb} RECIPE (or --recipe RECIPE)")
    return recipe


# ---- init, run, status, path and the stage verbs --------------------------------------------------------------

def _init_args(p) -> None:
    p.add_argument("dir", help="folder for the recipe (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite an existing recipe.yaml")


def _init(args) -> None:
    from importlib.resources import files
    from pathlib import Path

    from slmforge.console import info

    d = Path(args.dir)
    target = d / "recipe.yaml"
    if target.exists() and not args.force:
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


def _run_args(p) -> None:
    _add_recipe(p)
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--force", action="store_true", help="re-run every stage it runs (up to --until), even if cached")
    p.add_argument("--force-stage", metavar="STAGE", action="append", default=[],
                   help="re-run this one stage even if cached (repeatable)")
    _add_set(p)


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


def _run(args) -> None:
    from slmforge.config import load_recipe
    from slmforge.pipeline import run_recipe

    recipe = load_recipe(recipe_arg(args, "run"), args.overrides)
    force = tuple(recipe.stages) if args.force else tuple(args.force_stage)
    run_recipe(recipe, until=args.until, force=force)


def _status_args(p) -> None:
    _add_recipe(p)
    _add_set(p)


def _status(args) -> None:
    from slmforge.config import load_recipe
    from slmforge.pipeline import print_status

    print_status(load_recipe(recipe_arg(args, "status"), args.overrides))


def _path_args(p) -> None:
    p.add_argument("stage", metavar="STAGE", choices=STAGES, help="one of: " + ", ".join(STAGES))
    _add_recipe(p, "the recipe YAML, or its workdir folder")
    p.add_argument("--workdir", metavar="DIR", help="the workdir to look in, instead of a recipe's")
    _add_set(p)


def _path(args) -> None:
    from pathlib import Path

    from slmforge.artifacts import ArtifactStore

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


def _run_stage(stage: str, recipe_path: str, overrides: list[str], force: bool) -> None:
    from slmforge.config import load_recipe
    from slmforge.pipeline import run_recipe

    recipe = load_recipe(recipe_path, overrides, default_section=stage)
    run_recipe(recipe, only=stage, force=(stage,) if force else ())


def _stage(args) -> None:
    _run_stage(args.verb, recipe_arg(args, args.verb), args.overrides, args.force)


# ---- plan: a stage verb that also answers without a recipe ----------------------------------------------------

def _plan_args(p) -> dict[str, str]:
    """The stage's arguments (a recipe) and the no-recipe flags, derived from plan.CliConfig, in one --help."""
    from slmforge.flags import add_flags
    from slmforge.stages.plan import CliConfig

    _add_stage(p)
    g = p.add_argument_group("budget", "with a recipe they override its plan: section (as --set plan.KEY=VALUE "
                                       "would); without one they are the whole question, --domain-tokens included")
    flags = add_flags(g, CliConfig)
    g.add_argument("--json", action="store_true", help="without a recipe: print the recommendation as JSON")
    return flags


def _plan(args) -> None:
    flags = args.derived_flags
    recipe = recipe_arg(args, "plan", required=False)
    given = {dest: getattr(args, dest) for dest in flags if getattr(args, dest) is not None}
    if recipe is None:
        if args.force or args.overrides:
            raise UserError("--force and --set need a recipe: slmforge plan RECIPE --force")
        from slmforge.config import validate
        from slmforge.flags import collect
        from slmforge.stages import plan

        plan.answer(validate(plan.CliConfig, collect(args, flags), "plan"), as_json=args.json)
        return
    if args.json:
        raise UserError("--json is for `slmforge plan` without a recipe; with one, the plan stage writes "
                        "plan.json in its folder (`slmforge path plan RECIPE`)")
    if "domain_tokens" in given:
        raise UserError("--domain-tokens is for `slmforge plan` without a recipe; with one, the plan stage counts "
                        "the recipe's tokenized domain data")
    overrides = [f"plan.{flags[d]}={v}" for d, v in given.items()] + args.overrides
    _run_stage("plan", recipe, overrides, args.force)


# ---- chat and llama-server -------------------------------------------------------------------------------------

def _chat_args(p) -> None:
    p.add_argument("model", help="a model folder, e.g. runs/demo/pretrain/<key>/specialist")
    p.add_argument("--prompt", help="complete this text and exit (else read prompts from stdin, one per line)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)


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


def _llama_server_args(p) -> None:
    p.add_argument("gguf", help="a .gguf file (export writes one per model folder)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--context", type=int, default=None, help="tokens per request (default: the model's)")
    p.add_argument("--parallel", type=int, default=4, help="requests decoded together (continuous batching)")
    p.add_argument("--alias", default=None, help="the model name clients send (default: the file's stem)")
    p.add_argument("--threads", type=int, default=None)


def _llama_server(args) -> None:
    from pathlib import Path

    from slmforge.deploy.gguf import llama_server

    llama_server(Path(args.gguf).expanduser(), args.host, args.port, args.context, args.parallel, args.alias,
                 args.threads)


# ---- models: the catalog ---------------------------------------------------------------------------------------

def _models_args(p) -> None:
    from slmforge.deploy.catalog import default_path

    where = f"the catalog file (default: $SLMFORGE_CATALOG or {default_path()})"
    p.add_argument("--catalog", help=where)
    after = argparse.ArgumentParser(add_help=False)  # --catalog also after the action (models list --catalog X)
    after.add_argument("--catalog", default=argparse.SUPPRESS, help=where)
    sub = p.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[after], help=help)

    action("list", "every model: name, domain, size, scores, folder").add_argument(
        "--json", action="store_true", help="print JSON instead of a table")
    action("show", "everything the catalog knows about one model").add_argument("name")
    s = action("add", "validate an exported model folder and add it")
    s.add_argument("folder")
    s.add_argument("--name", help="the catalog name (default: the name in slmforge.json, else the folder's)")
    s.add_argument("--domain", help="the model's domain (needed when the folder has no slmforge.json)")
    s.add_argument("--description")
    s.add_argument("--replace", action="store_true", help="re-point an existing name at this folder")
    s.add_argument("--endpoint", help="an OpenAI-compatible base URL that serves this model (vllm serve FOLDER, "
                   "slmforge llama-server FILE.gguf): slmforge serve forwards its requests there")
    s.add_argument("--endpoint-model", help="the model name at the endpoint (default: the catalog name)")
    s.add_argument("--api-key-env", help="environment variable with the endpoint's API key")
    action("rm", "remove a model from the catalog (its folder is left alone)").add_argument("name")


def _models(args) -> None:
    from slmforge.deploy import catalog

    cat = catalog.Catalog(args.catalog)
    if args.action in (None, "list"):
        catalog.print_catalog(cat, as_json=getattr(args, "json", False))
    elif args.action == "show":
        catalog.print_entry(cat, args.name)
    elif args.action == "add":
        if not args.endpoint and (args.endpoint_model or args.api_key_env):
            raise UserError("--endpoint-model and --api-key-env describe an --endpoint; give --endpoint URL")
        endpoint = {"base_url": args.endpoint, "model": args.endpoint_model,
                    "api_key_env": args.api_key_env} if args.endpoint else None
        catalog.add_entry(cat, args.folder, name=args.name, domain=args.domain, description=args.description,
                          replace=args.replace, endpoint=endpoint)
    elif args.action == "rm":
        catalog.remove_entry(cat, args.name)


# ---- base: pretrained bases ------------------------------------------------------------------------------------

def _base_args(p) -> None:
    from slmforge.models.bases import BUILTIN

    p.description = ("Pretrained bases: real models to compare with, to adapt (pretrain.init_from) and to teach. "
                     "Built in: " + ", ".join(BUILTIN))
    p.add_argument("--cache", help="the bases folder (default $SLMFORGE_BASES or ~/.cache/slmforge/bases)")
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("add", help="convert an HF folder or a .gguf file into a base")
    a.add_argument("name")
    a.add_argument("path", nargs="?", help="an HF folder (safetensors) or a .gguf file (omit for a built-in base)")
    a.add_argument("--tokens", help="pretraining tokens, e.g. 2T (default: what the model card states)")
    a.add_argument("--license", help="the licence, e.g. apache-2.0")
    a.add_argument("--force", action="store_true", help="replace a base of the same name")
    sub.add_parser("list", help="the bases in the cache (and the built-in ones not converted yet)")


def _base(args) -> None:
    from slmforge.models import bases

    if args.action == "add":
        import json

        base = bases.add_by_name(args.name, args.path, tokens=args.tokens, license=args.license, cache=args.cache,
                                 force=args.force)
        print(json.dumps(base.to_json(), indent=2))
    else:
        bases.print_bases(args.cache)


# ---- serve -----------------------------------------------------------------------------------------------------

# Flag names older than their derivation from serve's Config (which would say --models, --router-threshold, ...)
SERVE_NAMES = {"models": "--model", "router.threshold": "--threshold", "router.kind": "--router",
               "fallback.base_url": "--fallback-url", "fallback.model": "--fallback-model",
               "fallback.api_key_env": "--fallback-key-env"}


def _serve_args(p) -> dict[str, str]:
    """The flags derived from slmforge.serve.config.Config by slmforge.flags, and the recipe."""
    from slmforge.flags import add_flags
    from slmforge.serve.config import Config

    _add_recipe(p, "read settings from this recipe's serve: section (flags override it)")
    return add_flags(p, Config, names=SERVE_NAMES, metavars={"models": "NAME_OR_PATH"})


def serve_section(path: str) -> dict:
    """The recipe's `serve:` section, validated with the whole recipe (paths relative to the recipe file)."""
    from slmforge.config import load_recipe

    cfg = load_recipe(path).services.get("serve")
    return cfg.model_dump(exclude_unset=True) if cfg is not None else {}


def serve_config(args: argparse.Namespace):
    """The recipe's section (if a recipe is given), the given flags over it, validated once as serve's Config."""
    from slmforge.flags import collect, merge
    from slmforge.serve.config import build_config

    recipe = recipe_arg(args, "serve", required=False)
    given = collect(args, args.derived_flags)
    fallback = given.pop("fallback", None)
    section = merge(serve_section(recipe) if recipe else {}, given)
    if fallback is not None:  # the fallback flags name one whole fallback: they replace the recipe's
        if "model" not in fallback:
            given_flags = ", ".join(SERVE_NAMES[f"fallback.{k}"] for k in fallback)
            raise UserError(f"{given_flags} needs --fallback-model (the model name at that endpoint)")
        section["fallback"] = {"base_url": None, "api_key_env": None, **fallback}
    return build_config(section)


def _serve(args) -> None:
    """Load the models, train the router, print the URL and serve until Ctrl-C."""
    cfg = serve_config(args)
    from slmforge.serve.app import create_app

    app = create_app(cfg)
    import uvicorn

    from slmforge.console import info

    srv = app.state.server
    info(f"serving {', '.join(srv.models)} (+ auto) at http://{cfg.host}:{cfg.port}/v1 ; chat page "
         f"http://{cfg.host}:{cfg.port}/ ; API keys {'required' if srv.keys else 'off'}")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)


# ---- the table -------------------------------------------------------------------------------------------------

class Verb:
    """One row of the table: the line `slmforge --help` shows, a function that adds the verb's arguments to
    its parser (returning the flags it derived from a Config, if any), the handler (an exit code, or None
    for 0), and the verb's own --help description and epilog. A plain class: importing dataclasses would
    take `import slmforge.cli` from 16 to 31 ms (python -X importtime)."""

    __slots__ = ("arguments", "description", "epilog", "help", "run")

    def __init__(self, help: str, arguments, run, description: str | None = None, epilog: str | None = None):
        self.help, self.arguments, self.run = help, arguments, run
        self.description, self.epilog = description, epilog


PLAN = Verb(
    f"run one stage: {STAGE_HELP['plan']}", _plan_args, _plan,
    description="What model should I train? Chinchilla-optimal size, corrected for repeated domain data "
                "(Muennighoff et al. 2023) and for inference cost (Sardana et al. 2023). With a recipe it runs "
                "the plan stage on the recipe's tokenized data; without one, the budget and the domain data size "
                "come from the flags.",
    epilog="examples: slmforge plan my-domain/recipe.yaml --hours 24 ; "
           "slmforge plan --hours 168 --device rtx4090 --domain-tokens 1e9")

VERBS: dict[str, Verb] = {
    "init": Verb("write a commented recipe for your own corpus into DIR", _init_args, _init),
    "run": Verb("run every stage the recipe names, in order (cached stages are skipped)", _run_args, _run,
                epilog="`--force` re-runs every stage this command runs; `--force-stage STAGE` only that one (the "
                       "old `run RECIPE --force STAGE` still means --force-stage STAGE)."),
    "status": Verb("list each stage as done (key, wall time), incomplete, or not run", _status_args, _status),
    "path": Verb("print the folder of a stage's latest completed run (<workdir>/<stage>/latest)", _path_args, _path,
                 epilog="example: ls $(slmforge path export recipes/demo.yaml)"),
    "chat": Verb("talk to a model folder: greedy or sampled completions", _chat_args, _chat),
    "llama-server": Verb("serve an exported GGUF with llama.cpp's OpenAI-compatible server (the fastest CPU "
                         "decoding; an endpoint for serve.fallback)", _llama_server_args, _llama_server),
    "models": Verb("the catalog of exported specialists: list, show, add, rm (see `slmforge models -h`)",
                   _models_args, _models, description="The catalog of exported specialists."),
    "serve": Verb(
        "an OpenAI-compatible server for catalog models, with a router (`slmforge serve -h`)", _serve_args, _serve,
        description="Serve models over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/models) with a chat page at /. model \"auto\" routes each prompt to a specialist.",
        epilog="examples: slmforge serve recipes/demo.yaml ; slmforge serve --model runs/demo/export/latest/demo-dpo "
               "--port 8000"),
    "base": Verb("pretrained bases to compare with and adapt: add NAME PATH (HF folder or .gguf), list "
                 "(`slmforge base -h`)", _base_args, _base),  # its description names the built-in bases
    **{stage: PLAN if stage == "plan" else Verb(f"run one stage: {STAGE_HELP[stage]}", _add_stage, _stage)
       for stage in STAGES},
}


def _parsers(verb: str | None) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="slmforge",
        description="Turn a domain corpus into a measured, deployable specialized small language model.",
        epilog="Pipeline: " + " -> ".join(STAGES) + ". Start with `slmforge init my-domain/`. Every verb that "
               "reads a recipe takes it as RECIPE or --recipe RECIPE; --force re-runs what the verb runs.",
    )
    parser.add_argument("--version", action="version", version=f"slmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, v in VERBS.items():
        p = sub.add_parser(name, help=v.help, description=v.description, epilog=v.epilog)
        if name == verb:
            p.set_defaults(derived_flags=v.arguments(p) or {})
    return parser, sub


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `slmforge` parser: every verb, with the arguments of `verb` (only the named verb's arguments are
    added, so that `slmforge --help` imports no pydantic for plan's and serve's derived flags)."""
    return _parsers(verb)[0]


def verb_parser(verb: str) -> argparse.ArgumentParser:
    """One verb's parser, as `slmforge VERB --help` shows it."""
    return _parsers(verb)[1].choices[verb]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = argv[0] if argv and argv[0] in VERBS else None
    if verb == "run":
        argv = ["run", *_old_force(argv[1:])]
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 0
    try:
        return VERBS[args.verb].run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
