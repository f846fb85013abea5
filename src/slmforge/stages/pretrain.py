"""pretrain: train a specialist (and a same-size generalist baseline) with a plain PyTorch loop
(slmforge.training.loop: mixture schedule, WSD, checkpoints and exact resume, accelerate).

- Data (slmforge.training.packing): each source's train and val splits are tokenized once, before training
  (DESIGN: never alongside it), into flat token files; every document starts with BOS and ends with
  EOS. Training windows of `context + 1` tokens are cut from the stream (packed sequences) and
  visited in a fresh random order every epoch.
- From scratch (a model of `model:`'s size for the stage's tokenizer), or continued (DAPT) from a
  pretrained base (`init_from`), optionally with domain tokens added to its vocabulary.
The control (`baseline: true`), the model the specialist must beat to show a domain effect: from scratch,
the generalist (the same shape and number of tokens, trained on the general sources with the general
tokenizer); in DAPT, `recovered` (the same base continued for the same tokens and schedule on the general
sources only: any full-precision training of a quantized base recovers some of its error on every kind
of text, so only a gain over this twin is the domain's). Output: `<run>/specialist/` and
`<run>/generalist/` or `<run>/recovered/` (HF folders).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from slmforge import dist, hardware
from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.common import read_jsonl
from slmforge.console import console, info
from slmforge.errors import UserError
from slmforge.hardware import use_bf16
from slmforge.models.bases import base_name, folder_or_name
from slmforge.models.dapt import expand_vocabulary, init_source
from slmforge.models.modeling import ModelSize, build_model, load_model, shape_of
from slmforge.records import Curated, Tokenized
from slmforge.training.loop import Mixture, TrainConfig, Trainee, token_budget, train_and_save
from slmforge.training.packing import Sampler, tokenize_sources, tokenize_texts

NAME = "pretrain"
INPUTS = ("curate", "tokenizer")


class Config(TrainConfig):
    """Model size, where to start from, and the loop's budget and optimisation (TrainConfig). Derived
    values are printed and go to the manifest."""

    model: ModelSize = Field(default_factory=ModelSize)
    init_from: str | None = Field(None, description="continue pretraining (DAPT) from a base (`slmforge base list`, "
                                                    "e.g. smollm2-135m) or a local HF folder, with its own tokenizer")
    expand_vocab: int = Field(0, ge=0, description="DAPT: add this many domain-tokenizer tokens to the base's "
                                                   "vocabulary (the ones that save most base tokens on the domain "
                                                   "train split), each starting as the mean of its pieces")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                                            "memory, ~30% more compute): for large bases")
    baseline: bool = Field(True, description="also train the control on the general sources for the same tokens and "
                                             "schedule: a same-size generalist from scratch, or with init_from the "
                                             "base continued on general text (`recovered`)")
    reading: float = Field(0.0, ge=0, lt=1, description="share of the specialist's domain sequences from the synth "
                                                        "stage's reading-comprehension texts (synth.kinds: [reading])")

    def key_dict(self) -> dict:
        d = super().key_dict()
        if not d["reading"]:  # off: the key of a run from before the setting existed
            del d["reading"]
        return d

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A folder (relative to the recipe) when one is there, else a base name such as smollm2-135m."""
        return None if v is None else folder_or_name(v, info)

    @model_validator(mode="after")
    def _expand_needs_a_base(self):
        if self.expand_vocab and not self.init_from:
            raise ValueError("expand_vocab: needs init_from (a base to expand); a scratch model has the domain "
                             "tokenizer already")
        return self


def external(cfg: Config) -> dict:
    """The identity of init_from: a named base's (bases.fingerprint), a folder's files
    (artifacts.fingerprint), so that replacing or editing it re-runs pretrain."""
    from slmforge.artifacts import fingerprint
    from slmforge.models import bases

    if not cfg.init_from:
        return {}
    name = base_name(cfg.init_from)
    return {"init_from": bases.fingerprint(name) if name else fingerprint(cfg.init_from)}


