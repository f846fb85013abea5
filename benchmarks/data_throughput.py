"""Data-stage throughput: ingest MB/s, curate MB/s and tokenizer training time, on the PostgreSQL manual.

Runs the real ingest -> curate -> tokenizer stages through slmforge's Python API (a temporary recipe
with one domain source, a fresh temporary workdir, so nothing comes from the cache) and reads each
stage's `wall_time_s` and sizes from the artifact manifests:

  ingest    MB/s = decompressed input bytes / ingest wall time
  curate    MB/s = document text (10^6 characters, ingest manifest `chars`) / curate wall time,
                   curate's default config with `workers` from --workers (one datatrove task per
                   ingest shard of `shard_mb` text: the manual makes 2)
  tokenizer s    = BPE training time for vocab 8192 (tokenizer manifest `train_time_s`),
                   and the whole stage's wall time (training, saving, evaluation)

MB = 10^6 bytes. Prints a table, then one JSON line with every figure, the command line and the machine.

    .venv/bin/python benchmarks/data_throughput.py                    # the full manual (minutes)
    .venv/bin/python benchmarks/data_throughput.py --limit-docs 60    # a quick check
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "postgresql_docs.jsonl.gz"
VOCAB = 8192


def read_lines(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return [ln for ln in raw.split(b"\n") if ln.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, metavar="PATH",
                    help="a .jsonl or .jsonl.gz file with a 'text' field (default: the PostgreSQL manual)")
    ap.add_argument("--limit-docs", type=int, default=None, metavar="N",
                    help="use only the first N documents")
    ap.add_argument("--workers", type=int, default=2, help="curate worker processes (default 2)")
    args = ap.parse_args()

    from slmforge.config import load_recipe
    from slmforge.pipeline import run_recipe

    data = args.data.resolve()
    lines = read_lines(data)
    with tempfile.TemporaryDirectory(prefix="slmforge-bench-") as tmp:
        tmp = Path(tmp)
        if args.limit_docs:
            lines = lines[: args.limit_docs]
            data = tmp / "input.jsonl.gz"
            data.write_bytes(gzip.compress(b"".join(ln + b"\n" for ln in lines)))
        input_bytes = sum(len(ln) + 1 for ln in lines)  # decompressed, what ingest parses
        recipe = {  # JSON is YAML
            "name": "bench", "workdir": str(tmp / "work"),
            "ingest": {"sources": [{"name": "domain", "role": "domain", "paths": [str(data)]}]},
            "curate": {"workers": args.workers},
            "tokenizer": {"vocab_size": VOCAB},
        }
        recipe_path = tmp / "bench.yaml"
        recipe_path.write_text(json.dumps(recipe, indent=2))
        t0 = time.perf_counter()
        arts = run_recipe(load_recipe(recipe_path))
        total_s = time.perf_counter() - t0
        ing, cur, tok = (arts[s].manifest for s in ("ingest", "curate", "tokenizer"))

    text_chars = ing["metrics"]["chars"]
    docs_out = sum(per["docs"] for src in cur["metrics"]["splits"].values() for per in src.values())
    r = {
        "data": str(args.data.resolve()),
        "docs": ing["metrics"]["docs"],
        "input_bytes_compressed": ing["metrics"]["sources"]["domain"]["bytes_in"],
        "input_bytes_decompressed": input_bytes,
        "ingest_s": ing["wall_time_s"],
        "ingest_mb_s": round(input_bytes / 1e6 / ing["wall_time_s"], 3),
        "curate_text_mchars": round(text_chars / 1e6, 3),
        "curate_docs_in": cur["metrics"]["docs_in"],
        "curate_docs_out": docs_out,
        "curate_workers": args.workers,
        "curate_shards": ing["metrics"]["sources"]["domain"]["shards"],
        "curate_s": cur["wall_time_s"],
        "curate_mb_s": round(text_chars / 1e6 / cur["wall_time_s"], 3),
        "tokenizer_vocab": tok["metrics"]["vocab_size"],
        "tokenizer_train_mchars": round(tok["metrics"]["train_chars"] / 1e6, 3),
        "tokenizer_train_s": tok["metrics"]["train_time_s"]["tokenizer"],
        "tokenizer_stage_s": tok["wall_time_s"],
        "pipeline_s": round(total_s, 3),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "mem_gb": ing["hardware"].get("mem_gb"),
                    "versions": ing["versions"]},
    }

    rows = [
        ("ingest", f"{input_bytes / 1e6:.2f} MB in ({r['docs']} docs)", f"{r['ingest_s']:.2f}",
         f"{r['ingest_mb_s']:.2f} MB/s"),
        ("curate", f"{r['curate_text_mchars']:.2f} MB text, {docs_out} docs kept", f"{r['curate_s']:.2f}",
         f"{r['curate_mb_s']:.2f} MB/s ({args.workers} workers)"),
        ("tokenizer train", f"{r['tokenizer_train_mchars']:.2f} MB text, vocab {VOCAB}",
         f"{r['tokenizer_train_s']:.2f}", ""),
        ("tokenizer stage", "train + save + evaluate", f"{r['tokenizer_stage_s']:.2f}", ""),
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(("stage", "size", "seconds", "throughput"), *rows)]
    for row in [("stage", "size", "seconds", "throughput"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print(f"({os.cpu_count()} CPUs; whole pipeline {total_s:.1f}s)")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
