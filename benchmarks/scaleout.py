"""pretrain in 1 process, 2 processes under DDP and 2 under FSDP (CPU, gloo, one thread each): how far the
loss curves part, tokens/s, and what a checkpoint holds per process.

    .venv/bin/python benchmarks/scaleout.py [--tokens 100k] [--workdir runs/scaleout]

Runs recipes/tiny.yaml's data stages once, then `slmforge pretrain` (specialist only, fp32, a checkpoint
every 10 steps) in each setting on copies of that workdir, and prints a Markdown table. On 2 cores the
two processes share the cores that one process has to itself, so tokens/s shows the collectives' cost,
not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict, ckpt_glob: str, root: Path) -> tuple[float, dict]:
    """Run; meanwhile note the largest sharded or single checkpoint seen (file sizes per file)."""
    seen: dict = {}
    stop = threading.Event()

    def poll():
        while not stop.wait(0.05):
            for c in root.glob(ckpt_glob):
                files = [c] if c.is_file() else [p for p in c.iterdir() if p.is_file()]
                try:
                    sizes = {p.name: p.stat().st_size for p in files}
                except OSError:
                    continue
                if sum(sizes.values()) > sum(seen.values()):
                    seen.clear()
                    seen.update(sizes)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return wall, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="100k")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "scaleout"))
    args = ap.parse_args()
    work = Path(args.workdir)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    recipe = REPO / "recipes" / "tiny.yaml"
    sets = ["--set", "pretrain.precision=fp32", "--set", "pretrain.baseline=false", "--set",
            f"pretrain.tokens={args.tokens}", "--set", "pretrain.checkpoint_every=10"]
    base = work / "data"
    if not (base / "tokenizer").is_dir():
        subprocess.run([sys.executable, "-m", "slmforge.cli", "run", str(recipe), "--until", "tokenizer", "--set",
                        f"workdir={base}"], check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"),
              "--main_process_port"]
    settings = {"1 process": [sys.executable], "2 processes, DDP": [*launch, "29611"],
                "2 processes, FSDP": [*launch, "29621"]}
    rows, curves = [], {}
    for name, prefix in settings.items():
        w = work / name.replace(" ", "").replace(",", "-")
        shutil.rmtree(w, ignore_errors=True)
        shutil.copytree(base, w, symlinks=True)
        more = ["--set", "pretrain.parallel=fsdp"] if "FSDP" in name else []
        cmd = [*prefix, "-m", "slmforge.cli", "pretrain", "--recipe", str(recipe), "--set", f"workdir={w}", *sets, *more]
        wall, ckpt = _run(cmd, env, "pretrain/*.partial/specialist.ckpt*", w)
        [d] = [p for p in (w / "pretrain").iterdir() if p.is_dir() and not p.is_symlink()]
        m = json.loads((d / "manifest.json").read_text())["metrics"]["models"]["specialist"]
        curves[name] = [json.loads(x)["loss"] for x in (d / "specialist" / "train_log.jsonl").read_text().splitlines()]
        biggest = max(ckpt.values(), default=0)
        rows.append((name, m["steps"], m["tokens_per_s"], m["final_loss"], len(ckpt), biggest, wall))
    ref = curves["1 process"]
    print(f"pretrain, recipes/tiny.yaml's specialist, {args.tokens} tokens, fp32, OMP_NUM_THREADS=1 per process\n")
    print("| setting | steps | tokens/s | final loss | max abs loss difference from 1 process | checkpoint files "
          "| largest checkpoint file | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, steps, tps, loss, n_files, biggest, wall in rows:
        diff = max(abs(a - b) for a, b in zip(ref, curves[name]))
        print(f"| {name} | {steps} | {tps:,.0f} | {loss:.4f} | {diff:.2e} | {n_files} | {biggest / 1e6:.2f} MB "
              f"| {wall:.0f} |")


if __name__ == "__main__":
    main()
