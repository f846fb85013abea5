"""Pretraining throughput: slmforge's loop (pretrain.train_one) against transformers.Trainer, with MFU.

Measured in one run, on this machine (CUDA if present, else CPU):
  1. peak matmul FLOP/s, fp32 and bf16: square n x n torch.mm (2·n³ FLOPs) at --matmul-sizes,
     best of 3 repeats per size and dtype; the best bf16 figure is the peak that MFU is measured against.
  2. per model size (ModelSize(params=...), vocab 8192, context --seq; the model built from
     slmforge.models.modeling.derive + llama_config, SDPA attention, the same seed for every loop):
     a. slmforge: pretrain.train_one, --batch sequences of --seq tokens per step, one micro-batch,
        bf16 autocast where supported (hardware.use_bf16), pretrain.Config's default optimisation
        (AdamW, lr, warmup, WSD schedule, weight decay, clipping);
     b. transformers.Trainer: the same model init, batches (in the same order) and optimisation
        settings; bf16=True where supported, Trainer's own optimizer (fused AdamW, its weight-decay
        groups), no evaluation, no logging, no saving, no data workers. Its scheduler is a LambdaLR over
        pretrain.lr_at, so both follow the same learning rate step by step (Trainer's own
        warmup_stable_decay starts warmup at lr 0, one step behind slmforge's, and losses then differ);
     c. with --pure-bf16 also slmforge on a model cast to bf16 weights (precision fp32: no autocast).
  Data: real text: the first --data-mb MB of data/postgresql_docs.jsonl.gz, tokenized with a byte-level
  BPE (vocab 8192) trained on the spot by slmforge.stages.tokenizer.train_bpe, packed into windows by
  packing.Sampler; 32 held-out windows from the end of the stream give a validation loss.
  Speed = tokens of the --steps steps after --warmup steps / their wall time (slmforge: the log's
  time_s, rounded to 1 ms by train_one; Trainer: a callback at on_step_end).
  MFU = tokens/s x (6·params + 12·layers·width·seq) / measured bf16 peak (hardware.flops_per_token).
  Loss: the mean train loss over all steps and the held-out loss, same code for every model.
Prints two tables, then one JSON line with every figure, the command line and the machine.

    .venv/bin/python benchmarks/pretrain_throughput.py                               # full run
    .venv/bin/python benchmarks/pretrain_throughput.py --sizes 1M --steps 6 --warmup 2  # quick check
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "postgresql_docs.jsonl.gz"
VOCAB = 8192


def matmul_peaks(sizes: list[int], device, seconds: float) -> dict:
    """Best FLOP/s of n x n torch.mm per dtype and size (3 repeats, ~seconds in all)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    budget = seconds / (2 * len(sizes) * 3)
    out: dict = {"fp32": {}, "bf16": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
            torch.mm(a, b), sync()  # warm-up
            t0 = time.perf_counter()
            torch.mm(a, b), sync()
            iters = max(1, int(budget / max(time.perf_counter() - t0, 1e-6)))
            best = 0.0
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch.mm(a, b)
                sync()
                best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
            out[name][n] = best
    return {**out, "best_fp32": max(out["fp32"].values()), "best_bf16": max(out["bf16"].values())}


def token_stream(data_mb: float) -> tuple[np.ndarray, dict]:
    """BOS doc EOS ... over the first data_mb MB of the manual, with a BPE trained on the same text."""
    from slmforge.models.chat import BOS, EOS, PAD
    from slmforge.stages.tokenizer import train_bpe

    texts, size = [], 0
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip() and size < data_mb * 1e6:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1].encode("utf-8"))
    t0 = time.perf_counter()
    tok = train_bpe(iter(texts), VOCAB)
    ids = {k: tok.token_to_id(t) for k, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    rows = [np.asarray([ids["bos"], *e.ids, ids["eos"]]) for e in encoded]
    arr = np.concatenate(rows).astype(np.int64)
    return arr, {**ids, "text_mb": round(size / 1e6, 2), "tokens": int(arr.size),
                 "bpe_vocab": tok.get_vocab_size(), "tokenize_s": round(time.perf_counter() - t0, 1)}


def new_model(size: str, seq: int, ids: dict, dtype=None):
    import torch
    from transformers import LlamaForCausalLM

    from slmforge.models.modeling import ModelSize, derive, llama_config

    s = derive(ModelSize(params=size, context=seq), VOCAB)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(s, VOCAB, ids["bos"], ids["eos"], ids["pad"]))
    s["params"] = sum(p.numel() for p in model.parameters())
    return (model.to(dtype) if dtype else model), s


