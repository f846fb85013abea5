"""Continued pretraining (DAPT) of a real base on the demo's domain: speed, and what it does to the domain's
bits per byte.

On a finished demo workdir (curate and tokenizer done), for the base (default smollm2-135m):
  1. bits per byte of the base as it is on the first --max-bytes of each source's test split
     (evaluate.bits_per_byte, context --context);
  2. for each budget in --tokens (and, with --expand N, the same budgets with expand_vocab: N), the
     pretrain stage's own loop (pretrain.run, init_from the base, the recipe's mixture: 80% domain,
     20% general replay, then domain only in the last 20%), lr --lr, WSD, bf16 where supported;
     its tokens/s and MFU as the stage measures them, then the same bits per byte;
  3. with --trainer-steps N: transformers.Trainer on the same batches (the first N steps of the first
     budget's sampler: the same windows, micro-batches and accumulation), bf16, SDPA, fused AdamW, the same
     learning rate; its tokens/s (train_runtime, all N steps) and MFU against the stage's peak FLOP/s.
Prints a table, then one JSON line with every figure, the command line and the machine.

    .venv/bin/python benchmarks/dapt.py --workdir runs/demo --tokens 50k 200k --expand 1000 --trainer-steps 8
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path


def bpb(path: Path, curated, context: int, max_bytes: int) -> dict:
    from slmforge.models.modeling import load_model
    from slmforge.stages.evaluate import _texts, bits_per_byte

    model, tok = load_model(path)
    return {s: bits_per_byte(model, tok, _texts(curated, s, max_bytes), context)["bpb"] for s in curated.roles}


def trainer_run(base_path: Path, art, cfg, steps: int) -> dict:
    """transformers.Trainer for `steps` optimizer steps on the batches pretrain's sampler drew first."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from slmforge.hardware import flops_per_token, use_bf16
    from slmforge.models.modeling import load_model
    from slmforge.training.packing import Sampler

    model, _ = load_model(base_path)
    model.config.use_cache = False
    seq = art.manifest["metrics"]["models"]["specialist"]["shape"]["context"]
    folder = art.path / "tokens" / "specialist"
    streams = {p.name.removesuffix(".train.npy"): np.load(p, mmap_mode="r") for p in folder.glob("*.train.npy")}
    sampler = Sampler(streams, ["postgres"], seq, cfg.seed)
    per_step = cfg.batch_tokens // seq
    rows = np.concatenate([sampler.batch(i, per_step, cfg.mixture.domain_fraction) for i in range(steps)])
    data = Dataset.from_dict({"input_ids": rows[:, :-1].tolist(), "labels": rows[:, 1:].tolist()})
    args = TrainingArguments(output_dir=str(art.path.parent / "trainer-bench"), max_steps=steps,
                             per_device_train_batch_size=cfg.micro_batch,
                             gradient_accumulation_steps=per_step // cfg.micro_batch, learning_rate=cfg.lr,
                             weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1],
                             max_grad_norm=cfg.grad_clip, lr_scheduler_type="constant", optim="adamw_torch_fused",
                             bf16=use_bf16(cfg.precision), use_cpu=not torch.cuda.is_available(),
                             save_strategy="no", report_to="none", logging_steps=steps, dataloader_num_workers=0)

    class Shifted(Trainer):  # labels are already the next tokens: HF's loss would shift them once more
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), inputs["labels"].flatten())
            return (loss, logits) if return_outputs else loss

    out = Shifted(model=model, args=args, train_dataset=data).train()
    tps = steps * per_step * seq / out.metrics["train_runtime"]
    shape = {"params": sum(p.numel() for p in model.parameters()), "depth": model.config.num_hidden_layers,
             "hidden_size": model.config.hidden_size}
    peak = art.manifest["metrics"].get("peak_flops")
    return {"run": f"transformers.Trainer, {steps} steps", "tokens": steps * per_step * seq, "steps": steps,
            "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token(shape, seq) / peak, 4) if peak else None,
            "wall_s": round(out.metrics["train_runtime"], 1), "loss": round(out.metrics["train_loss"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="a demo workdir with curate and tokenizer done")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--tokens", nargs="+", default=["50k", "200k"])
    p.add_argument("--expand", type=int, default=0, help="also run each budget with expand_vocab: N")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-bytes", type=int, default=100_000)
    p.add_argument("--out", default=None, help="workdir for the DAPT runs (default: <workdir>/../dapt-bench)")
    p.add_argument("--trainer-steps", type=int, default=0, help="also time transformers.Trainer for N steps")
    args = p.parse_args()

    from slmforge.artifacts import ArtifactStore
    from slmforge.models import bases
    from slmforge.records import Curated
    from slmforge.stages import pretrain

    store = ArtifactStore(args.workdir)
    out = ArtifactStore(args.out or Path(args.workdir).parent / "dapt-bench")  # the workdir's runs stay as they are
    inputs = {s: store.resolve(f"{s}:latest") for s in pretrain.INPUTS}
    curated = Curated.of(inputs["curate"])
    base = bases.get(args.base)
    rows = [{"run": f"{args.base} as it is", "tokens": 0, "expand_vocab": 0,
             "bpb": bpb(base.path, curated, args.context, args.max_bytes)}]
    for expand in sorted({0, args.expand}):
        for budget in args.tokens:
            cfg = pretrain.Config(init_from=args.base, tokens=budget, batch_tokens=args.batch_tokens,
                                  micro_batch=args.micro_batch, lr=args.lr, model={"context": args.context},
                                  expand_vocab=expand, eval_every=10_000, eval_tokens=4096, snapshots=0)
            t0 = time.time()
            art = pretrain.run(cfg, out, inputs)
            m = art.manifest["metrics"]
            spec = m["models"]["specialist"]
            rows.append({"run": f"DAPT {budget}" + (f", expand_vocab {expand}" if expand else ""),
                         "tokens": spec["tokens"], "expand_vocab": expand, "steps": spec["steps"],
                         "tokens_per_s": spec["tokens_per_s"], "mfu": spec["mfu"], "wall_s": round(time.time() - t0, 1),
                         "flops": spec["flops"], "bytes_per_token": (m.get("expand_vocab") or {}).get("bytes_per_token"),
                         "bpb": bpb(art.path / "specialist", curated, args.context, args.max_bytes)})
            if args.trainer_steps and budget == args.tokens[0] and not expand:
                rows.append(trainer_run(base.path, art, cfg, args.trainer_steps))
    sources = list(curated.roles)
    print(f"{'run':<34} {'tokens':>8} {'tok/s':>7} {'MFU':>6} " + " ".join(f"{s + ' bpb':>14}" for s in sources))
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else ""
        print(f"{r['run']:<34} {r['tokens']:>8} {r.get('tokens_per_s') or '':>7} {mfu:>6} "
              + " ".join(f"{r['bpb'][s]:>14.3f}" if "bpb" in r else f"{'':>14}" for s in sources))
    print(json.dumps({"rows": rows, "base": base.to_json() | {"path": str(base.path)},
                      "command": shlex.join([sys.executable, *sys.argv]), "machine": platform.platform(),
                      "processor": platform.processor()}))


if __name__ == "__main__":
    main()
