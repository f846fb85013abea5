"""compress: a teacher (the run's DAPT specialist, or a base) made into a student of a chosen size that
keeps the teacher's tokenizer: structured pruning with importance measured on the domain (slmforge.training.prune),
then training on the domain mixture with logit distillation from the teacher (slmforge.training.distill), in
pretrain's loop (slmforge.training.loop: budget, WSD, checkpoints and exact resume, progress, accelerate).

Variants, each a plain LlamaForCausalLM of the same shape, trained on the same batches for the same tokens:
- `pruned`: the pruned teacher as it is (what pruning alone costs);
- `pruned-kd`: pruned, then distilled (alpha * T^2 * KL + (1 - alpha) * LM loss) - the student;
- `pruned-lm`: pruned, then trained with the LM loss only (what distillation adds);
- `scratch-kd` / `scratch-lm`: a random model of the same shape, distilled / LM only (what pruning adds).
Output: `<run>/<variant>/` HF folders, `importance.json` (every score), and the manifest's `pruning` record
(which layers, heads, channels were kept, and the share of the importance they hold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from slmforge import dist, hardware
from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.console import console, info
from slmforge.errors import UserError
from slmforge.hardware import use_bf16
from slmforge.models.bases import base_name, folder_or_name
from slmforge.models.dapt import init_source
from slmforge.models.modeling import load_model, parse_count, shape_of
from slmforge.records import Curated, Models
from slmforge.training import prune
from slmforge.training.distill import Distiller
from slmforge.training.loop import TrainConfig, Trainee, token_budget, train_and_save
from slmforge.training.packing import Sampler, tokenize_sources

NAME = "compress"
INPUTS = ("curate",)


@dataclass(frozen=True)
class Variant:
    """What a variant is: where its weights start, and the loss it is trained with after."""

    init: Literal["pruned", "scratch"]  # the pruned teacher's weights, or random ones of the same shape
    loss: Literal["kd", "lm"] | None  # distillation, the LM loss alone, or None: saved as pruned, not trained


# the names are the models records.MODELS gives this stage (tests/stages/test_compress.py checks it)
VARIANTS = {"pruned": Variant("pruned", None), "pruned-kd": Variant("pruned", "kd"),
            "pruned-lm": Variant("pruned", "lm"), "scratch-kd": Variant("scratch", "kd"),
            "scratch-lm": Variant("scratch", "lm")}


class ShapeOverride(BaseModel):
    """Sizes to keep, each optional (unset: the teacher's, or the target's when a target is given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: int | None = Field(None, ge=1)
    hidden: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    kv_heads: int | None = Field(None, ge=1)
    ffn: int | None = Field(None, ge=1)


class Config(TrainConfig):
    """The teacher, the student's size, the calibration set, the distillation loss and the variants; the
    loop's budget and optimisation (TrainConfig) apply to every trained variant."""

    teacher: str = Field("pretrain", description="`pretrain` (the run's specialist, e.g. a DAPT of a base), a base "
                                                 "by name (`slmforge base list`) or a local HF folder")
    ratio: float | None = Field(0.25, gt=0, le=1, description="the student's parameters / the teacher's")
    params: int | str | None = Field(None, description="the student's parameters at most, e.g. 35M (instead of ratio)")
    dims: list[Literal["layers", "heads", "ffn", "hidden"]] = Field(
        default_factory=lambda: list(prune.DIMS), description="what may be pruned: layers, attention heads (whole KV "
                                                              "groups and queries within them), FFN channels, hidden "
                                                              "(embedding) channels")
    shape: ShapeOverride | None = Field(None, description="fix sizes: {layers, hidden, heads, kv_heads, ffn}")
    calibration: int = Field(256, ge=1, description="domain train sequences the importance is measured on")
    calibration_context: int = Field(128, ge=8, description="tokens per calibration sequence")
    context: int | None = Field(None, ge=16, description="training context (default: the teacher's, up to 1024)")
    variants: list[Literal[tuple(VARIANTS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["pruned-kd"], description=f"students to make: {', '.join(VARIANTS)}")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term (1 - alpha: the LM loss)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term")
    scratch_lr: float = Field(3e-3, gt=0, description="peak learning rate of the scratch variants (a random model "
                                                      "takes a larger one than a pruned one)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the pruned variants")

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str, info: ValidationInfo) -> str:
        return v if v == "pretrain" else folder_or_name(v, info)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"name each variant once, at least one ({', '.join(VARIANTS)})")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            parse_count(v)
        return v

    def target(self, teacher_params: int) -> float:
        return parse_count(self.params) if self.params is not None else (self.ratio or 1.0) * teacher_params


def needs(cfg: Config) -> tuple[str, ...]:
    return INPUTS + (("pretrain",) if cfg.teacher == "pretrain" else ())


def external(cfg: Config) -> dict:
    """The identity of the teacher when it is not pretrain's model: a named base's (bases.fingerprint), a
    folder's files (artifacts.fingerprint), so that replacing or editing it re-runs compress."""
    from slmforge.artifacts import fingerprint
    from slmforge.models import bases

    if cfg.teacher == "pretrain":
        return {}
    name = base_name(cfg.teacher)
    return {"teacher": bases.fingerprint(name) if name else fingerprint(cfg.teacher)}


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in needs(cfg)}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out), external=external(cfg),
                       resumable=True, force=force, distributed=True)


