"""SFT step time on this machine for each packing strategy of trl's SFTTrainer, on the demo's
pretrained specialist and its synth items (run `make demo` first, or pass --workdir).

    .venv/bin/python benchmarks/sft_packing.py                  # bfd, wrapped, none; 8 steps each
    .venv/bin/python benchmarks/sft_packing.py --steps 4 --strategies wrapped none

Prints seconds per step and real (non-padding) tokens per second. `bfd` is trl's best-fit packing,
which turns padding-free (position ids, no padding); `wrapped` concatenates and cuts; `none` pads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=str(REPO / "runs" / "demo"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--strategies", nargs="+", default=["bfd", "wrapped", "none"])
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from slmforge.artifacts import ArtifactStore
    from slmforge.models.modeling import load_model

    store = ArtifactStore(Path(args.workdir))
    pre, syn = store.resolve("pretrain:latest"), store.resolve("synth:latest")
    items = [json.loads(x) for x in (syn.path / "items.jsonl").read_text().splitlines()][:1000]
    rows = [{"messages": it["messages"]} for it in items]
    for strategy in args.strategies:
        model, tok = load_model(pre.path / "specialist")
        cfg = SFTConfig(output_dir="/tmp/slmforge-sft-bench", max_steps=args.steps, per_device_train_batch_size=16,
                        max_length=256, assistant_only_loss=True, packing=strategy != "none",
                        packing_strategy=strategy if strategy != "none" else "bfd", report_to="none",
                        use_cpu=not torch.cuda.is_available(), bf16=True, save_strategy="no", logging_steps=10_000,
                        disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(rows))
        t0 = time.time()
        trainer.train()
        dt = time.time() - t0
        real = sum(len(ids) for ids in trainer.train_dataset["input_ids"][: args.steps * 16])  # rows trained on
        print(f"{strategy:8s} {dt / args.steps:5.2f} s/step  {real / dt:8,.0f} real tokens/s")


if __name__ == "__main__":
    main()
