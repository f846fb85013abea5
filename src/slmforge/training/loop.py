"""The training loop that pretrain and compress share: packed windows from a Sampler, the domain
mixture schedule, AdamW with WSD or cosine learning rates, gradient accumulation, bf16 autocast,
checkpoints with exact resume, validation losses, progress and accelerate (DDP) scale-out.

- Mixture: each sequence of a step comes from the domain group with probability p(step), else from
  the general group (within a group, in proportion to size). Schedules: `constant` p; `specialised`
  p from step 0 until the domain data has been seen `max_domain_epochs` times, then general only
  (Muennighoff et al. 2023: up to ~4 epochs of repetition cost little); `upsample` p, then
  `final_domain_fraction` in the last `final_part` of training (domain upsampling at the end of a
  WSD schedule, as in Llama 3 and MiniCPM).
- Optimisation: AdamW, WSD (warmup-stable-decay) or cosine learning rate, gradient accumulation to
  `batch_tokens` per step, clipping, bf16 autocast when the hardware does bf16 natively (its peak against fp32's: benchmarks/pretrain_throughput.py).
- Budget: `tokens`, or `minutes` (the step count is fixed after timing the first steps).
- Exact resume: the batch of step s is a pure function of (seed, s, sampler cursors), and a
  checkpoint holds weights, optimizer, cursors and logs; a run killed at any moment and restarted
  ends with the same weights as one that never stopped.
- Scale-out: run under `accelerate launch` (launch/*.yaml) or torchrun; every process draws the
  same global batch and trains on its share, so 2 processes follow the 1-process loss curve. `parallel:
  ddp` (accelerate's DDP) keeps a whole model and optimizer on each process; `parallel: fsdp` shards
  weights, gradients and optimizer state with FSDP2 (`fully_shard`, one unit per decoder layer) and
  checkpoints sharded (torch.distributed.checkpoint), while the finished model is gathered whole
  (slmforge.training.fsdp).
- The loss: next-token cross-entropy, or any `loss(logits, window)` a caller passes (compress's
  distillation loss), summed over the window's predicted tokens.

Reading order (nanochat's base_train.py): TrainConfig; the schedules (domain_fraction, lr_at); the loop:
LoopState (what a checkpoint resumes), Loop (the prepared pieces), setup (accelerator, autocast),
load/save_checkpoint, validate, train_step, calibrate (a minutes budget -> steps), train_one; the finished
model (save_snapshot, save_trained); train_and_save, one model of a stage from its Trainee to its folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmforge import dist, hardware
from slmforge.common import write_jsonl
from slmforge.config import StageConfig
from slmforge.console import info, progress
from slmforge.errors import UserError
from slmforge.hardware import flops_per_token, plausible_mfu
from slmforge.models.chat import stop_token_ids
from slmforge.models.lm import nll
from slmforge.models.modeling import checkpoint_card, parse_count
from slmforge.training import fsdp
from slmforge.training.packing import Sampler


class Mixture(BaseModel):
    """How much of each step comes from the domain sources, over training."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schedule: Literal["constant", "specialised", "upsample"] = Field(
        "upsample", description="constant p; specialised (p until the domain is repeated max_domain_epochs "
                                "times); upsample (p, then final_domain_fraction at the end)")
    domain_fraction: float = Field(0.8, ge=0, le=1, description="p: share of sequences from the domain sources")
    max_domain_epochs: float = Field(4.0, gt=0, description="specialised: passes over the domain data at most")
    final_domain_fraction: float = Field(1.0, ge=0, le=1, description="upsample: p in the final part")
    final_part: float = Field(0.2, ge=0, lt=1, description="upsample: the last share of steps with the final p")


