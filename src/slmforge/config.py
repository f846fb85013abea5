"""Recipe YAML + `--set key=value` overrides -> one typed, validated Config per stage.

A recipe is a YAML mapping: `name`, `workdir`, and one section per stage, in pipeline order.
Each stage module defines `Config` (a pydantic model, unknown keys rejected). Every problem in a
recipe is collected and reported at once, each naming its key, before any stage runs.
Relative paths in a recipe are relative to the recipe file.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from slmforge.errors import UserError
from slmforge.stages import SERVICES, STAGES

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # what a `device:` setting may say; hardware.resolve_device makes it concrete
# a batch size, or `auto`: the CPU's measured size on a CPU, a larger one on a GPU (hardware.auto_batch)
BatchSize = Annotated[int, Field(ge=1)] | Literal["auto"]

TOP_LEVEL = {
    "name": "a short name for this run (letters, digits, '-', '_')",
    "workdir": "where stage outputs go, relative to the recipe file (default: runs/<name>)",
    "device": "auto | cpu | cuda | cuda:N: where models run in every stage with a `device` setting (evaluate, "
              "synth's and bench's hf teacher, dpo's on-policy answers) unless its section sets its own",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StageConfig(BaseModel):
    """Base of every stage's Config: typed, documented per field, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # Fields that change how fast a stage runs but not what it makes; left out of the cache key.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset()

    def key_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.NOT_IN_KEY}


@dataclass
class Recipe:
    path: Path
    name: str
    workdir: Path
    stages: dict[str, StageConfig] = field(default_factory=dict)  # in pipeline order
    services: dict[str, StageConfig] = field(default_factory=dict)  # e.g. serve: started by its own verb

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def stage_module(name: str):
    """A stage's module (slmforge.stages.<name>), or for a service the config module of its package
    (slmforge.serve.config): either has the section's `Config`."""
    if name in SERVICES:
        return importlib.import_module(f"slmforge.{name}.config")
    return importlib.import_module(f"slmforge.stages.{name}")


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 8192 -> int, 0.5 -> float, true -> bool, [a, b] -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str], default_section: str | None = None) -> dict:
    """Apply `key.sub=value` overrides to the raw recipe mapping (copying what it changes).

    With `default_section` (a stage verb), a key without a dot that is not a top-level recipe key is
    taken inside that stage's section: `slmforge tokenizer --set vocab_size=4096`.
    """
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set tokenizer.vocab_size=4096")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if default_section and len(parts) == 1 and parts[0] not in TOP_LEVEL and parts[0] not in STAGES + SERVICES:
            parts = [default_section, *parts]
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise UserError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = parse_value(value)
    return raw


def format_errors(section: str, err: ValidationError) -> list[str]:
    """One line per problem, each naming its key as section.key.sub."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (section, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling (`slmforge init` writes every key with its meaning)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error",):
            msg = f"{msg} (got {e['input']!r})"
        out.append(f"{loc}: {msg}")
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one, so a
    second `pretrain:` section would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"`{key}` appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] = (), default_section: str | None = None) -> Recipe:
    """Read and validate a recipe. Raises UserError listing every problem found, each with its key."""
    path = Path(path)
    raw = apply_overrides(_read_yaml(path), list(overrides), default_section)
    path = path.resolve()
    name, workdir, problems = _top_level(raw, path)
    context = {"base_dir": path.parent, "recipe_name": name, "recipe_path": path}
    stages, services, section_problems = _sections(raw, context)
    problems += section_problems
    for stage in stages:
        for dep in stage_inputs(stage, stages[stage]):
            if dep not in stages and dep not in raw:  # a section that is there but invalid is reported above
                problems.append(
                    f"{stage}: needs the {dep} stage's output; add a `{dep}:` section to the recipe "
                    f"(an empty one takes the defaults)"
                )
    if not stages and not services and not problems:
        problems.append(f"the recipe names no stage; add sections such as {', '.join(STAGES[:3])}")
    if problems:
        raise UserError(f"recipe {path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return Recipe(path=path, name=name, workdir=(path.parent / workdir).resolve(), stages=stages, services=services)


def _read_yaml(path: Path) -> dict:
    """The recipe file's top-level mapping ({} for an empty file), or a UserError."""
    if not path.is_file():
        raise UserError(f"recipe {path}: no such file. Write one with `slmforge init DIR`.")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: the top level must be a mapping of keys (name, workdir, stages)")
    return raw


def _top_level(raw: dict, path: Path) -> tuple[str, str, list[str]]:
    """The recipe's name and workdir (stand-ins where they are wrong) and the problems of its top-level keys."""
    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL and key not in STAGES + SERVICES:
            problems.append(
                f"{key}: unknown key; top-level keys are {', '.join(TOP_LEVEL)}, the stages "
                f"{', '.join(STAGES)} and {', '.join(SERVICES)}"
            )
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"name: {name!r} must be letters, digits, '-', '_' or '.'")
        name = "recipe"
    if "device" in raw and not (isinstance(raw["device"], str) and re.match(DEVICE_PATTERN, raw["device"])):
        problems.append(f"device: {raw['device']!r}; expected auto, cpu, cuda or cuda:N")
    workdir = raw.get("workdir", f"runs/{name}")
    if not isinstance(workdir, str) or not workdir:
        problems.append(f"workdir: expected a path, got {workdir!r}")
        workdir = f"runs/{name}"
    return name, workdir, problems


def _sections(raw: dict, context: dict) -> tuple[dict[str, StageConfig], dict[str, StageConfig], list[str]]:
    """Each stage's and service's section validated into its Config (the recipe-wide `device` filled in where
    the section has that setting and does not set it), and the problems of those that fail."""
    problems: list[str] = []
    stages: dict[str, StageConfig] = {}
    services: dict[str, StageConfig] = {}
    for stage in STAGES + SERVICES:
        if stage not in raw:
            continue
        section = raw[stage] or {}
        if not isinstance(section, dict):
            problems.append(f"{stage}: expected a mapping of settings, got {section!r}")
            continue
        cfg_cls = stage_module(stage).Config
        if "device" in raw and "device" in cfg_cls.model_fields and "device" not in section:
            section = {**section, "device": raw["device"]}  # the recipe-wide device, unless the stage sets one
        try:
            (stages if stage in STAGES else services)[stage] = cfg_cls.model_validate(section, context=context)
        except ValidationError as e:
            problems.extend(format_errors(stage, e))
    return stages, services, problems


def stage_inputs(stage: str, cfg: StageConfig) -> tuple[str, ...]:
    """The stages whose outputs `stage` reads: its INPUTS, or what its `needs(cfg)` says."""
    mod = stage_module(stage)
    return mod.needs(cfg) if hasattr(mod, "needs") else mod.INPUTS


def resolve_path(value: str, info) -> Path:
    """Resolve a recipe path against the recipe's folder (pydantic validation context)."""
    base = (info.context or {}).get("base_dir") if info is not None else None
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p


def _absolute(value: str, info) -> str:
    return str(resolve_path(value, info))


# A path in a recipe, validated into an absolute path against the recipe's folder (a field typed
# `RecipePath | None` keeps None).
RecipePath = Annotated[str, AfterValidator(_absolute)]


def validate(model: type[BaseModel], data: dict, section: str, context: dict | None = None):
    """`model.model_validate(data)`, or a UserError listing every problem as `section.key: ...`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise UserError("; ".join(format_errors(section, e))) from None
