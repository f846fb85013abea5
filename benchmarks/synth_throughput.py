"""Synthetic-data throughput: items/s of the extractive teacher on the PostgreSQL manual, and the
request concurrency an OpenAI-compatible teacher really reaches against a local server that answers
every request after a fixed latency (200 ms by default).

1. ingest + curate the manual into a fresh temporary workdir, then run the synth stage on every
   chunk (`max_chunks: null`, all seven kinds) and read its wall time from the manifest;
2. start the test server from tests/fake_openai.py on 127.0.0.1, send `--requests` requests through
   `slmforge.synthetic.teacher.OpenAITeacher` at each `--concurrency`, and report requests/s and the largest
   number of requests the server saw in flight at once (ideal: the configured limit; ideal speed:
   concurrency / latency);
3. with --hf-teacher NAME (a base or a folder): the local HF teacher (slmforge.synthetic.teacher.HFTeacher, bf16)
   on --hf-prompts real qa prompts from the manual's chunks (synth's own prompt), greedy, at each
   --hf-batches size; batch 1 is HF `generate` one prompt at a time. Items/minute and generated tokens/s.

    .venv/bin/python benchmarks/synth_throughput.py
    .venv/bin/python benchmarks/synth_throughput.py --limit-docs 100 --requests 40   # a quick check
    .venv/bin/python benchmarks/synth_throughput.py --limit-docs 100 --hf-teacher smollm2-135m
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def extractive(data: Path, limit: int | None, tmp: Path) -> dict:
    from slmforge.config import load_recipe
    from slmforge.pipeline import run_recipe

    if limit:
        lines = gzip.open(data, "rt", encoding="utf-8").read().splitlines()[:limit]
        data = tmp / "input.jsonl"
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = {"name": "bench", "workdir": str(tmp / "work"),
              "ingest": {"sources": [{"name": "domain", "role": "domain", "paths": [str(data)]}]},
              "curate": {}, "synth": {"max_chunks": None}}
    path = tmp / "bench.yaml"
    path.write_text(json.dumps(recipe))
    arts = run_recipe(load_recipe(path))
    m = arts["synth"].manifest
    items = sum(m["metrics"]["generated"].values())
    return {"curate": arts["curate"], "chunks": m["metrics"]["chunks"], "items": items, "kept": sum(m["metrics"]["kept"].values()),
            "synth_s": m["wall_time_s"], "items_per_s": round(items / m["wall_time_s"], 1)}


def concurrency(n_requests: int, levels: list[int], latency: float, tmp: Path) -> list[dict]:
    from slmforge.synthetic.teacher import OpenAIConfig, OpenAITeacher, Request
    from tests.fake_openai import FakeServer

    rows = []
    server = FakeServer(delay=latency)
    try:
        for c in levels:
            server.max_active = 0
            teacher = OpenAITeacher(OpenAIConfig(base_urls=[server.url], model="fake", concurrency=c, timeout_s=30),
                                    tmp / f"cache-{c}")
            reqs = [Request(key=f"r{i}", messages=[{"role": "user", "content": f"question-{c}-{i}"}])
                    for i in range(n_requests)]
            t0 = time.perf_counter()
            replies = teacher.generate(reqs)
            dt = time.perf_counter() - t0
            rows.append({"concurrency": c, "requests": n_requests, "seconds": round(dt, 2),
                         "requests_per_s": round(n_requests / dt, 1), "ideal_per_s": round(c / latency, 1),
                         "max_in_flight": server.max_active, "failed": sum(r.error is not None for r in replies)})
    finally:
        server.close()
    return rows


def hf_teacher(ref: str, curate, n_prompts: int, batches: list[int], max_tokens: int, tmp: Path) -> list[dict]:
    from slmforge.models import bases
    from slmforge.records import Curated
    from slmforge.synthetic.synthesis import render_prompt, split_chunks
    from slmforge.synthetic.teacher import HFTeacher, Request

    curated = Curated.of(curate)
    chunks = split_chunks(curated, "train", curated.domain, 1500)[:n_prompts]
    prompts = [render_prompt("qa", c, [], {})[0] for c in chunks]
    folder = bases.locate(bases.folder_or_name(ref, None))  # as a recipe's hf_model names it
    rows = []
    for b in batches:
        teacher = HFTeacher(folder, tmp / f"hf-cache-{b}", max_batch=b, dtype="bfloat16")
        reqs = [Request(key=f"q{i}", messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
                        temperature=0.0) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        replies = teacher.generate(reqs)
        dt = time.perf_counter() - t0
        gen = sum(r.usage["completion_tokens"] for r in replies)
        rows.append({"batch": b, "prompts": len(reqs), "seconds": round(dt, 1),
                     "items_per_min": round(len(reqs) / dt * 60, 1), "generated_tokens": gen,
                     "generated_tokens_per_s": round(gen / dt, 1),
                     "prompt_tokens": sum(r.usage["prompt_tokens"] for r in replies),
                     "parsed": sum(r.error is None for r in replies)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "data" / "postgresql_docs.jsonl.gz")
    ap.add_argument("--limit-docs", type=int, default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--hf-teacher", default=None, help="a base name or model folder: also time the local teacher")
    ap.add_argument("--hf-prompts", type=int, default=32)
    ap.add_argument("--hf-batches", default="1,8,32")
    ap.add_argument("--hf-max-tokens", type=int, default=128)
    args = ap.parse_args()
    hf = []
    with tempfile.TemporaryDirectory(prefix="slmforge-synth-bench-") as tmp:
        tmp = Path(tmp)
        ex = extractive(args.data, args.limit_docs, tmp)
        conc = concurrency(args.requests, [int(c) for c in args.concurrency.split(",")], args.latency, tmp)
        if args.hf_teacher:
            hf = hf_teacher(args.hf_teacher, ex.pop("curate"), args.hf_prompts,
                            [int(b) for b in args.hf_batches.split(",")], args.hf_max_tokens, tmp)
        ex.pop("curate", None)
    print(f"\nextractive teacher: {ex['items']} items ({ex['kept']} kept) from {ex['chunks']} chunks in "
          f"{ex['synth_s']:.1f} s = {ex['items_per_s']:.0f} items/s")
    print(f"\nOpenAI-compatible teacher against a local server with {args.latency * 1000:.0f} ms latency:")
    print(f"{'concurrency':>11}  {'requests/s':>10}  {'ideal':>6}  {'max in flight':>13}  {'failed':>6}")
    for r in conc:
        print(f"{r['concurrency']:>11}  {r['requests_per_s']:>10}  {r['ideal_per_s']:>6}  {r['max_in_flight']:>13}  "
              f"{r['failed']:>6}")
    if hf:
        print(f"\nlocal HF teacher {args.hf_teacher} (bf16, greedy, qa prompts, max {args.hf_max_tokens} tokens):")
        print(f"{'batch':>5}  {'items/min':>9}  {'gen tok/s':>9}  {'parsed':>6}  {'seconds':>7}")
        for r in hf:
            print(f"{r['batch']:>5}  {r['items_per_min']:>9}  {r['generated_tokens_per_s']:>9}  "
                  f"{r['parsed']:>3}/{r['prompts']:<2}  {r['seconds']:>7}")
    print(json.dumps({"extractive": ex, "concurrency": conc, "hf_teacher": hf, "latency_s": args.latency,
                      "command": " ".join([os.path.relpath(sys.executable, REPO), *sys.argv]),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