class TrainConfig(StageConfig):
    """The loop's settings: budget, batch, optimiser, schedule, precision, checkpoints and logging (the
    Configs of pretrain and compress extend it)."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"checkpoint_every_min", "tensorboard", "log_every", "parallel"})

    tokens: int | str | None = Field(None, description="training budget in tokens, e.g. 2M or 200000 (or give minutes)")
    minutes: float | None = Field(None, gt=0, description="training budget in minutes (the step count is fixed after "
                                                          "timing the first steps)")
    batch_tokens: int = Field(8192, ge=16, description="tokens per optimizer step, over all processes")
    micro_batch: int = Field(16, ge=1, description="sequences per forward pass per process (memory)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate / peak")
    warmup: float = Field(0.05, ge=0, lt=1, description="share of steps spent warming up")
    schedule: Literal["wsd", "cosine"] = Field("wsd", description="warmup-stable-decay or cosine")
    decay_part: float = Field(0.2, gt=0, le=1, description="wsd: the last share of steps that decays")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.95))
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast where supported")
    compile: bool = Field(False, description="torch.compile each decoder layer (about 10 s to start for a 135M "
                                             "model, about 1.4x after on a CPU: training.compile_blocks)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes (torchrun, accelerate launch): ddp keeps a whole copy of the "
                           "model, gradients and optimizer state on each; fsdp shards all three over the "
                           "processes (FSDP2, one unit per decoder layer), for models that do not fit one device")
    mixture: Mixture = Field(default_factory=Mixture)
    eval_every: int = Field(50, ge=1, description="steps between validation losses (per source)")
    eval_tokens: int = Field(32768, ge=16, description="validation tokens per source")
    checkpoint_every_min: float = Field(5.0, gt=0, description="minutes between checkpoints")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints (in addition)")
    log_every: int = Field(10, ge=1, description="steps between log lines")
    snapshots: int = Field(0, ge=0, description="HF snapshots kept at evenly spaced steps (evaluate.select picks "
                                                 "one by a domain metric on the dev sets)")
    seed: int = 0
    tensorboard: bool = Field(False, description="also log to TensorBoard through accelerate's trackers")

    @model_validator(mode="after")
    def _budget(self):
        if (self.tokens is None) == (self.minutes is None):
            raise ValueError("give tokens or minutes as the training budget, not both. Choose one.")
        if self.tokens is not None:
            parse_count(self.tokens)
        return self


# ---- schedules --------------------------------------------------------------------------------------
def domain_fraction(m: Mixture, step: int, total: int, domain_epochs: float) -> float:
    if m.schedule == "specialised":
        return m.domain_fraction if domain_epochs < m.max_domain_epochs else 0.0
    if m.schedule == "upsample" and step >= (1 - m.final_part) * total:
        return m.final_domain_fraction
    return m.domain_fraction


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then WSD (constant, linear decay over the last `decay_part`) or cosine."""
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - 1 - warm)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    decay_start = int(total * (1 - cfg.decay_part))
    if step < decay_start:
        return cfg.lr
    t = (step - decay_start) / max(1, total - 1 - decay_start)
    return cfg.lr - (cfg.lr - floor) * min(1.0, t)


# ---- the loop ---------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """What a checkpoint holds besides weights, optimizer and sampler cursors: the steps done, the
    training time so far, the step count the schedule was pinned to, and the train and val logs."""

    step: int = 0
    elapsed: float = 0.0
    total_steps: int | None = None
    log: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)


@dataclass
class Loop:
    """The prepared pieces of one model's training run (they do not change while it runs)."""

    name: str
    cfg: TrainConfig
    acc: object  # accelerate.Accelerator
    model: object  # the prepared (possibly DDP-wrapped) model; its decoder layers compiled in place with `compile`
    opt: object
    sampler: Sampler
    val: dict[str, np.ndarray]
    shape: dict
    seq: int
    n_seq: int  # sequences per step, over all processes
    per_rank: int  # sequences per step on this process
    n_micro: int  # forward passes per step on this process
    ckpt: Path
    peak_flops: float
    bf16: bool = False  # bf16 autocast (`autocast`), else float32
    stage: str = "pretrain"  # what the progress and log lines are prefixed with
    loss: Callable | None = None  # loss(logits, window) summed over the window's tokens; None: cross-entropy
    sharded: bool = False  # FSDP2: parameters are DTensor shards, checkpoints a torch.distributed.checkpoint folder
    model_cls: type | None = None  # the model's class before fully_shard, to rebuild it whole for saving

    @property
    def tokens_per_step(self) -> int:
        return self.n_seq * self.seq