def val_loss(model, windows: np.ndarray, bf16: bool, device, batch: int) -> float:
    import torch

    from slmforge.models.lm import nll

    model.eval()
    w = torch.as_tensor(windows)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        total = nll(model, w[:, :-1], w[:, 1:], batch, device)
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def run_slmforge(cfg, model, shape_, stream, a, steps: int, peak: float, bf16: bool) -> dict:
    from slmforge.training.loop import train_one
    from slmforge.training.packing import Sampler

    cfg = cfg.model_copy(update={"precision": "bf16" if bf16 else "fp32"})
    sampler = Sampler({"domain": stream}, ["domain"], a.seq, seed=0)
    with tempfile.TemporaryDirectory(prefix="slmforge-bench-") as tmp:
        r = train_one("bench", cfg, model, shape_, sampler, {}, Path(tmp), steps, peak, bf16)
    log = r["log"]
    seconds = log[-1]["time_s"] - log[a.warmup - 1]["time_s"]
    return {"model": r["model"], "seconds": seconds, "mean_loss": float(np.mean([x["loss"] for x in log])),
            "whole_run_tokens_per_s": r["tokens_per_s"]}


def run_trainer(cfg, model, stream, a, steps: int, bf16: bool, device) -> dict:
    import torch
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from slmforge.training.loop import lr_at
    from slmforge.training.packing import Sampler

    sampler = Sampler({"domain": stream}, ["domain"], a.seq, seed=0)  # the same batches as train_one's
    rows = [w for s in range(steps) for w in sampler.batch(s, a.batch, 1.0)]
    data = [{"input_ids": torch.as_tensor(w[:-1]), "labels": torch.as_tensor(w[:-1]),
             "shift_labels": torch.as_tensor(w[1:])} for w in rows]  # shift_labels: all seq targets, no shift
    times: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (a.warmup, steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[state.global_step] = time.perf_counter()

    AcceleratorState._reset_state()
    with tempfile.TemporaryDirectory(prefix="slmforge-bench-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=a.batch, seed=0,
            learning_rate=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0],
            adam_beta2=cfg.betas[1], max_grad_norm=cfg.grad_clip, bf16=bf16, use_cpu=device.type != "cuda",
            eval_strategy="no", logging_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, train_sampling_strategy="sequential")
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
        opt = trainer.create_optimizer()  # Trainer's own; train() keeps an optimizer and scheduler set here
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(cfg, s, steps) / cfg.lr)
        out = trainer.train()
    return {"model": trainer.model, "seconds": times[steps] - times[a.warmup], "mean_loss": out.training_loss,
            "optim": targs.optim.value if hasattr(targs.optim, "value") else str(targs.optim)}