# ---- the teacher, the data, the shape ------------------------------------------------------------------------
def teacher_of(cfg: Config, inputs: dict[str, Artifact]) -> tuple[Path, dict, dict | None]:
    """(folder, what the manifest records, the base the teacher continued from) of cfg.teacher."""
    if cfg.teacher != "pretrain":
        path, rec = init_source(cfg.teacher)
        return path, rec, rec if "base" in rec else None
    made = Models.of(inputs["pretrain"])
    if "specialist" not in made.models:
        raise UserError("compress.teacher: pretrain made no specialist to compress")
    return made.folder("specialist"), {"stage": "pretrain", "key": made.key, "model": "specialist"}, made.init_from


def calibration_windows(streams: dict[str, np.ndarray], n: int, length: int) -> np.ndarray:
    """`n` windows of `length` tokens, evenly spaced over the domain train streams (fewer if they are short)."""
    flat = np.concatenate([np.asarray(a) for a in streams.values()]) if streams else np.zeros(0, np.int64)
    fit = len(flat) // length
    if fit == 0:
        raise UserError(f"compress.calibration_context: the domain train split has {len(flat)} tokens, fewer than "
                        f"one calibration sequence of {length}; lower calibration_context")
    starts = np.linspace(0, (fit - 1) * length, min(n, fit)).astype(np.int64)
    return np.stack([flat[s:s + length] for s in starts]).astype(np.int64)


def student_sizes(cfg: Config, config) -> prune.Sizes:
    """The target's sizes, with those cfg.shape fixes."""
    s = prune.target_sizes(config, cfg.target(prune.param_count(config, prune.Sizes.of(config))), cfg.dims) \
        if cfg.ratio is not None or cfg.params is not None else prune.Sizes.of(config)
    fixed = cfg.shape.model_dump(exclude_none=True) if cfg.shape else {}
    s = prune.Sizes(**{**s.__dict__, **fixed})
    teacher = prune.Sizes.of(config)
    too_big = [k for k, v in s.__dict__.items() if v > getattr(teacher, k)]
    if too_big:
        raise UserError(f"compress.shape: {', '.join(too_big)} larger than the teacher's ({teacher})")
    return s


