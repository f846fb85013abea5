"""sft: domain supervised fine-tuning with trl's SFTTrainer, and step-by-step rationale distillation.

Data: the synth stage's items in chat format, through the tokenizer's chat template, with the loss on
assistant tokens only (the template's {% generation %} marks) and packing. Each item trains its own
prompt and, for mcq items, two more instruction-style phrasings of the same task (several templates
per task, as instruction-tuning collections do). None is a bench prompt template (`prompts.py`): a
benchmark must judge what the model learnt, not whether it saw the benchmark's prompt shape
(tests/stages/test_sft.py checks every training prompt against every bench template).
A held-out slice (`eval_fraction`, by a hash of the item id) gives the eval loss.

Mixture: domain tasks plus `general_share` of general examples as a regulariser (the "cocktail
effect": mixing in general data reduces forgetting). They come from `general_data` (a JSONL of chat
`messages`) or, by default, from the extractive teacher run on the general sources' train split.

Models (`<run>/<name>/`, full weights, loadable offline like every slmforge model):
- `sft`: the pretrained specialist fine-tuned on the domain tasks (rationale items as question -> answer).
- `sft-rationale` (`distill: true`, "Distilling step-by-step", Hsieh et al. 2023): every rationale item
  (a model teacher's reasoning) or evidence item (the extractive teacher's quoted sentences)
  is two tasks with prefixes, `[label] question -> answer` and `[rationale] question -> rationale`,
  and every other example is a `[label]` task. The loss is alpha * L_label + (1 - alpha) * L_rationale
  (per-token means): the rationale examples are repeated until the two tasks' assistant-token totals
  stand at alpha : 1 - alpha, which makes the per-token mean over an epoch exactly that weighted sum,
  so trl's trainer is called as it is. The model's chat template adds `[label] ` to every user turn
  that does not start with `[rationale]`, so at inference only the label task is used.

LoRA (`lora: {r: 16}`) trains adapters through peft and merges them into full weights at the end (the
adapter is kept in `adapter/`); full fine-tuning is the default for slmforge's own small models.
Trainer checkpoints go to `trainer-<name>/` every `save_steps`; a killed run resumes from the last.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import RecipePath
from slmforge.console import info
from slmforge.errors import UserError
from slmforge.models.chat import training_template
from slmforge.records import Curated, Models, Synthesized
from slmforge.synthetic.synthesis import (
    REASONS,  # items with a `rationale` text: the second task of distillation
)
from slmforge.training.posttrain import (
    PostTrainConfig,
    finish,
    fit,
    held_out,
    params_changed,
    snapshot_params,
    trainer_args,
)

NAME = "sft"
INPUTS = ("curate", "pretrain", "synth")
Kind = Literal["instruction", "qa", "mcq", "completion", "summary", "rationale", "evidence"]
KINDS: tuple[str, ...] = get_args(Kind)
# summaries are left out by default: a section plus its lead is several times a qa item, so they took
# most of the demo's SFT tokens (at commit 8a5b23f), and the SFT mixture asked for is instructions, qa,
# mcq and completion
DEFAULT_KINDS = ("instruction", "qa", "mcq", "completion", "rationale", "evidence")
LABEL, RATIONALE = "[label] ", "[rationale] "


class Lora(BaseModel):
    """LoRA adapters (peft) instead of full fine-tuning; merged into full weights when training ends."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


class Config(PostTrainConfig):
    """What to fine-tune, on which data, and how."""

    base: str = Field("specialist", description="a model of the pretrain stage, or a local HF folder")
    kinds: list[Kind] = Field(list(DEFAULT_KINDS), description=f"synth item kinds to train on, of {', '.join(KINDS)}")
    distill: bool = Field(True, description="also train sft-rationale (step-by-step distillation)")
    alpha: float = Field(0.5, gt=0, lt=1, description="distill: weight of the label task; 1 - alpha: the rationale")
    general_share: float = Field(0.1, ge=0, lt=1, description="share of training examples from general data")
    general_data: RecipePath | None = Field(None, description="JSONL of chat `messages` (default: extractive items "
                                                       "from the general sources' train split)")
    epochs: float = Field(2.0, gt=0)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, ge=1, description="packed sequences per step per process")
    max_length: int = Field(256, ge=16, description="tokens per packed sequence (at most the model's context)")
    packing: Literal["auto", "bfd", "wrapped", "none"] = Field(
        "auto", description="auto: bfd (best-fit, padding-free) on a GPU, wrapped on a CPU")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lora: Lora | None = Field(None, description="train LoRA adapters instead of all weights")


def external(cfg: Config) -> dict:
    """The contents of general_data and of a base that is a local folder, so that editing either re-runs sft."""
    from slmforge.artifacts import fingerprint

    folder = Path(cfg.base)
    return ({"general_data": fingerprint(cfg.general_data)} if cfg.general_data else {}) \
        | ({"base": fingerprint(folder)} if (folder / "config.json").is_file() else {})


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in INPUTS}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out), resumable=True, force=force,
                       distributed=True, external=external(cfg))