def table(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(v)) for v in col) for col in zip(head, *rows)]
    for row in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1M,5M,20M", help="model sizes (default 1M,5M,20M)")
    ap.add_argument("--steps", type=int, default=30, help="measured steps after the warm-up (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed at the start (default 5)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    ap.add_argument("--pure-bf16", action="store_true", help="also train slmforge's model with bf16 weights")
    ap.add_argument("--data-mb", type=float, default=2.0, help="MB of the manual to tokenize (default 2)")
    ap.add_argument("--matmul-sizes", default="512,1024,2048", help="square matmul sizes for the peak")
    ap.add_argument("--peak-seconds", type=float, default=6.0, help="time for the matmul probe (default 6)")
    a = ap.parse_args()
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be at least 1")

    import torch
    import transformers

    from slmforge.hardware import flops_per_token, use_bf16
    from slmforge.stages.pretrain import Config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = use_bf16("auto")
    peaks = matmul_peaks([int(n) for n in a.matmul_sizes.split(",")], device, a.peak_seconds)
    peak = peaks["best_bf16"]
    stream, data = token_stream(a.data_mb)
    n_val = 32 * (a.seq + 1)
    val = stream[-n_val:].reshape(32, a.seq + 1)
    train = stream[:-n_val]
    steps = a.warmup + a.steps
    measured_tokens = a.steps * a.batch * a.seq
    cfg = Config(tokens=str(steps * a.batch * a.seq), batch_tokens=a.batch * a.seq, micro_batch=a.batch,
                 baseline=False, eval_every=10**9, checkpoint_every_min=1e9, log_every=10**9)  # all off

    runs = []
    for size in a.sizes.split(","):
        loops = [("slmforge", bf16, None), ("trainer", bf16, None)]
        if a.pure_bf16:
            loops.append(("slmforge-pure-bf16", False, torch.bfloat16))
        for loop, autocast, dtype in loops:
            model, shape_ = new_model(size, a.seq, data, dtype)
            if loop == "trainer":
                r = run_trainer(cfg, model, train, a, steps, autocast, device)
            else:
                r = run_slmforge(cfg, model, shape_, train, a, steps, peak, autocast)
            tps = measured_tokens / r["seconds"]
            mfu = tps * flops_per_token(shape_, a.seq) / peak
            runs.append({"size": size, "loop": loop, "params": shape_["params"], "depth": shape_["depth"],
                         "width": shape_["hidden_size"], "precision": "bf16 weights" if dtype else
                         ("bf16 autocast" if autocast else "fp32"), "measured_s": round(r["seconds"], 3),
                         "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4),
                         "mean_train_loss": round(r["mean_loss"], 4),
                         "val_loss": round(val_loss(r["model"], val, bf16, device, a.batch), 4),
                         **{k: v for k, v in r.items() if k not in ("model", "seconds", "mean_loss")}})
            del model, r
        trainer_tps = next(x["tokens_per_s"] for x in runs if x["size"] == size and x["loop"] == "trainer")
        for x in runs:
            if x["size"] == size and x["loop"] != "trainer":
                x["over_trainer"] = round(x["tokens_per_s"] / trainer_tps, 3)

    print(f"\nmatmul peak, GFLOP/s ({device.type}, {torch.get_num_threads()} threads)")
    table(("n", "fp32", "bf16"), [(n, f"{peaks['fp32'][n] / 1e9:.1f}", f"{peaks['bf16'][n] / 1e9:.1f}")
                                  for n in peaks["fp32"]]
          + [("best", f"{peaks['best_fp32'] / 1e9:.1f}", f"{peaks['best_bf16'] / 1e9:.1f}")])
    print(f"\ntraining: {a.batch} x {a.seq} tokens per step, {a.steps} steps timed after {a.warmup}; "
          f"real data "
          f"({data['text_mb']} MB of the manual, {data['tokens']:,} tokens, BPE vocab {data['bpe_vocab']}); "
          f"MFU against the bf16 peak")
    table(("size", "params", "loop", "precision", "tok/s", "MFU", "vs Trainer", "train loss", "val loss"),
          [(x["size"], f"{x['params'] / 1e6:.2f}M", x["loop"], x["precision"], f"{x['tokens_per_s']:,.0f}",
            f"{x['mfu']:.1%}", f"{x['over_trainer']:.3f}x" if "over_trainer" in x else "",
            f"{x['mean_train_loss']:.4f}", f"{x['val_loss']:.4f}") for x in runs])
    peaks_json = {k: ({str(n): round(f) for n, f in v.items()} if isinstance(v, dict) else round(v))
                  for k, v in peaks.items()}
    print(json.dumps({
        "peak_flops": peaks_json, "mfu_peak": "best_bf16", "runs": runs,
        "data": {"source": str(DATA.relative_to(ROOT)), **data},
        "steps": a.steps, "warmup": a.warmup, "seq": a.seq, "batch": a.batch, "bf16": bf16,
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
    }))


if __name__ == "__main__":
    main()