def setup(name: str, cfg: TrainConfig, model, shape_: dict, sampler: Sampler, val: dict[str, np.ndarray], out: Path,
          peak_flops: float, bf16: bool, stage: str = "pretrain", loss: Callable | None = None) -> Loop:
    """The Accelerator, AdamW (no weight decay on norms), the prepared model and the batch geometry:
    the global batch is a multiple of the world size, each process trains on its share."""
    import torch

    world, seq = dist.world_size(), shape_["context"]
    n_seq = max(world, cfg.batch_tokens // seq)
    n_seq -= n_seq % world
    per_rank = n_seq // world
    acc = accelerator(cfg, out, bf16)
    sharded = fsdp.wanted(cfg.parallel)
    model_cls = type(model)
    if sharded:
        fsdp.shard(model, acc.device)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                            fused=True)  # fused AdamW runs on CPU too (torch >= 2.4) and on GPUs
    if not sharded:
        model, opt = acc.prepare(model, opt)
    if cfg.compile:
        compile_blocks(acc.unwrap_model(model) if not sharded else model)
    if cfg.tensorboard:
        acc.init_trackers(name)
    return Loop(name=name, cfg=cfg, acc=acc, model=model, opt=opt, sampler=sampler, val=val, shape=shape_,
                seq=seq, n_seq=n_seq, per_rank=per_rank, n_micro=math.ceil(per_rank / cfg.micro_batch),
                ckpt=out / f"{name}.ckpt.pt", peak_flops=peak_flops, bf16=bf16, stage=stage, loss=loss,
                sharded=sharded, model_cls=model_cls)


def accelerator(cfg: TrainConfig, out: Path, bf16: bool):
    """accelerate's Accelerator for one run: the process group, the device, DDP and the trackers. The
    precision is the loop's own (`autocast`): accelerate keeps one mixed-precision setting per process and
    refuses an Accelerator that asks for another (pretrain after sft's trainer, or after a model trained in
    the other precision, in one Python process). So the first Accelerator of a process sets bf16 or no, a
    later one takes the setting it finds, and AutocastKwargs makes the autocast accelerate wraps a prepared
    model's forward in (with a bf16 setting) the run's own: on with bf16, off without."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import is_initialized
    from accelerate.utils import AutocastKwargs

    acc = Accelerator(mixed_precision=None if is_initialized() else "bf16" if bf16 else "no",
                      cpu=not torch.cuda.is_available(), kwargs_handlers=[AutocastKwargs(enabled=bf16)],
                      log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(out / "tensorboard"))
    if acc.mixed_precision == "fp16":  # a loss scaler would come with it; slmforge never asks for fp16
        raise UserError("this process's accelerate state is fp16 (an Accelerator made before slmforge's); "
                        "pretrain and compress train in bf16 or fp32 (`precision`): run them in a new process")
    return acc


def autocast(loop: Loop):
    """bf16 autocast on the run's device when it trains in bf16, else nothing (as accelerate's own)."""
    import torch

    return torch.autocast(loop.acc.device.type, dtype=torch.bfloat16) if loop.bf16 else contextlib.nullcontext()


def compile_blocks(model) -> int:
    """torch.compile each decoder layer in place (regional compilation); returns how many. The layers share
    one compiled graph, so SmolLM2-135M's 30 compile once (benchmarks/dapt_speed.py prints the first step,
    compile included), where compiling the whole model took several times longer in a probe at commit
    291994e for no more speed (4 x 512 tokens per micro-batch, 2 cores with AMX: 655 tok/s regional against
    463 eager in benchmarks/dapt_speed.py). The LM head and loss stay eager."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    for layer in layers:
        layer.compile()
    if not layers:  # a model that names no blocks: compile it whole
        model.compile()
    return len(layers)


