"""DAPT step speed at 135M: slmforge's training loop against transformers.Trainer, on the same batches.

On a demo workdir whose curate stage is done: the domain and general train splits are tokenized with the
base's tokenizer (into --out), pretrain's Sampler draws the first --warmup + --steps global batches (the
demo's 80% domain mixture), and each setting trains a fresh copy of the base on exactly those batches:

  - transformers.Trainer: bf16 where the CPU has it natively (hardware.use_bf16), SDPA, fused AdamW, the
    same micro-batches, accumulation, learning rate and clipping;
  - slmforge's loop (training.setup + train_step, what pretrain runs) eager, then with each change the issue
    asked about: `compile` (training.compile_blocks), other micro-batches, gradient checkpointing.

Steady speed is timed over the --steps steps after the first --warmup (the first step holds the
compilation, reported apart as `first step s`). MFU is against this machine's matmul peak in the dtype
the run trains in (hardware.peak_flops). Prints a table, then one JSON line with the command and machine.

    .venv/bin/python benchmarks/dapt_speed.py --workdir runs/demo --steps 4
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import time
from pathlib import Path


def batches(base_path: Path, curate, out: Path, seq: int, n_seq: int, steps: int, seed: int = 0):
    import numpy as np

    from slmforge.models.modeling import load_model
    from slmforge.records import Curated
    from slmforge.training.packing import Sampler, tokenize_sources

    _, tok = load_model(base_path)
    roles = list(Curated.of(curate).roles)
    tokenize_sources(tok, curate, roles, out)
    streams = {s: np.load(out / f"{s}.train.npy", mmap_mode="r") for s in roles}
    sampler = Sampler(streams, Curated.of(curate).domain, seq, seed)
    return streams, sampler, [sampler.batch(i, n_seq, 0.8) for i in range(steps)]


def trainer(base_path: Path, rows, micro: int, accum: int, lr: float, bf16: bool, out: Path) -> dict:
    """transformers.Trainer on `rows` (one global batch after another), a time stamp at every step's end."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from slmforge.models.modeling import load_model

    model, _ = load_model(base_path)
    model.config.use_cache = False
    flat = np.concatenate(rows)
    data = Dataset.from_dict({"input_ids": flat[:, :-1].tolist(), "labels": flat[:, 1:].tolist()})
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=len(rows), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=accum, learning_rate=lr, weight_decay=0.1, adam_beta1=0.9,
                             adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="constant",
                             optim="adamw_torch_fused", bf16=bf16, use_cpu=not torch.cuda.is_available(),
                             save_strategy="no", report_to="none", logging_steps=len(rows),
                             dataloader_num_workers=0, disable_tqdm=True)

    class Shifted(Trainer):  # labels are already the next tokens: HF's loss would shift them once more
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), inputs["labels"].flatten())
            return (loss, logits) if return_outputs else loss

    Shifted(model=model, args=args, train_dataset=data, callbacks=[Stamp()]).train()
    return {"step_s": [b - a for a, b in zip(stamps, stamps[1:])]}


