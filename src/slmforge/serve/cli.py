"""`slmforge serve`: the flags (derived from slmforge.serve.config.Config by slmforge.flags), laid over the
recipe's `serve:` section, validated once; then load the models, print the URL and serve until Ctrl-C."""

import argparse
import sys

from slmforge.errors import UserError
from slmforge.flags import add_flags, collect, merge
from slmforge.serve.config import Config, build_config

# Flag names older than their derivation from Config (which would say --models, --router-threshold, ...)
NAMES = {"models": "--model", "router.threshold": "--threshold", "router.kind": "--router",
         "fallback.base_url": "--fallback-url", "fallback.model": "--fallback-model",
         "fallback.api_key_env": "--fallback-key-env"}


def _recipe_section(path: str) -> dict:
    """The recipe's `serve:` section, validated with the whole recipe (paths relative to the recipe file)."""
    from slmforge.config import load_recipe

    cfg = load_recipe(path).services.get("serve")
    return cfg.model_dump(exclude_unset=True) if cfg is not None else {}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    p = argparse.ArgumentParser(
        prog="slmforge serve",
        description="Serve models over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/models) with a chat page at /. model \"auto\" routes each prompt to a specialist.",
        epilog="examples: slmforge serve recipes/demo.yaml ; slmforge serve --model runs/demo/export/latest/demo-dpo "
               "--port 8000",
    )
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="read settings from this recipe's serve: section (flags override it); or --recipe RECIPE")
    p.add_argument("--recipe", dest="recipe_flag", metavar="RECIPE", help="the same as the RECIPE argument")
    flags = add_flags(p, Config, names=NAMES, metavars={"models": "NAME_OR_PATH"})
    return p, flags


def config_from_args(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    """The recipe's section (if --recipe), the given flags over it, validated as one Config."""
    from slmforge.cli import recipe_arg

    recipe = recipe_arg(args, "serve", required=False)
    given = collect(args, flags)
    fallback = given.pop("fallback", None)
    section = merge(_recipe_section(recipe) if recipe else {}, given)
    if fallback is not None:  # the fallback flags name one whole fallback: they replace the recipe's
        if "model" not in fallback:
            given_flags = ", ".join(NAMES[f"fallback.{k}"] for k in fallback)
            raise UserError(f"{given_flags} needs --fallback-model (the model name at that endpoint)")
        section["fallback"] = {"base_url": None, "api_key_env": None, **fallback}
    return build_config(section)


def cli_main(argv: list[str] | None = None) -> int:
    """`slmforge serve`: load the models, train the router, print the URL and serve until Ctrl-C."""
    p, flags = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        cfg = config_from_args(args, flags)
        from slmforge.serve.app import create_app

        app = create_app(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from slmforge.console import info

    srv = app.state.server
    info(f"serving {', '.join(srv.models)} (+ auto) at http://{cfg.host}:{cfg.port}/v1 ; chat page "
         f"http://{cfg.host}:{cfg.port}/ ; API keys {'required' if srv.keys else 'off'}")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
