"""Pretraining throughput: slmforge's loop (pretrain.train_one) against transformers.Trainer, with MFU.

Measured in one run, on this machine (CUDA if present, else CPU):
  1. peak matmul FLOP/s, fp32 and bf16: square n x n torch.mm (2·n³ FLOPs) at --matmul-sizes,
     best of 3 repeats per size and dtype; the best bf16 figure is the peak that MFU is measured against.
  2. per model size (ModelSize(params=...), vocab 8192, context --seq; the model built from
     slmforge.modeling.derive + llama_config, SDPA attention, the same seed for every loop):
     a. slmforge: pretrain.train_one, --batch sequences of --seq tokens per step, one micro-batch,
        bf16 autocast where supported (pretrain.use_bf16), WSD schedule;
     b. transformers.Trainer: the same model init, batches (in the same order), optimizer settings
        (AdamW, lr, betas, weight decay, clipping) and WSD schedule; bf16=True where supported,
        Trainer's default (fused) AdamW, no evaluation, no logging, no saving, no data workers;
     c. with --pure-bf16 also slmforge on a model cast to bf16 weights (precision fp32: no autocast).
  Data: real text: the first --data-mb MB of data/postgresql_docs.jsonl.gz, tokenized with a byte-level
  BPE (vocab 8192) trained on the spot by slmforge.stages.tokenizer.train_bpe, packed into windows by
  pretrain.Sampler; 32 held-out windows from the end of the stream give a validation loss.
  Speed = tokens of the --steps steps after --warmup steps / their wall time (slmforge: the log's
  time_s, rounded to 10 ms by train_one; Trainer: a callback at on_step_end).
  MFU = tokens/s x (6·params + 12·layers·width·seq) / measured bf16 peak (pretrain.flops_per_token).
  Loss: the mean train loss over all steps and the held-out loss, same code for every model.
Learning rate: no warmup (slmforge warmup=0 gives 1 step at full lr, Trainer warmup_steps=0 the same),
stable, then linear decay to 0.1x over the last 20%: the two schedules are then identical step by step.
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
LR, WD, BETAS, CLIP, MIN_LR, DECAY_PART = 3e-3, 0.1, (0.9, 0.95), 1.0, 0.1, 0.2


def matmul_peaks(sizes: list[int], device, seconds: float) -> dict:
    """Best FLOP/s of n x n torch.mm per dtype and size (3 repeats, ~seconds in all)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    budget = seconds / (2 * len(sizes) * 3)
    out: dict = {"fp32": {}, "bf16": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
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
    from slmforge.stages.tokenizer import BOS, EOS, PAD, train_bpe

    texts, size = [], 0
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip() and size < data_mb * 1e6:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1].encode("utf-8"))
    t0 = time.perf_counter()
    tok = train_bpe(iter(texts), VOCAB)
    ids = {k: tok.token_to_id(t) for k, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    rows = [np.asarray([ids["bos"], *e.ids, ids["eos"]]) for e in tok.encode_batch(texts, add_special_tokens=False)]
    arr = np.concatenate(rows).astype(np.int64)
    return arr, {**ids, "text_mb": round(size / 1e6, 2), "tokens": int(arr.size),
                 "bpe_vocab": tok.get_vocab_size(), "tokenize_s": round(time.perf_counter() - t0, 1)}


def new_model(size: str, seq: int, ids: dict, dtype=None):
    import torch
    from transformers import LlamaForCausalLM

    from slmforge.modeling import ModelSize, derive, llama_config

    s = derive(ModelSize(params=size, context=seq), VOCAB)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(s, VOCAB, ids["bos"], ids["eos"], ids["pad"]))
    s["params"] = sum(p.numel() for p in model.parameters())
    return (model.to(dtype) if dtype else model), s


def val_loss(model, windows: np.ndarray, bf16: bool, device, batch: int) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(windows), batch):
            w = torch.as_tensor(windows[i:i + batch]).to(device)
            logits = model(input_ids=w[:, :-1]).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def run_slmforge(model, shape_, stream, a, steps: int, peak: float, bf16: bool) -> dict:
    from accelerate.state import AcceleratorState

    from slmforge.stages.pretrain import Config, Sampler, train_one

    AcceleratorState._reset_state()  # train_one makes an Accelerator; its mixed precision may differ per run
    cfg = Config(tokens=str(steps * a.batch * a.seq),
                 batch_tokens=a.batch * a.seq, micro_batch=a.batch, lr=LR, min_lr_ratio=MIN_LR, warmup=0.0,
                 schedule="wsd", decay_part=DECAY_PART, weight_decay=WD, betas=BETAS, grad_clip=CLIP,
                 precision="bf16" if bf16 else "fp32", baseline=False, eval_every=10**9,
                 checkpoint_every_min=1e9, log_every=10**9)
    sampler = Sampler({"domain": stream}, ["domain"], a.seq, seed=0)
    with tempfile.TemporaryDirectory(prefix="slmforge-bench-") as tmp:
        r = train_one("bench", cfg, model, shape_, sampler, {}, Path(tmp), steps, peak, bf16)
    log = r["log"]
    seconds = log[-1]["time_s"] - log[a.warmup - 1]["time_s"]
    return {"model": r["model"], "seconds": seconds, "mean_loss": float(np.mean([x["loss"] for x in log])),
            "whole_run_tokens_per_s": r["tokens_per_s"]}