# ---- the stage --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shared:
    """What every variant is made from: the teacher and the pruned student, the data, and the figures the
    variants' metrics and cards take."""

    teacher: object
    tokenizer: object
    teacher_dir: Path
    teacher_rec: dict  # what the manifest records of the teacher
    teacher_params: int
    pruned: object
    student_params: int
    pruning: dict  # each variant's summary of the pruning record
    calibration_flops: int
    streams: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    domain: list[str]
    context: int


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    from accelerate import PartialState

    dist.init()
    curated = Curated.of(inputs["curate"])
    teacher_dir, teacher_rec, init_from = teacher_of(cfg, inputs)
    teacher, tokenizer = load_model(teacher_dir)
    device = PartialState().device
    teacher.to(device)
    bf16 = use_bf16(cfg.precision)
    peak = hardware.peak_flops(bf16)
    sources = list(curated.roles)
    dist.on_main(tokenize_sources, tokenizer, inputs["curate"], sources, out / "tokens")
    streams = {s: np.load(out / "tokens" / f"{s}.train.npy", mmap_mode="r") for s in sources}
    val = {s: np.load(out / "tokens" / f"{s}.val.npy", mmap_mode="r") for s in sources}
    t_params = sum(p.numel() for p in teacher.parameters())
    pruned, record = _prune(cfg, teacher, {s: streams[s] for s in curated.domain}, device, bf16, out)
    calib_flops = 2 * t_params * record["calibration_tokens"]
    metrics: dict = {"teacher": {**teacher_rec, "params": t_params}, "pruning": record, "bf16": bf16,
                     "peak_flops": peak, "world_size": dist.world_size(), "calibration_flops": calib_flops,
                     "init_from": init_from, "models": {}}
    pruning = {k: record[k] for k in ("shape", "teacher_shape", "calibration_tokens")} | {
        "removed_layers": record["layers"]["removed"],
        "importance_kept": {k: record[k]["importance_kept"] for k in ("hidden", "heads", "ffn")}}
    shared = Shared(teacher, tokenizer, teacher_dir, teacher_rec, t_params, pruned,
                    sum(p.numel() for p in pruned.parameters()), pruning, calib_flops, streams, val, curated.domain,
                    min(cfg.context or 1024, teacher.config.max_position_embeddings))
    for name in cfg.variants:
        cfg_v = cfg.model_copy(update={"lr": cfg.scratch_lr}) if VARIANTS[name].init == "scratch" else cfg
        entry = train_and_save(name=name, cfg=cfg_v, out=out, prepare=partial(_trainee, cfg, name, shared, sources),
                               tokens=token_budget(cfg, metrics["models"]), peak_flops=peak, bf16=bf16, stage=NAME)
        metrics["models"][name] = {**entry, "pruning": pruning}  # a run from before `pruning` was recorded too
    if dist.is_main():
        _print_summary(metrics)
    return metrics


def _prune(cfg: Config, teacher, streams: dict[str, np.ndarray], device, bf16: bool, out: Path) -> tuple[object, dict]:
    """(the pruned teacher, the pruning record): importance measured on calibration windows of the domain
    train `streams` (every score in out/importance.json), the student's sizes and the structures kept."""
    import torch

    windows = calibration_windows(streams, cfg.calibration, cfg.calibration_context)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    imp = prune.importance(teacher, windows, micro_batch=8, autocast=autocast)
    sizes = student_sizes(cfg, teacher.config)
    keep = prune.choose(imp, teacher.config, sizes)
    record = prune.record(imp, keep, teacher.config, sizes)
    dist.on_main(lambda: (out / "importance.json").write_text(json.dumps(imp.__dict__)))
    pruned = prune.prune(teacher, keep)
    t_params = sum(p.numel() for p in teacher.parameters())
    s_params = sum(p.numel() for p in pruned.parameters())
    info(f"  compress · teacher {t_params / 1e6:.1f}M -> student {s_params / 1e6:.1f}M ({s_params / t_params:.1%}): "
         f"{sizes.layers}/{teacher.config.num_hidden_layers} layers, hidden {sizes.hidden}, heads "
         f"{sizes.heads}/{sizes.kv_heads} kv, ffn {sizes.ffn}; importance on {imp.tokens:,} domain tokens "
         f"(layers removed: {record['layers']['removed']})")
    return pruned, record