def needs(cfg: Config) -> tuple[str, ...]:
    """curate and tokenizer; and synth, whose reading-comprehension texts `reading` mixes in."""
    return INPUTS + (("synth",) if cfg.reading else ())


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in needs(cfg)}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out), external=external(cfg),
                       resumable=True, force=force,
                       distributed=True)


def reading_texts(synth: Artifact) -> list[str]:
    rows = read_jsonl(synth.path / "reading.jsonl")
    if not rows:
        raise UserError("pretrain.reading: the synth stage made no reading-comprehension texts; add `reading` to "
                        "synth.kinds, or set pretrain.reading: 0")
    return [r["text"] for r in rows]


def _model_and_tokenizer(cfg: Config, name: str, tok_art: Artifact, tok_dir: str, init: Path | None):
    """With `init` (cfg.init_from's folder) the specialist and its control continue from it, at model.context
    or else the base's context up to 1024 tokens; else a fresh model for the stage's tokenizer (the
    generalist's: the general tokenizer)."""
    from transformers import AutoTokenizer

    if init is not None:  # the specialist, or its control `recovered`
        model, tokenizer = load_model(init)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        context = min(cfg.model.context or 1024, model.config.max_position_embeddings)
        return model, tokenizer, shape_of(model, context)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_art.path / tok_dir), local_files_only=True)
    model, shape_ = build_model(cfg.model, tokenizer, seed=cfg.seed)
    return model, tokenizer, shape_


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    import torch

    dist.init()
    curated = Curated.of(inputs["curate"])
    domain = Tokenized.of(inputs["tokenizer"]).trained_on
    general = curated.general
    bf16 = use_bf16(cfg.precision)
    peak = hardware.peak_flops(bf16)
    torch.manual_seed(cfg.seed)

    plans = [("specialist", list(curated.roles), "tokenizer")]
    if cfg.baseline and general:
        plans.append(("recovered", general, None) if cfg.init_from else ("generalist", general, "general_tokenizer"))
    metrics: dict = {"bf16": bf16, "peak_flops": peak, "world_size": dist.world_size(), "models": {}}
    init = None
    if cfg.init_from:  # evaluate compares the DAPT specialist with this base (its generalist baseline)
        init, metrics["init_from"] = init_source(cfg.init_from)
    for name, sources, tok_dir in plans:
        control = name != "specialist"  # the same steps, batch and learning rates, general text only
        cfg_m = cfg.model_copy(update={"mixture": Mixture(schedule="constant", domain_fraction=0.0)}) if control else cfg
        prepare = partial(_trainee, cfg, name, sources, tok_dir, inputs, init, domain, metrics, out, bf16)
        metrics["models"][name] = train_and_save(name=name, cfg=cfg_m, out=out, prepare=prepare,
                                                 tokens=token_budget(cfg, metrics["models"]), peak_flops=peak,
                                                 bf16=bf16, stage=NAME)
    if dist.is_main():
        _print_summary(metrics)
    return metrics


def _trainee(cfg: Config, name: str, sources: list[str], tok_dir: str | None, inputs: dict[str, Artifact],
             init: Path | None, domain: list[str], metrics: dict, out: Path, bf16: bool) -> Trainee:
    """The model `name` ready to train: built or loaded (the specialist's vocabulary expanded when asked,
    its report in metrics["expand_vocab"]), its token files and sampler, and how its metrics and card read."""
    model, tokenizer, shape_ = _model_and_tokenizer(cfg, name, inputs["tokenizer"], tok_dir, init)
    if cfg.expand_vocab and name == "specialist":
        curated = Curated.of(inputs["curate"])
        texts = {split: [r["text"] for s in domain for r in curated.documents(split, s, columns=["text"])]
                 for split in ("train", "val")}
        model, tokenizer, metrics["expand_vocab"] = expand_vocabulary(
            model, tokenizer, inputs["tokenizer"].path / "tokenizer", texts["train"], texts["val"], cfg.expand_vocab)
        shape_["params"] = sum(p.numel() for p in model.parameters())
    sampler, val, sources, unique = _batches(cfg, name, tokenizer, inputs, sources, domain, shape_["context"], out)
    info(f"  pretrain · {name}: {shape_['params'] / 1e6:.2f}M params, depth {shape_['depth']}, width "
         f"{shape_['hidden_size']}, heads {shape_['num_attention_heads']}/{shape_['num_key_value_heads']} kv, "
         f"ffn {shape_['intermediate_size']}, context {shape_['context']}; "
         f"{'bf16 autocast' if bf16 else 'fp32'}; {unique / 1e6:.2f}M train tokens")
    describe = partial(_describe, cfg, name, sources, tok_dir, unique, shape_, metrics.get("init_from"))
    return Trainee(model, tokenizer, shape_, sampler, val, describe)