def load_checkpoint(loop: Loop, total_steps: int | None) -> LoopState:
    """Restore weights, optimizer, sampler cursors and the loop state from loop.ckpt (or the sharded
    folder) if there is one."""
    import torch

    if loop.sharded:
        saved = fsdp.load(loop.model, loop.opt, loop.ckpt)
        return _resumed(loop, saved) if saved is not None else LoopState(total_steps=total_steps)
    if not loop.ckpt.is_file():
        return LoopState(total_steps=total_steps)
    saved = torch.load(loop.ckpt, map_location="cpu", weights_only=False)
    loop.acc.unwrap_model(loop.model).load_state_dict(saved["model"])
    loop.opt.load_state_dict(saved["optimizer"])
    return _resumed(loop, saved)


def _resumed(loop: Loop, saved: dict) -> LoopState:
    loop.sampler.load(saved["sampler"])
    state = LoopState(**saved["state"])
    info(f"  {loop.stage} · {loop.name}: resuming at step {state.step}")
    return state


def save_checkpoint(loop: Loop, state: LoopState) -> None:
    """Weights, optimizer, sampler cursors and the loop state (temp file, then rename). Called on every
    process: the main one writes the one file; under FSDP each writes its own shards (fsdp.save)."""
    import torch

    if loop.sharded:  # weights from the first step on (fsdp.save says why not before it)
        return fsdp.save(loop.model, loop.opt, {"sampler": loop.sampler.state(), "state": asdict(state)},
                         loop.ckpt, weights=state.step > 0)
    if dist.is_main():
        tmp = loop.ckpt.with_name(loop.ckpt.name + ".tmp")
        torch.save({"model": loop.acc.unwrap_model(loop.model).state_dict(), "optimizer": loop.opt.state_dict(),
                    "sampler": loop.sampler.state(), "state": asdict(state)}, tmp)
        os.replace(tmp, loop.ckpt)
    dist.barrier()


def full_model(loop: Loop):
    """The trained model, whole, on the main process (None on the others): under FSDP its shards are
    gathered (a collective: every process calls this) into a fresh copy of the model's class."""
    if not loop.sharded:
        return loop.acc.unwrap_model(loop.model)
    return fsdp.gather(loop.model, loop.model_cls)


def validate(loop: Loop) -> dict[str, float]:
    """Mean next-token loss per validation source, on up to eval_tokens tokens of each."""
    import torch

    cfg, seq = loop.cfg, loop.seq
    loop.model.eval()
    losses = {}
    with autocast(loop):
        for source, arr in loop.val.items():
            n = min(len(arr) - 1, cfg.eval_tokens) // seq
            if n <= 0:  # fewer than seq + 1 tokens (an empty split: -1)
                continue
            w = torch.as_tensor(np.asarray(arr[: n * seq + 1], dtype=np.int64))
            total = nll(loop.model, w[:-1].view(n, seq), w[1:].view(n, seq), cfg.micro_batch, loop.acc.device)
            losses[source] = round(total / (n * seq), 4)
    loop.model.train()
    return losses


def train_step(loop: Loop, step: int, total: int) -> tuple[float, float, float]:
    """One optimizer step on the global batch of `step`: (loss, grad norm, domain fraction)."""
    import torch
    import torch.nn.functional as F

    cfg, sampler, acc, mb_size = loop.cfg, loop.sampler, loop.acc, loop.cfg.micro_batch
    p = domain_fraction(cfg.mixture, step, total, sampler.epochs(sampler.domain))
    rank = dist.rank()
    batch = sampler.batch(step, loop.n_seq, p)[rank * loop.per_rank:(rank + 1) * loop.per_rank]
    for g in loop.opt.param_groups:
        g["lr"] = lr_at(cfg, step, total)
    loss_sum = 0.0
    for i in range(loop.n_micro):
        mb = torch.as_tensor(batch[i * mb_size:(i + 1) * mb_size]).to(acc.device)
        # DDP all-reduces the gradients once per step; FSDP reduce-scatters every micro-batch, so that only
        # gradient shards are kept between them (skipping it would hold whole unsharded gradients)
        last = i == loop.n_micro - 1
        ctx = contextlib.nullcontext() if last or loop.sharded else acc.no_sync(loop.model)
        with ctx, autocast(loop):
            logits = loop.model(input_ids=mb[:, :-1], use_cache=False).logits
            if loop.loss is None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
            else:
                loss = loop.loss(logits, mb)
            loss = loss / (loop.per_rank * loop.seq)
        acc.backward(loss)
        loss_sum += loss.item()
    if loop.sharded:  # the norm over every process's shards (a DTensor)
        gnorm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip).full_tensor()
    else:
        gnorm = acc.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip)
    loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)
    return dist.mean(loss_sum), float(gnorm), p