def _trainee(cfg: Config, name: str, sh: Shared, sources: list[str]) -> Trainee:
    """Variant `name` ready to train (or, `pruned`, to save as it is): the student, the same batches as every
    other variant, the distillation loss for a -kd one, and what its metrics and card say."""
    v = VARIANTS[name]
    model = _student(v, sh.pruned, cfg.seed)
    shape_ = {**shape_of(model, sh.context), "head_dim": prune.head_dim(model.config)}
    m = {"variant": name, "init": v.init, "loss": v.loss, "shape": shape_,
         "teacher": {**sh.teacher_rec, "params": sh.teacher_params}, "tokens": 0, "steps": 0,
         "base": sh.teacher_rec if "stage" in sh.teacher_rec and v.init == "pruned" else None, "pruning": sh.pruning}
    data = {"teacher": str(sh.teacher_rec.get("base") or sh.teacher_rec.get("model") or sh.teacher_dir),
            "init": "pruned teacher" if v.init == "pruned" else "random",
            "loss": {"kd": f"{cfg.alpha:g}*KL(T={cfg.temperature:g}) + {1 - cfg.alpha:g}*LM", "lm": "LM"}.get(
                v.loss, "none (not trained after pruning)"),
            "sources": ", ".join(sources)}
    about = (f"A {sh.student_params / 1e6:.1f}M-parameter Llama model made by slmforge's compress stage from "
             f"{data['teacher']} ({sh.teacher_params / 1e6:.1f}M): {data['init']}, trained with {data['loss']}.")
    sampler = Sampler(sh.streams, sh.domain, sh.context, cfg.seed) if v.loss else None  # the same batches for all
    loss = Distiller(sh.teacher, cfg.alpha, cfg.temperature) if v.loss == "kd" else None
    return Trainee(model, sh.tokenizer, shape_, sampler, sh.val, partial(_describe, cfg, v, m, data, sh), loss, about)


def _describe(cfg: Config, v: Variant, m: dict, data: dict, sh: Shared, run: dict | None) -> tuple[dict, dict]:
    """(metrics, card data) of a variant: the training run's figures and FLOPs (the teacher's forward
    passes too when distilled; with the calibration pass for a pruned start)."""
    if run is not None:
        m = {**m, **run, "flops": 6 * sh.student_params * run["tokens"]
             + (2 * sh.teacher_params * run["tokens"] if v.loss == "kd" else 0)}
        if v.loss == "kd":
            m.update(alpha=cfg.alpha, temperature=cfg.temperature)
    return {**m, "flops_with_pruning": m.get("flops", 0) + (sh.calibration_flops if v.init == "pruned" else 0)}, data


def _student(v: Variant, pruned, seed: int):
    """The pruned model (a copy, so every variant starts from the same weights) or a fresh one of its shape."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    if v.init == "pruned":
        return copy.deepcopy(pruned)
    torch.manual_seed(seed)
    return LlamaForCausalLM(copy.deepcopy(pruned.config))


def _print_summary(metrics: dict) -> None:
    from rich.table import Table

    t = Table(title=f"compress (teacher {metrics['teacher']['params'] / 1e6:.1f}M)")
    for col in ("variant", "params", "tokens", "train loss", "val loss (domain)", "tok/s", "time"):
        t.add_column(col)
    for name, m in metrics["models"].items():
        val = {k: v for k, v in (m.get("val") or {}).items() if k not in ("step", "tokens")}
        t.add_row(name, f"{m['shape']['params'] / 1e6:.2f}M", f"{m['tokens'] / 1e6:.3f}M",
                  f"{m['final_loss']:.3f}" if m.get("final_loss") is not None else "-",
                  ", ".join(f"{k} {v:.3f}" for k, v in val.items()) or "-",
                  f"{m['tokens_per_s']:,.0f}" if m.get("tokens_per_s") else "-",
                  f"{m['train_time_s']:.0f}s" if m.get("train_time_s") else "-")
    console.print(t)