def loop(base_path: Path, streams, domain, seq: int, n_seq: int, steps: int, micro: int, lr: float, bf16: bool,
         compile_: bool, checkpointing: bool, out: Path) -> dict:
    """pretrain's loop (training.setup, train_step) for `steps` steps of the same sampler."""
    from slmforge.models.modeling import load_model, shape_of
    from slmforge.training.loop import Mixture, TrainConfig, setup, train_step
    from slmforge.training.packing import Sampler

    model, _ = load_model(base_path)
    if checkpointing:
        model.gradient_checkpointing_enable()
    cfg = TrainConfig(tokens=steps * n_seq * seq, batch_tokens=n_seq * seq, micro_batch=micro, lr=lr, warmup=0.0,
                      compile=compile_, mixture=Mixture(schedule="constant", domain_fraction=0.8))
    sampler = Sampler(streams, domain, seq, 0)
    lp = setup("bench", cfg, model, shape_of(model, seq), sampler, {}, out, 0.0, bf16)
    lp.model.train()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        train_step(lp, step, steps)
        times.append(time.perf_counter() - t0)
    return {"step_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="a demo workdir with curate done")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps, after --warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--only", nargs="*", help="run only these settings (by name)")
    p.add_argument("--out", default="/tmp/dapt-speed")
    args = p.parse_args()

    from slmforge.artifacts import ArtifactStore
    from slmforge.hardware import flops_per_token, peak_flops, use_bf16
    from slmforge.models import bases
    from slmforge.records import Curated

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curate = ArtifactStore(args.workdir).resolve("curate:latest")
    base = bases.get(args.base)
    seq, n_seq, total = args.context, args.batch_tokens // args.context, args.warmup + args.steps
    bf16 = use_bf16("auto")
    peak = peak_flops(bf16)
    streams, _, rows = batches(base.path, curate, out / "tokens", seq, n_seq, total)
    domain = Curated.of(curate).domain
    mb = args.micro_batch
    settings = [
        ("transformers.Trainer", lambda: trainer(base.path, rows, mb, n_seq // mb, args.lr, bf16, out)),
        (f"slmforge, eager, micro {mb}", lambda: loop(base.path, streams, domain, seq, n_seq, total, mb, args.lr,
                                                      bf16, False, False, out)),
        (f"slmforge, compile, micro {mb}", lambda: loop(base.path, streams, domain, seq, n_seq, total, mb, args.lr,
                                                        bf16, True, False, out)),
        (f"slmforge, compile, micro {n_seq}", lambda: loop(base.path, streams, domain, seq, n_seq, total, n_seq,
                                                           args.lr, bf16, True, False, out)),
        (f"slmforge, compile, micro {max(1, mb // 2)}", lambda: loop(base.path, streams, domain, seq, n_seq, total,
                                                                     max(1, mb // 2), args.lr, bf16, True, False, out)),
        (f"slmforge, compile + checkpointing, micro {n_seq}", lambda: loop(
            base.path, streams, domain, seq, n_seq, total, n_seq, args.lr, bf16, True, True, out)),
    ]
    shape = {"params": base.params, "depth": None, "hidden_size": None}
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(base.path), local_files_only=True)
    shape.update(depth=c.num_hidden_layers, hidden_size=c.hidden_size)
    results = []
    for name, fn in settings:
        if args.only and name not in args.only and not any(o in name for o in args.only):
            continue
        t0 = time.time()
        r = fn()
        steady = r["step_s"][args.warmup:]
        tps = len(steady) * n_seq * seq / sum(steady)
        results.append({"setting": name, "tokens_per_s": round(tps, 1), "first_step_s": round(r["step_s"][0], 1),
                        "mfu": round(tps * flops_per_token(shape, seq) / peak, 4) if peak else None,
                        "step_s": [round(x, 2) for x in r["step_s"]], "wall_s": round(time.time() - t0, 1)})
        print(f"  {name}: {tps:.1f} tok/s (first step {r['step_s'][0]:.1f} s)", flush=True)
        gc.collect()
    ref = next((r["tokens_per_s"] for r in results if r["setting"] == "transformers.Trainer"), None)
    print(f"\nDAPT of {args.base} ({base.params / 1e6:.1f}M), {n_seq} x {seq} tokens per step, micro-batches as named, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {args.steps} timed steps after {args.warmup}")
    print(f"{'setting':<48} {'tok/s':>8} {'vs Trainer':>10} {'MFU':>6} {'first step s':>12}")
    for r in results:
        rel = f"{r['tokens_per_s'] / ref:.2f}x" if ref else ""
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else ""
        print(f"{r['setting']:<48} {r['tokens_per_s']:>8.1f} {rel:>10} {mfu:>6} {r['first_step_s']:>12.1f}")
    print(json.dumps({"results": results, "bf16": bf16, "peak_flops": peak, "seq": seq, "n_seq": n_seq,
                      "command": shlex.join([sys.executable, *sys.argv]), "machine": platform.platform(),
                      "processor": platform.processor()}))


if __name__ == "__main__":
    main()
