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
import math
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
from slmforge.training.loop import TrainConfig, save_snapshot, save_trained, train_one
from slmforge.training.packing import Sampler, tokenize_sources

NAME = "compress"
INPUTS = ("curate",)
VARIANTS = ("pruned", "pruned-kd", "pruned-lm", "scratch-kd", "scratch-lm")


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
    variants: list[Literal[VARIANTS]] = Field(  # type: ignore[valid-type]
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


def student_shape(cfg: Config, config) -> prune.Shape:
    """The target's shape, with the sizes cfg.shape fixes."""
    s = prune.target_shape(config, cfg.target(prune.param_count(config, prune.Shape.of(config))), cfg.dims) \
        if cfg.ratio is not None or cfg.params is not None else prune.Shape.of(config)
    fixed = cfg.shape.model_dump(exclude_none=True) if cfg.shape else {}
    s = prune.Shape(**{**s.__dict__, **fixed})
    teacher = prune.Shape.of(config)
    too_big = [k for k, v in s.__dict__.items() if v > getattr(teacher, k)]
    if too_big:
        raise UserError(f"compress.shape: {', '.join(too_big)} larger than the teacher's ({teacher})")
    return s


# ---- the stage --------------------------------------------------------------------------------------------
def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    import torch
    from accelerate import PartialState

    dist.init()
    curated = Curated.of(inputs["curate"])
    teacher_dir, teacher_rec, init_from = teacher_of(cfg, inputs)
    teacher, tokenizer = load_model(teacher_dir)
    device = PartialState().device
    teacher.to(device)
    bf16 = use_bf16(cfg.precision)
    peak = hardware.peak_flops(bf16)
    context = min(cfg.context or 1024, teacher.config.max_position_embeddings)
    sources = list(curated.roles)
    dist.on_main(tokenize_sources, tokenizer, inputs["curate"], sources, out / "tokens")
    streams = {s: np.load(out / "tokens" / f"{s}.train.npy", mmap_mode="r") for s in sources}
    val = {s: np.load(out / "tokens" / f"{s}.val.npy", mmap_mode="r") for s in sources}
    t_params = sum(p.numel() for p in teacher.parameters())

    windows = calibration_windows({s: streams[s] for s in curated.domain}, cfg.calibration, cfg.calibration_context)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    imp = prune.importance(teacher, windows, micro_batch=8, autocast=autocast)
    shape = student_shape(cfg, teacher.config)
    keep = prune.choose(imp, teacher.config, shape)
    record = prune.record(imp, keep, teacher.config, shape)
    dist.on_main(lambda: (out / "importance.json").write_text(json.dumps(imp.__dict__)))
    pruned = prune.prune(teacher, keep)
    s_params = sum(p.numel() for p in pruned.parameters())
    info(f"  compress · teacher {t_params / 1e6:.1f}M -> student {s_params / 1e6:.1f}M ({s_params / t_params:.1%}): "
         f"{shape.layers}/{teacher.config.num_hidden_layers} layers, hidden {shape.hidden}, heads "
         f"{shape.heads}/{shape.kv_heads} kv, ffn {shape.ffn}; importance on {imp.tokens:,} domain tokens "
         f"(layers removed: {record['layers']['removed']})")

    calib_flops = 2 * t_params * imp.tokens
    metrics: dict = {"teacher": {**teacher_rec, "params": t_params}, "pruning": record, "bf16": bf16,
                     "peak_flops": peak, "world_size": dist.world_size(), "calibration_flops": calib_flops,
                     "init_from": init_from, "models": {}}
    tokens_budget = int(parse_count(cfg.tokens)) if cfg.tokens else None
    pruning = {k: record[k] for k in ("shape", "teacher_shape", "calibration_tokens")} | {
        "removed_layers": record["layers"]["removed"],
        "importance_kept": {k: record[k]["importance_kept"] for k in ("hidden", "heads", "ffn")}}
    for name in cfg.variants:
        final_dir = out / name
        if (final_dir / "model.safetensors").is_file() and (final_dir / "metrics.json").is_file():
            metrics["models"][name] = {**json.loads((final_dir / "metrics.json").read_text()), "pruning": pruning}
            tokens_budget = tokens_budget or metrics["models"][name]["tokens"] or None
            continue
        model = _student(name, pruned, cfg.seed)
        shape_ = {**shape_of(model, context), "head_dim": prune.head_dim(model.config)}
        kd = name.endswith("-kd")
        m = {"variant": name, "init": name.split("-")[0], "loss": "kd" if kd else ("lm" if "-" in name else None),
             "shape": shape_, "teacher": metrics["teacher"], "tokens": 0, "steps": 0,
             "base": teacher_rec if "stage" in teacher_rec and name.startswith("pruned") else None,
             "pruning": pruning}
        if name == "pruned":
            result = None
        else:
            sampler = Sampler(streams, curated.domain, context, cfg.seed)  # every variant sees the same batches
            n_seq = max(1, cfg.batch_tokens // context)
            total_steps = math.ceil(tokens_budget / (n_seq * context)) if tokens_budget else None
            cfg_v = cfg.model_copy(update={"lr": cfg.scratch_lr}) if name.startswith("scratch") else cfg
            loss = Distiller(teacher, cfg.alpha, cfg.temperature) if kd else None
            snapshot = partial(save_snapshot, tokenizer=tokenizer, root=final_dir / "snapshots")
            result = train_one(name, cfg_v, model, shape_, sampler, val, out, total_steps, peak, bf16, snapshot,
                               stage="compress", loss=loss)
            tokens_budget = tokens_budget or result["tokens"]
            model = result["model"]
            m.update({k: v for k, v in result.items() if k not in ("model", "log", "val_log")})
            m["flops"] = 6 * s_params * result["tokens"] + (2 * t_params * result["tokens"] if kd else 0)
            if kd:
                m.update(alpha=cfg.alpha, temperature=cfg.temperature)
        m["flops_with_pruning"] = m.get("flops", 0) + (calib_flops if name.startswith("pruned") else 0)
        data = {"teacher": str(teacher_rec.get("base") or teacher_rec.get("model") or teacher_dir),
                "init": "pruned teacher" if name.startswith("pruned") else "random",
                "loss": {"kd": f"{cfg.alpha:g}*KL(T={cfg.temperature:g}) + {1 - cfg.alpha:g}*LM", "lm": "LM"}.get(
                    m["loss"], "none (not trained after pruning)"),
                "sources": ", ".join(sources)}
        about = (f"A {s_params / 1e6:.1f}M-parameter Llama model made by slmforge's compress stage from "
                 f"{data['teacher']} ({t_params / 1e6:.1f}M): {data['init']}, trained with {data['loss']}.")
        dist.on_main(save_trained, model, tokenizer, shape_, _result(result, m), final_dir, name, data, m,
                     out / f"{name}.ckpt.pt", about)
        metrics["models"][name] = m
    if dist.is_main():
        _print_summary(metrics)
    return metrics


def _student(name: str, pruned, seed: int):
    """The pruned model (a copy, so every variant starts from the same weights) or a fresh one of its shape."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    if name.startswith("pruned"):
        return copy.deepcopy(pruned)
    torch.manual_seed(seed)
    return LlamaForCausalLM(copy.deepcopy(pruned.config))


def _result(result: dict | None, m: dict) -> dict:
    """What save_trained's card and logs take; for the untrained `pruned` variant, empty logs."""
    if result is not None:
        return result
    return {"tokens": 0, "steps": 0, "final_loss": None, "val": {}, "tokens_per_s": None, "mfu": None,
            "log": [], "val_log": []}


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