def _batches(cfg: Config, name: str, tokenizer, inputs: dict[str, Artifact], sources: list[str], domain: list[str],
             context: int, out: Path) -> tuple[Sampler, dict[str, np.ndarray], list[str], int]:
    """(sampler, validation tokens, sources, unique train tokens) of model `name`: each source tokenized once
    into out/tokens/<name>/, and for the specialist with `reading` the synth stage's reading texts too."""
    folder = out / "tokens" / name
    dist.on_main(tokenize_sources, tokenizer, inputs["curate"], sources, folder)
    streams = {s: np.load(folder / f"{s}.train.npy", mmap_mode="r") for s in sources}
    val = {s: np.load(folder / f"{s}.val.npy", mmap_mode="r") for s in sources}
    mixed = name == "specialist" and cfg.reading
    if mixed:  # reading-comprehension documents from the train split: a domain source with a fixed share
        dist.on_main(tokenize_texts, tokenizer, reading_texts(inputs["synth"]), "reading", folder / "reading.train.npy")
        streams["reading"] = np.load(folder / "reading.train.npy", mmap_mode="r")
        sources = [*sources, "reading"]
    sampler = Sampler(streams, [*domain, "reading"] if name == "specialist" else [], context, cfg.seed,
                      {"reading": cfg.reading} if mixed else None)
    if not sampler.domain and not sampler.general:
        raise UserError(f"pretrain: no training text for {name} (sources {', '.join(sources)}); check curate")
    return sampler, val, sources, sum(len(a) for a in streams.values())


def _describe(cfg: Config, name: str, sources: list[str], tok_dir: str | None, unique: int, shape_: dict,
              init_rec: dict | None, run: dict) -> tuple[dict, dict]:
    """(metrics, card data) of a trained model; a control says what it controls for (evaluate's gate and
    the report read it)."""
    data = {"sources": ", ".join(sources), "tokenizer": tok_dir if not cfg.init_from else cfg.init_from,
            **({"continued from": cfg.init_from} if cfg.init_from else {}),
            "unique train tokens": unique, "epochs over the domain": run["domain_epochs"]}
    m = {**run, "shape": shape_, "sources": sources, "unique_train_tokens": int(unique),
         "flops": 6 * shape_["params"] * run["tokens"]}
    if name != "specialist":
        m["control"] = {"of": "specialist", "text": "general", "tokens": run["tokens"], "steps": run["steps"],
                        **({"base": init_rec.get("base") or cfg.init_from,
                            "quantized": init_rec.get("quantized")} if cfg.init_from else {})}
    return m, data


def _print_summary(metrics: dict) -> None:
    from rich.table import Table

    t = Table(title="pretrain")
    for col in ("model", "params", "tokens", "steps", "epochs (domain)", "train loss", "tok/s", "MFU", "time"):
        t.add_column(col)
    for name, m in metrics["models"].items():
        t.add_row(name, f"{m['shape']['params'] / 1e6:.2f}M", f"{m['tokens'] / 1e6:.2f}M", str(m["steps"]),
                  f"{m['domain_epochs']:.2f}", f"{m['final_loss']:.3f}", f"{m['tokens_per_s']:,.0f}",
                  f"{m['mfu']:.1%}" if m["mfu"] else "-", f"{m['train_time_s']:.0f}s")
    console.print(t)