# ---- data -------------------------------------------------------------------------------------------
def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def examples_of(item: dict) -> list[list[dict]]:
    """The chat examples one synth item trains: its own prompt and, for mcq items, two instruction-style
    phrasings of the cloze (never a bench prompt template)."""
    kind, out = item["kind"], [item["messages"]]
    if kind == "mcq":
        term = item["options"][item["answer_index"]]
        sentence = item["question"].replace("_____", term, 1)
        out += [_chat(f"Which term from the documentation fills the blank?\n\n{item['question']}", term),
                _chat(f"Here is a sentence from the documentation: {sentence}\n\nName the term that goes in the "
                      f"blank of this copy of it: {item['question']}", term)]
    elif kind in REASONS:
        out = [_chat(item["question"], item["answer"])]
    return out


def _messages(p: Path) -> list[list[dict]]:
    """The `messages` lists of a chat JSONL file; a bad line is a UserError naming it."""
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line).get("messages")
        except (ValueError, AttributeError):
            msgs = None
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                         for m in msgs)):
            raise UserError(f"sft.general_data: {p} line {i + 1} needs a `messages` list of {{role, content}}")
        rows.append(msgs)
    return rows


def general_examples(cfg: Config, curated: Curated, n: int) -> list[list[dict]]:
    """n general chat examples: from cfg.general_data, or extractive items of the general train split."""
    if n <= 0:
        return []
    rng = random.Random(cfg.seed)
    if cfg.general_data:
        p = Path(cfg.general_data)
        if not p.is_file():
            raise UserError(f"sft.general_data: {p} does not exist")
        rows = _messages(p)
        rng.shuffle(rows)
        return rows[:n]
    from slmforge.synthetic.extractive import ExtractiveTeacher, Pool
    from slmforge.synthetic.synthesis import split_chunks

    chunks = split_chunks(curated, "train", curated.general, 1500)
    rng.shuffle(chunks)
    teacher = ExtractiveTeacher(Pool.build(chunks[:2000]), cfg.seed)
    out: list[list[dict]] = []
    for c in chunks:
        for kind in ("completion", "summary", "instruction"):
            out += [ex for it in teacher.items(c, kind, 1) for ex in examples_of(it)[:1]]
        if len(out) >= n:
            break
    return out[:n]


def build_data(cfg: Config, items: list[dict], general: list[list[dict]], tokenizer, distill: bool) -> dict:
    """{"train": [messages], "eval": [messages], "stats": {...}} for one model."""
    train, held, rationale = [], [], []
    for it in items:
        if it["kind"] not in cfg.kinds:
            continue
        (held if held_out(it["id"], cfg.eval_fraction) else train).extend(examples_of(it))
        if distill and it["kind"] in REASONS and not held_out(it["id"], cfg.eval_fraction):
            rationale.append(_chat(RATIONALE + it["question"], it["rationale"]))
    if cfg.eval_fraction > 0 and not held and len(train) > 1:  # a small corpus: hold out one example at least
        held.append(train.pop())
    train += general
    stats = {"domain_examples": len(train) - len(general), "general_examples": len(general), "eval_examples": len(held)}
    if distill and rationale:
        def tokens(row):
            return len(tokenizer(row[-1]["content"], add_special_tokens=False)["input_ids"])

        sized = [(r, tokens(r)) for r in rationale]
        t_label, t_rat = sum(map(tokens, train)), sum(n for _, n in sized)
        want = t_label * (1 - cfg.alpha) / cfg.alpha  # rationale-task tokens that give alpha : 1 - alpha
        reps, rest = divmod(want, t_rat)
        random.Random(cfg.seed).shuffle(sized)
        picked, acc = [], 0
        for r, n in sized:  # a partial repeat, whole examples, closest to the wanted total
            if acc + n / 2 > rest:
                break
            picked.append(r)
            acc += n
        train += rationale * int(reps) + picked
        got = t_rat * int(reps) + acc
        stats.update(rationale_examples=len(rationale) * int(reps) + len(picked),
                     label_tokens=t_label, rationale_tokens=got, alpha_realised=round(t_label / (t_label + got), 4))
    random.Random(cfg.seed).shuffle(train)
    return {"train": train, "eval": held, "stats": stats}


# ---- training ---------------------------------------------------------------------------------------
def _base(cfg: Config, pretrain: Models) -> Path:
    models = pretrain.models
    if cfg.base in models:
        return pretrain.folder(cfg.base)
    p = Path(cfg.base)
    if not (p / "config.json").is_file():
        raise UserError(f"sft.base: {cfg.base!r} is neither a pretrain model ({', '.join(models)}) nor a local HF "
                        "model folder")
    return p


