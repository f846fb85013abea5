"""What the post-training stages (sft, dpo) share: the settings every trl trainer takes, the trainer
arguments, training with resume, the held-out split, and saving the model with its card and log."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from slmforge.common import write_jsonl
from slmforge.config import StageConfig
from slmforge.console import info, progress


class PostTrainConfig(StageConfig):
    """The trainer settings of sft and dpo (each stage sets its own defaults for epochs and lr)."""

    # how often a checkpoint is written changes no weight: a resumed run gives the uninterrupted run's
    # weights (tests/stages/test_sft.py: difference 0; tests/test_faults.py: dpo within 1e-6)
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"save_steps"})

    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="held-out share of the examples (eval loss)")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="a budget in optimizer steps instead of epochs (a "
                                                          "135M model's SFT on a CPU: a few dozen)")
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1, description="examples (packed sequences, or pairs) per step per process")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=16, description="tokens per sequence (at most the model's context)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where the hardware runs it")
    save_steps: int = Field(100, ge=1, description="steps between trainer checkpoints (the unit of resume)")
    seed: int = 0


def held_out(item_id: str, fraction: float) -> bool:
    """Whether an item is in the held-out slice: a hash of its id, so the split never moves."""
    return int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def trainer_args(cfg: PostTrainConfig, work: Path, has_eval: bool, warmup: float) -> dict:
    """The TrainingArguments fields sft and dpo share."""
    import torch

    from slmforge.hardware import use_bf16

    return dict(
        output_dir=str(work), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        warmup_steps=warmup,  # < 1: a share of the steps
        eval_strategy="epoch" if has_eval else "no", save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=1, report_to="none", seed=cfg.seed, data_seed=cfg.seed, bf16=use_bf16(cfg.precision),
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",  # the tokens trained on, for 6·N·D and tokens/s
        disable_tqdm=True)  # fit() shows slmforge's bar instead


def fit(trainer, work: Path, label: str, has_eval: bool) -> dict:
    """Train (resuming from the last checkpoint in `work`), then evaluate: the result, the loss log,
    the eval figures and the metrics every post-training stage reports."""
    checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if checkpoints:
        info(f"  {label}: resuming from {checkpoints[-1].name}")
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # their tqdm bar and printed log dicts: ours instead
        trainer.remove_callback(cb)
    bar = progress_callback(label)
    trainer.add_callback(bar)
    t0 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=True if checkpoints else None)
    finally:
        bar.close()  # on_train_end is not called when training raises
    wall = time.time() - t0
    evals = trainer.evaluate() if has_eval else {}
    log = [r for r in trainer.state.log_history if "loss" in r]
    return {"wall": wall, "evals": evals, "log": log,
            "metrics": {"steps": trainer.state.global_step, "train_loss": round(result.training_loss, 4),
                        "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
                        "eval_loss": round(evals["eval_loss"], 4) if "eval_loss" in evals else None,
                        "train_time_s": round(wall, 1)}}


def progress_callback(label: str):
    """A transformers TrainerCallback that shows training as one slmforge progress bar: steps, tokens,
    tokens/s (the trainer's non-padding token count over the time since training began, as the stage's
    summary reckons it), ETA and the last logged loss."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tokens0 = time.time(), state.num_input_tokens_seen or 0
            self.bar = progress(label, state.max_steps, "steps", completed=state.global_step).__enter__()

        def on_step_end(self, args, state, control, **kw):
            dt = time.time() - self.t0
            tokens = state.num_input_tokens_seen or 0
            self.bar.update(completed=state.global_step, rate=((tokens - self.tokens0) / dt if dt else 0.0, "tok/s"),
                            tokens=f"{tokens:,} tokens")

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(loss=f"loss {logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.close()

        def close(self):
            if self.bar is not None:
                self.bar.__exit__(None, None, None)
                self.bar = None

    return _Progress()


def snapshot_params(model) -> dict:
    """A copy of the parameters before training, for `params_changed`."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def params_changed(before: dict, model) -> str:
    """'changed/total' parameter tensors of `model` against a copy taken before training."""
    import torch

    return f"{sum(not torch.equal(before[k], v.detach().cpu()) for k, v in model.named_parameters())}/{len(before)}"


def save_posttrained(result: dict, out: Path, name: str, base: Path, data_stats: dict, stage: str) -> dict:
    """The fine-tuned model as a HF folder with its card and logs; returns its manifest entry."""
    from transformers import GenerationConfig

    from slmforge.models.modeling import checkpoint_card

    model, tok = result["model"], result["tokenizer"]
    path = out / name
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    if (base / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(base)).save_pretrained(str(path))
    c = model.config
    shape = {"depth": c.num_hidden_layers, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
             "num_key_value_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size,
             "context": c.max_position_embeddings, "params": sum(p.numel() for p in model.parameters())}
    (path / "README.md").write_text(checkpoint_card(name, shape, {"base": str(base), "stage": stage, **data_stats},
                                               result["metrics"]), encoding="utf-8")
    write_jsonl(path / "train_log.jsonl", _loss_log(result["log"]))
    entry = {**result["metrics"], "shape": shape, "tokens": result["tokens"], "base": str(base), "chat": True,
             "data": data_stats}
    (path / "metrics.json").write_text(json.dumps(entry, indent=2))
    return entry


def _loss_log(log: list[dict]) -> list[dict]:
    """The trainer's loss records as train_log.jsonl's rows: step, loss and the tokens seen so far (the
    step where the trainer counted none)."""
    rows, seen = [], 0
    for r in log:
        seen = r.get("num_tokens", seen)
        rows.append({"step": r["step"], "loss": r["loss"], "tokens": seen or r["step"]})
    return rows


def finish(result: dict, out: Path, name: str, base: Path, data_stats: dict, stage: str, work: Path) -> dict:
    """On the main process (`dist.on_main(finish, ...)`): save the model, then drop its trainer checkpoints."""
    entry = save_posttrained(result, out, name, base, data_stats, stage)
    shutil.rmtree(work, ignore_errors=True)
    return entry