def run_trainer(model, stream, a, steps: int, bf16: bool, device) -> dict:
    import torch
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from slmforge.stages.pretrain import Sampler

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

    decay_start = int(steps * (1 - DECAY_PART))  # as pretrain.lr_at
    AcceleratorState._reset_state()
    with tempfile.TemporaryDirectory(prefix="slmforge-bench-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
            learning_rate=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=CLIP,
            lr_scheduler_type="warmup_stable_decay", warmup_steps=0,
            lr_scheduler_kwargs={"num_stable_steps": decay_start, "num_decay_steps": steps - decay_start,
                                 "min_lr_ratio": MIN_LR, "decay_type": "linear"},
            bf16=bf16, use_cpu=device.type != "cuda", eval_strategy="no", logging_strategy="no",
            save_strategy="no", report_to="none", dataloader_num_workers=0, remove_unused_columns=False,
            train_sampling_strategy="sequential", disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
        out = trainer.train()
    return {"model": trainer.model, "seconds": times[steps] - times[a.warmup], "mean_loss": out.training_loss,
            "optim": targs.optim.value if hasattr(targs.optim, "value") else str(targs.optim)}


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

    from slmforge.stages.pretrain import flops_per_token, use_bf16

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

    runs = []
    for size in a.sizes.split(","):
        loops = [("slmforge", bf16, None), ("trainer", bf16, None)]
        if a.pure_bf16:
            loops.append(("slmforge-pure-bf16", False, torch.bfloat16))
        for loop, autocast, dtype in loops:
            model, shape_ = new_model(size, a.seq, data, dtype)
            if loop == "trainer":
                r = run_trainer(model, train, a, steps, autocast, device)
            else:
                r = run_slmforge(model, shape_, train, a, steps, peak, autocast)
            tps = measured_tokens / r["seconds"]
            runs.append({"size": size, "loop": loop, "params": shape_["params"], "depth": shape_["depth"],
                         "width": shape_["hidden_size"], "precision": "bf16 weights" if dtype else
                         ("bf16 autocast" if autocast else "fp32"), "measured_s": round(r["seconds"], 3),
                         "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token(shape_, a.seq) / peak, 4),
                         "mean_train_loss": round(r["mean_loss"], 4),
                         "val_loss": round(val_loss(r["model"], val, bf16, device, a.batch), 4),
                         **{k: v for k, v in r.items() if k not in ("model", "seconds", "mean_loss")}})
            del model, r
        base = {x["loop"]: x for x in runs if x["size"] == size}
        base["slmforge"]["slmforge_over_trainer"] = round(base["slmforge"]["tokens_per_s"]
                                                          / base["trainer"]["tokens_per_s"], 3)

    print(f"\nmatmul peak ({device.type}, {torch.get_num_threads()} threads), GFLOP/s")
    print(f"{'n':>6} {'fp32':>10} {'bf16':>10}")
    for n in peaks["fp32"]:
        print(f"{n:>6} {peaks['fp32'][n] / 1e9:>10.1f} {peaks['bf16'][n] / 1e9:>10.1f}")
    print(f"{'best':>6} {peaks['best_fp32'] / 1e9:>10.1f} {peaks['best_bf16'] / 1e9:>10.1f}")
    print(f"\ntraining: {a.batch} x {a.seq} tokens per step, {a.steps} steps timed after {a.warmup}; real data "
          f"({data['text_mb']} MB of the manual, {data['tokens']:,} tokens, BPE vocab {data['bpe_vocab']})")
    head = ("size", "params", "loop", "precision", "tok/s", "MFU", "vs Trainer", "train loss", "val loss")
    print("  ".join(f"{h:>12}" for h in head))
    for x in runs:
        ratio = x.get("slmforge_over_trainer", "")
        print("  ".join(f"{v:>12}" for v in (x["size"], f"{x['params'] / 1e6:.2f}M", x["loop"][:12], x["precision"][:12],
                                             f"{x['tokens_per_s']:,.0f}", f"{x['mfu']:.1%}", f"{ratio}x" if ratio else "",
                                             f"{x['mean_train_loss']:.3f}", f"{x['val_loss']:.3f}")))
    peaks_json = {k: ({str(n): round(f) for n, f in v.items()} if isinstance(v, dict) else round(v))
                  for k, v in peaks.items()}
    print(json.dumps({
        "peak_flops": peaks_json, "mfu_peak": "best_bf16", "runs": runs, "data": {"source": str(DATA), **data},
        "steps": a.steps, "warmup": a.warmup, "seq": a.seq, "batch": a.batch, "bf16": bf16,
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
    }))


if __name__ == "__main__":
    main()