def train_model(cfg: Config, name: str, base: Path, data: dict, out: Path, distill: bool = False) -> dict:
    """Fine-tune `base` on data["train"] with trl's SFTTrainer; the merged model goes to out/name."""
    import torch
    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from slmforge.models.modeling import load_model

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated")  # trl's own config
    model, tok = load_model(base)
    tok.chat_template = training_template(tok, *((LABEL, RATIONALE.strip()) if distill else ()))
    before = snapshot_params(model)
    max_length = min(cfg.max_length, model.config.max_position_embeddings)
    work = out / f"trainer-{name}"
    # On CPU, trl's best-fit packing (padding-free: position ids, no padding) trains 1,262 real tokens/s
    # against 2,135 for plain wrapped packing and 753 unpacked (demo specialist, 16 x 256 tokens, bf16;
    # benchmarks/sft_packing.py): without a flash-attention kernel the packed layout costs time
    strategy = cfg.packing if cfg.packing != "auto" else ("bfd" if torch.cuda.is_available() else "wrapped")
    args = SFTConfig(
        **trainer_args(cfg, work, bool(data["eval"]), cfg.warmup_ratio), weight_decay=cfg.weight_decay,
        max_length=max_length, packing=strategy != "none", packing_strategy=strategy if strategy != "none" else "bfd",
        assistant_only_loss=True, logging_steps=10,
    )
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, peft_config=peft_config,
                         train_dataset=Dataset.from_list([{"messages": m} for m in data["train"]]),
                         eval_dataset=Dataset.from_list([{"messages": m} for m in data["eval"]]) if data["eval"] else None)
    run = fit(trainer, work, f"sft · {name}", bool(data["eval"]))
    model = trainer.model
    if cfg.lora:
        model.save_pretrained(str(out / name / "adapter"))
        model = model.merge_and_unload()
    wall = run["wall"]
    tokens = int(trainer.state.num_input_tokens_seen or 0)  # counted by the trainer (trainer_args), no padding
    return {"model": model, "tokenizer": tok, "log": run["log"], "wall": wall, "tokens": tokens,
            "metrics": {**run["metrics"], "tokens_per_s": round(tokens / wall, 1) if wall else None,
                        "params_changed": params_changed(before, model),
                        "lora": cfg.lora.model_dump() if cfg.lora else None}}


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    from transformers import AutoTokenizer

    from slmforge import dist

    dist.init()
    pre = Models.of(inputs["pretrain"])
    base = _base(cfg, pre)
    # a DAPT specialist's base stays this model's generalist baseline downstream (evaluate scores it)
    init_from = pre.init_from if cfg.base == "specialist" else None
    items = Synthesized.of(inputs["synth"]).of_kinds(cfg.kinds)
    if not items:
        raise UserError(f"sft: the synth stage made no items of the kinds {', '.join(cfg.kinds)}; check synth.kinds")
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)  # only to count tokens (alpha)
    n_domain = sum(len(examples_of(it)) for it in items)
    general = general_examples(cfg, Curated.of(inputs["curate"]), round(n_domain * cfg.general_share / (1 - cfg.general_share)))
    plans = [("sft", False)]
    if cfg.distill and any(it["kind"] in REASONS for it in items):
        plans.append(("sft-rationale", True))
    models = {}
    for name, distill in plans:
        if (out / name / "metrics.json").is_file():  # finished before a restart
            models[name] = json.loads((out / name / "metrics.json").read_text())
            continue
        data = build_data(cfg, items, general, tok, distill)
        info(f"  sft · {name}: {len(data['train'])} training examples ({data['stats']['general_examples']} general), "
             f"{len(data['eval'])} held out" + (f"; label : rationale tokens {data['stats']['alpha_realised']:.2f} : "
                                                 f"{1 - data['stats']['alpha_realised']:.2f}" if distill else ""))
        result = train_model(cfg, name, base, data, out, distill)
        entry = dist.on_main(finish, result, out, name, base, data["stats"], NAME, out / f"trainer-{name}")
        if entry is not None:  # the main process
            models[name] = entry
    _print(models)
    return {"models": models, "base": str(base), "items": len(items),
            **({"init_from": init_from} if init_from else {})}


def _print(models: dict) -> None:
    from rich.table import Table

    from slmforge.console import console

    t = Table(title="sft")
    for col in ("model", "examples", "steps", "loss first → last", "eval loss", "params changed", "tok/s", "time"):
        t.add_column(col)
    for n, m in models.items():
        t.add_row(n, str(m["data"]["domain_examples"] + m["data"]["general_examples"]), str(m["steps"]),
                  f"{_f(m['first_loss'])} → {_f(m['final_loss'])}", _f(m["eval_loss"]), m["params_changed"],
                  f"{m['tokens_per_s'] or 0:,.0f}", f"{m['train_time_s']:.0f}s")
    console.print(t)


def _f(x) -> str:
    """A loss for the summary: 3 decimals, or - when there is none."""
    return "-" if x is None else f"{x:.3f}"