def calibrate(loop: Loop) -> int:
    """Minutes budget -> steps: time a few steps and one evaluation on a throwaway copy of the state,
    then restore it, so the schedule knows its length from step 0 and the run stays reproducible."""
    import copy

    raw = loop.acc.unwrap_model(loop.model)  # under FSDP its state dict holds this process's shards
    saved = copy.deepcopy(raw.state_dict()), copy.deepcopy(loop.opt.state_dict()), loop.sampler.state()
    train_step(loop, 0, 100)
    t0 = time.perf_counter()
    for i in range(1, 3):
        train_step(loop, i, 100)
    per_step = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    validate(loop)
    per_eval = time.perf_counter() - t0
    raw.load_state_dict(saved[0])
    loop.opt.load_state_dict(saved[1])
    loop.sampler.load(saved[2])
    minutes = loop.cfg.minutes
    steps = dist.broadcast_int(max(2, int(minutes * 60 / (per_step + per_eval / loop.cfg.eval_every))))
    info(f"  {loop.stage} · {loop.name}: {per_step:.2f} s/step, {per_eval:.1f} s/eval -> {steps} steps in "
         f"{minutes:g} min")
    return steps


def mfu(loop: Loop, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: the FLOP/s the tokens cost against the machine's peak (None if the peak is
    unknown or the share would pass 100%, see hardware.plausible_mfu)."""
    return plausible_mfu(tokens_per_s * flops_per_token(loop.shape, loop.seq), loop.peak_flops)


def warn_memory(loop: Loop) -> None:
    """Say before the first step when the estimated peak (hardware.training_memory) nears the memory there
    is, and which setting brings it down."""
    import psutil
    import torch

    raw = loop.acc.unwrap_model(loop.model)
    checkpointing = bool(getattr(raw, "is_gradient_checkpointing", False))
    params = loop.shape["params"] // (dist.world_size() if loop.sharded else 1)
    est = hardware.training_memory(params, loop.shape, raw.config.vocab_size, loop.cfg.micro_batch, loop.seq, checkpointing)
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else psutil.virtual_memory().available
    advice = hardware.memory_advice(est, loop.cfg.micro_batch, loop.seq, checkpointing, free)
    if advice:
        info(f"  [yellow]{loop.stage} · {loop.name}: {advice}[/]")


def take_snapshot(loop: Loop, state: LoopState, snapshot) -> None:
    """Call `snapshot(model, step)` (main process) at cfg.snapshots evenly spaced steps before the last."""
    cfg = loop.cfg
    every = max(1, state.total_steps // (cfg.snapshots + 1))
    if snapshot and cfg.snapshots and state.step % every == 0 and state.step // every <= cfg.snapshots:
        dist.on_main(snapshot, full_model(loop), state.step)


def summary(loop: Loop, state: LoopState) -> dict:
    """The run's metrics and logs, and the trained model (whole, on the main process; None elsewhere
    under FSDP). Every process calls it."""
    wall = state.elapsed
    tokens = state.step * loop.tokens_per_step
    tps = tokens / wall if wall else 0.0
    return {"model": full_model(loop), "steps": state.step, "tokens": tokens,
            "train_time_s": round(wall, 1), "tokens_per_s": round(tps, 1),
            "mfu": round(m, 4) if (m := mfu(loop, tps)) is not None else None,
            "final_loss": state.log[-1]["loss"], "val": state.val[-1] if state.val else {},
            "log": state.log, "val_log": state.val, "tokens_per_step": loop.tokens_per_step,
            "domain_epochs": round(loop.sampler.epochs(loop.sampler.domain), 3),
            "general_epochs": round(loop.sampler.epochs(loop.sampler.general), 3)}


def train_one(name: str, cfg: TrainConfig, model, shape_: dict, sampler: Sampler, val: dict[str, np.ndarray],
              out: Path, total_steps: int | None, peak_flops: float, bf16: bool, snapshot=None, stage: str = "pretrain",
              loss: Callable | None = None) -> dict:
    """Train `model` in place; checkpoints in out/<name>.ckpt.pt; `snapshot(model, step)` is called at
    cfg.snapshots evenly spaced steps before the last; `loss(logits, window)` replaces cross-entropy;
    returns the run's metrics and log."""
    loop = setup(name, cfg, model, shape_, sampler, val, out, peak_flops, bf16, stage, loss)
    warn_memory(loop)
    state = load_checkpoint(loop, total_steps)
    loop.model.train()
    if state.total_steps is None:
        state.total_steps = calibrate(loop)
        save_checkpoint(loop, state)  # pins the step count: a resumed run follows the same schedule
    total = state.total_steps
    last_ckpt = time.time()
    t_run = time.time() - state.elapsed
    with progress(f"{stage} · {name}", total, "steps", completed=state.step) as bar:
        window_t, window_tok = time.time(), 0
        while state.step < total:
            step = state.step
            loss, gnorm, p = train_step(loop, step, total)
            state.step = step + 1
            state.elapsed = time.time() - t_run
            window_tok += loop.tokens_per_step
            state.log.append({"step": step + 1, "loss": round(loss, 5), "lr": round(loop.opt.param_groups[0]["lr"], 7),
                              "grad_norm": round(gnorm, 4), "domain_fraction": p,
                              "tokens": (step + 1) * loop.tokens_per_step, "time_s": round(state.elapsed, 3)})
            done = state.step >= total
            if state.step % cfg.eval_every == 0 or done:
                state.val.append({"step": state.step, "tokens": state.step * loop.tokens_per_step, **validate(loop)})
            # the bar's rate is the summary's (all tokens over all training time, evaluations included); it
            # prints off a terminal every few seconds at most, and its heartbeat fills a step longer than 30 s
            avg = state.step * loop.tokens_per_step / state.elapsed if state.elapsed > 0 else 0.0
            bar.update(completed=state.step, rate=(avg, "tok/s"),
                       tokens=f"{state.step * loop.tokens_per_step:,} tokens", loss=f"loss {loss:.3f}",
                       mfu=f"MFU {m:.1%}" if (m := mfu(loop, avg)) is not None else "", memory=hardware.memory_in_use())
            if state.step % cfg.log_every == 0 or done:
                dt = time.time() - window_t
                tps = window_tok / dt if dt > 0 else 0.0
                m = mfu(loop, tps)
                state.log[-1].update(tokens_per_s=round(tps, 1), mfu=round(m, 4) if m is not None else None)
                if cfg.tensorboard:
                    loop.acc.log({"loss": loss, "lr": state.log[-1]["lr"], "tokens_per_s": tps}, step=state.step)
                window_t, window_tok = time.time(), 0
            take_snapshot(loop, state, snapshot)
            due = (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or \
                time.time() - last_ckpt > cfg.checkpoint_every_min * 60
            if dist.broadcast_int(int(due)):  # the main process's clock decides, or ranks could part at the barrier
                save_checkpoint(loop, state)
                last_ckpt = time.time()
    if cfg.tensorboard:
        loop.acc.end_training()
    return summary(loop, state)


# ---- the finished model ------------------------------------------------------------------------------
def save_snapshot(model, step: int, tokenizer, root: Path) -> None:
    """An HF folder root/step-NNNNNN (model and tokenizer), written to a temp folder and renamed."""
    path = root / f"step-{step:06d}"
    if path.is_dir():  # written before a restart
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, path)


