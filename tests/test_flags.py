"""slmforge.flags: argparse flags derived from a pydantic Config (type, default, choices, help)."""

import argparse
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from slmforge.config import validate
from slmforge.errors import UserError
from slmforge.flags import add_flags, collect, merge


class Sub(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["a", "b"] = Field("a", description="which kind")
    threshold: float = Field(0.5, ge=0, le=1, description="how sure")


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(8000, ge=1, description="TCP port")
    name: str | None = Field(None, description="a name")
    fast: bool = Field(False, description="go fast")
    models: list[str] = Field(default_factory=list, description="models to serve")
    sub: Sub = Field(default_factory=Sub, description="nested")


def _parser(**kw):
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    return p, add_flags(p, Cfg, **kw)


def _action(p: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in p._actions if flag in a.option_strings)


def test_flags_take_type_choices_and_help_from_the_fields():
    p, flags = _parser(names={"models": "--model", "sub.threshold": "--threshold"})
    assert flags == {"port": "port", "name": "name", "fast": "fast", "models": "models", "sub__kind": "sub.kind",
                     "sub__threshold": "sub.threshold"}
    port = _action(p, "--port")
    assert port.type is int and port.default is None and port.help == "TCP port (default: 8000)"
    assert _action(p, "--sub-kind").choices == ["a", "b"]
    assert _action(p, "--threshold").type is float and "how sure (default: 0.5)" == _action(p, "--threshold").help
    assert isinstance(_action(p, "--model"), argparse._AppendAction)
    assert "--no-fast" in _action(p, "--fast").option_strings


def test_only_given_flags_are_collected_as_the_nested_mapping():
    p, flags = _parser(names={"models": "--model"})
    assert collect(p.parse_args([]), flags) == {}
    args = p.parse_args(["--port", "9000", "--model", "x", "--model", "y", "--sub-threshold", "0.7", "--fast"])
    given = collect(args, flags)
    assert given == {"port": 9000, "models": ["x", "y"], "sub": {"threshold": 0.7}, "fast": True}
    cfg = validate(Cfg, merge({"sub": {"kind": "b"}, "port": 1}, given), "serve")
    assert cfg.port == 9000 and cfg.sub.kind == "b" and cfg.sub.threshold == 0.7 and cfg.models == ["x", "y"]
    assert validate(Cfg, {}, "serve") == Cfg()  # defaults come from the Config, not from argparse


def test_a_bad_value_names_its_key():
    p, flags = _parser()
    with pytest.raises(UserError, match=r"serve\.sub\.threshold: .*less than or equal to 1"):
        validate(Cfg, collect(p.parse_args(["--sub-threshold", "2"]), flags), "serve")


def test_serve_flags_come_from_its_config():
    from slmforge.cli import verb_parser
    from slmforge.serve.config import DTYPES, Config

    p = verb_parser("serve")
    dtype = _action(p, "--dtype")
    assert tuple(dtype.choices) == DTYPES and str(Config.model_fields["dtype"].default) in dtype.help
    assert _action(p, "--router").choices == ["tfidf", "bpb"]
    assert _action(p, "--max-queue").type is int and "(default: 64)" in _action(p, "--max-queue").help
    for flag in ("--recipe", "--catalog", "--model", "--host", "--port", "--fallback-url", "--fallback-model",
                 "--fallback-key-env", "--threshold", "--router", "--max-concurrency", "--max-queue",
                 "--max-tokens", "--dtype", "--api-keys-env", "--threads"):
        _action(p, flag)


def test_bad_flag_values_exit_2_naming_the_key(capsys):
    from slmforge.cli import main

    assert main(["serve", "--threshold", "2"]) == 2
    assert "serve.router.threshold" in capsys.readouterr().err
    assert main(["serve", "--max-queue", "-1"]) == 2
    assert "serve.max_queue" in capsys.readouterr().err
    assert main(["plan", "--flops", "1e20", "--mfu", "1.5", "--domain-tokens", "1e9"]) == 2
    assert "plan.mfu" in capsys.readouterr().err