def save_trained(model, tokenizer, shape_: dict, result: dict, out: Path, name: str, data: dict, metrics: dict,
               ckpt: Path, about: str | None = None) -> None:
    """The finished model's HF folder (weights, tokenizer, generation config, card, logs), metrics.json
    last (a folder with both is done), then the checkpoint goes."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids(tokenizer),
                     pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=128).save_pretrained(str(out))
    results = {"training tokens": result["tokens"], "steps": result["steps"], "final train loss": result["final_loss"],
               **{f"val loss ({k})": v for k, v in result["val"].items() if k not in ("step", "tokens")},
               "tokens/s": result["tokens_per_s"], "MFU": result["mfu"]}
    (out / "README.md").write_text(checkpoint_card(name, shape_, data, results, about), encoding="utf-8")
    write_jsonl(out / "train_log.jsonl", result["log"])
    write_jsonl(out / "val_log.jsonl", result["val_log"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ckpt.unlink(missing_ok=True)
    fsdp.remove(ckpt)


# ---- one model of a stage ------------------------------------------------------------------------------
@dataclass
class Trainee:
    """One model a stage trains and saves (train_and_save): the model, its tokenizer and shape, its batches
    (None: saved as it is, untrained) and validation tokens, the loss (None: cross-entropy), `describe(run)`
    -> (its metrics, its card's data) from the run's figures (None when untrained), and the card's text."""

    model: object
    tokenizer: object
    shape: dict
    sampler: Sampler | None
    val: dict[str, np.ndarray]
    describe: Callable[[dict | None], tuple[dict, dict]]
    loss: Callable | None = None
    about: str | None = None


# what save_trained takes for a model saved without training: no figures, empty logs
UNTRAINED = {"tokens": 0, "steps": 0, "final_loss": None, "val": {}, "tokens_per_s": None, "mfu": None,
             "log": [], "val_log": []}


def token_budget(cfg: TrainConfig, made: dict[str, dict]) -> int | None:
    """The tokens each model of a stage trains on: cfg.tokens, or under a minutes budget those of the
    first model the stage trained (its step count was timed; the others follow it), None before it."""
    if cfg.tokens:
        return int(parse_count(cfg.tokens))
    return next((m["tokens"] for m in made.values() if m.get("tokens")), None)


def train_and_save(*, name: str, cfg: TrainConfig, out: Path, prepare: Callable[[], Trainee], tokens: int | None,
                   peak_flops: float, bf16: bool, stage: str) -> dict:
    """One model of a stage: read back from out/<name> when a restarted run had finished it (the folder
    holds model.safetensors and metrics.json), else `prepare()`d, trained for `tokens` (None: cfg.minutes
    fixes the steps) in train_one with snapshots in out/<name>/snapshots, and saved there (save_trained, on
    the main process). Returns its metrics (what metrics.json holds)."""
    final = out / name
    if (final / "model.safetensors").is_file() and (final / "metrics.json").is_file():
        return json.loads((final / "metrics.json").read_text())
    t = prepare()
    result, run = {**UNTRAINED, "model": t.model}, None
    if t.sampler is not None:
        context = t.shape["context"]
        n_seq = max(1, cfg.batch_tokens // context)
        total_steps = math.ceil(tokens / (n_seq * context)) if tokens else None
        snapshot = partial(save_snapshot, tokenizer=t.tokenizer, root=final / "snapshots")
        result = train_one(name, cfg, t.model, t.shape, t.sampler, t.val, out, total_steps, peak_flops, bf16,
                           snapshot, stage=stage, loss=t.loss)
        run = {k: v for k, v in result.items() if k not in ("model", "log", "val_log")}
    metrics, data = t.describe(run)
    dist.on_main(save_trained, result["model"], t.tokenizer, t.shape, result, final, name, data, metrics,
                 out / f"{name}.ckpt.pt", t.about)
    return metrics
