"""Load test of `slmforge serve` with the official openai client on loopback.

The server runs in its own process (`python -m slmforge.serve`, as `slmforge serve` does) with the
demo's models as export-like folders (benchmarks/router.py: demo_exports): the latest dpo model as the
postgres specialist and the latest pretrain's generalist, so `model: "auto"` routes between them. For each
level of concurrency (1, 4, 16 clients by default) every client, a thread with its own openai.OpenAI
(max_retries=0, so a 429 or any error is counted as a failure, not retried), sends --requests chat
completions in turn: model "auto", a prompt made of the first 200 characters of a held-out document
(alternating postgres / general), max_tokens --max-tokens, temperature 0.7, seed = request number.
After 4 warm-up requests (not reported), per level: p50 / p95 request latency, completion tokens per second over the level's wall time, failures,
and how often auto picked the model of the prompt's domain. The server's --max-queue is sized for 16
clients. Before the load, the decode speed of the specialist in each --dtype choice (float32, bfloat16,
int8 dynamic quantization), serve's own decode loop against transformers' generate, in this process on
--threads (default 2) torch threads: this picks serve's default dtype and justifies the loop.
Then the batching table (serve's batcher against transformers' continuous batching and one-at-a-time
decoding), the per-token cost of a JSON grammar, and after the load --structured json_schema requests,
each parsed and validated. Prints tables and one JSON line.

    .venv/bin/python benchmarks/serve_load.py                     # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/serve_load.py --levels 1 4 --requests 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router import DEMO, demo_exports  # benchmarks/router.py: the export-like demo folders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folders: list[Path], port: int, args) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "slmforge.serve", "--port", str(port), "--max-queue", str(args.max_queue),
           "--max-concurrency", str(args.max_concurrency), "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for f in folders:
        cmd += ["--model", str(f)]
    with open(args.log, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {args.log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer within 300 s; see {args.log}")


def run_level(url: str, clients: int, requests: int, prompts: list[tuple[str, str]], max_tokens: int) -> dict:
    import openai

    lat: list[float] = []
    tokens, failures, right, errors = [0], [0], [0], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(ci: int):
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        barrier.wait()
        for k in range(requests):
            i = ci * requests + k
            domain_model, prompt = prompts[i % len(prompts)]
            t0 = time.perf_counter()
            try:
                r = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=0.7, seed=i)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    tokens[0] += r.usage.completion_tokens
                    right[0] += r.model == domain_model
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever it is
                with lock:
                    failures[0] += 1
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) >= 2 else lat * 19
    return {"clients": clients, "requests": clients * requests, "ok": len(lat), "failures": failures[0],
            "p50_s": round(statistics.median(lat), 3) if lat else None, "p95_s": round(q[18], 3) if lat else None,
            "completion_tokens": tokens[0], "wall_s": round(wall, 2), "tokens_per_s": round(tokens[0] / wall, 1),
            "routed_to_domain_model": round(right[0] / len(lat), 3) if lat else None, "errors": errors[:5]}


def decode_speed(folder: Path, tokens: int, repeats: int, threads: int) -> dict:
    """ms per generated token, best of `repeats`, interleaved across the settings: serve's decode loop
    (slmforge.serve.decode.generate, greedy) and transformers' model.generate, per --dtype choice."""
    import warnings

    import torch

    from slmforge.serve.config import DTYPES
    from slmforge.serve.decode import GenResult, generate
    from slmforge.serve.models import load_served, resolve

    warnings.filterwarnings("ignore")  # torch.ao.quantization's deprecation notice
    torch.set_num_threads(threads)
    served = {dt: load_served(resolve(str(folder), None), dt) for dt in DTYPES}
    ids = served["float32"].tok("The SELECT statement retrieves rows from").input_ids

    def loop(m):
        res = GenResult()
        m.eos_ids, eos = set(), m.eos_ids  # run all `tokens` steps
        try:
            for _ in generate(m, ids, tokens, 0.0, 1.0, 0, [], res):
                pass
        finally:
            m.eos_ids = eos

    def hf(m):
        with torch.inference_mode():
            m.model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=m.tok.pad_token_id)

    best: dict = {}
    for _ in range(repeats):
        for dt, m in served.items():
            for name, fn in (("serve_loop", loop), ("hf_generate", hf)):
                t0 = time.perf_counter()
                fn(m)
                ms = (time.perf_counter() - t0) * 1000 / tokens
                best[f"{dt}/{name}"] = round(min(best.get(f"{dt}/{name}", 1e9), ms), 3)
    return best


def batch_speed(folder: Path, prompts: list[str], tokens: int, threads: int) -> dict:
    """Tokens per second decoding len(prompts) greedy sequences of `tokens` tokens at once: serve's batcher
    (slmforge.serve.batch), transformers' continuous batching (`generate_batch`, paged SDPA) and serve's
    loop one sequence at a time; each run twice, the second reported (the first pays torch's first calls)."""
    import threading

    import torch
    from transformers import GenerationConfig

    from slmforge.serve.batch import Batcher
    from slmforge.serve.decode import GenResult, Sequence, generate
    from slmforge.serve.models import load_served, resolve

    torch.set_num_threads(threads)
    m = load_served(resolve(str(folder), None), "float32")
    m.eos_ids = set()  # every sequence runs all `tokens` steps
    ids = [m.tok(p).input_ids[:64] for p in prompts]
    batcher = Batcher(m.model, len(ids), "bench")

    def ours():
        done = threading.Semaphore(0)
        for x in ids:
            batcher.submit(Sequence(m, x, tokens, 0.0, 1.0, None, [], GenResult()),
                           lambda kind, v: kind != "piece" and done.release(), threading.Event())
        for _ in ids:
            done.acquire()

    def alone():
        for x in ids:
            for _ in generate(m, x, tokens, 0.0, 1.0, None, [], GenResult()):
                pass

    hf_model = None

    def hf_batch():
        nonlocal hf_model
        if hf_model is None:
            hf_model = load_served(resolve(str(folder), None), "float32").model
            hf_model.set_attn_implementation("paged|sdpa")
        gc = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=m.tok.pad_token_id or 0)
        hf_model.generate_batch(inputs=ids, generation_config=gc)

    out = {"sequences": len(ids), "tokens_each": tokens}
    for name, fn in (("serve_batcher", ours), ("hf_generate_batch", hf_batch), ("serve_one_at_a_time", alone)):
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        out[name] = round(len(ids) * tokens / dt, 1)
    return out


def structured(url: str, model: str, n: int, max_tokens: int) -> dict:
    """`n` chat requests with a json_schema response_format (sampled, seeds 0..n-1): how many parse and
    validate, and the mean completion tokens."""
    import jsonschema
    import openai

    schema = {"type": "object", "properties": {
        "statement": {"enum": ["SELECT", "INSERT", "UPDATE", "DELETE", "CREATE INDEX", "VACUUM"]},
        "table": {"type": "string", "maxLength": 24}, "rows": {"type": "integer", "minimum": 0},
        "needs_superuser": {"type": "boolean"}},
        "required": ["statement", "table", "rows", "needs_superuser"], "additionalProperties": False}
    c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
    valid, tokens, errors = 0, 0, []
    t0 = time.perf_counter()
    for i in range(n):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Which statement "
                                      "removes dead rows from the orders table?"}], max_tokens=max_tokens,
                                      temperature=0.7, seed=i, response_format={"type": "json_schema", "json_schema": {
                                          "name": "statement", "schema": schema, "strict": True}})
        tokens += r.usage.completion_tokens
        try:
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            errors.append(f"{r.choices[0].finish_reason}: {r.choices[0].message.content[:80]!r} ({e})"[:200])
    return {"requests": n, "valid": valid, "mean_completion_tokens": round(tokens / n, 1),
            "wall_s": round(time.perf_counter() - t0, 2), "errors": errors[:5]}


def grammar_overhead(folder: Path, tokens: int, threads: int) -> dict:
    """ms per token of one greedy sequence with and without a JSON grammar (json_object: every token may
    stay allowed, so both decode `tokens` tokens), best of 3."""
    import torch

    from slmforge.serve.decode import GenResult, generate
    from slmforge.serve.models import load_served, resolve
    from slmforge.serve.structured import Grammar, Tokenizers, grammar_for

    torch.set_num_threads(threads)
    m = load_served(resolve(str(folder), None), "float32")
    lltok = Tokenizers().get(m)
    m.eos_ids = set()  # the plain run makes all `tokens`; the grammar's string is too long to end sooner
    ids = m.tok("The SELECT statement retrieves rows from").input_ids
    compiled = grammar_for({"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"text": {"type": "string", "minLength": 4 * tokens}},
        "required": ["text"]}}})
    best = {"plain": 1e9, "json_schema": 1e9}
    for _ in range(3):
        for name in best:
            grammar = Grammar(lltok, compiled) if name != "plain" else None
            res = GenResult()
            t0 = time.perf_counter()
            for _ in generate(m, ids, tokens, 0.0, 1.0, None, [], res, grammar=grammar):
                pass
            best[name] = min(best[name], (time.perf_counter() - t0) * 1000 / max(res.completion_tokens, 1))
    return {k: round(v, 3) for k, v in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(DEMO), help="a run's workdir with curate, pretrain (and dpo)")
    p.add_argument("--out", default="/tmp/slmforge-serve-load", help="where the export-like folders go")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    p.add_argument("--requests", type=int, default=8, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16, help="the server's generation slots (batched)")
    p.add_argument("--max-queue", type=int, default=64, help="the server's queue (>= clients - slots)")
    p.add_argument("--structured", type=int, default=100, help="json_schema requests (0: skip)")
    p.add_argument("--batch-sequences", type=int, default=16, help="sequences of the batching table (0: skip)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="the server's torch threads")
    p.add_argument("--decode-tokens", type=int, default=48, help="tokens per decode-speed measurement (0: skip)")
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--log", default="/tmp/slmforge-serve-load.log", help="the server's log")
    args = p.parse_args()

    from slmforge.serve.router import PROMPT_CUT, read_texts

    folders = demo_exports(Path(args.out), Path(args.workdir))
    metas = [json.loads((f / "slmforge.json").read_text()) for f in folders]
    tests = [[(m["name"], t[:PROMPT_CUT]) for t in read_texts(f / "domain" / "test.jsonl", 64)]
             for f, m in zip(folders, metas)]
    prompts = [x for pair in zip(*tests) for x in pair]  # alternate the domains
    decode = {}
    if args.decode_tokens:
        decode = decode_speed(folders[0], args.decode_tokens, args.decode_repeats, args.threads or 2)
        print(f"\ndecode speed of {metas[0]['name']}, ms per token (best of {args.decode_repeats}, "
              f"{args.threads or 2} threads, {args.decode_tokens} tokens, greedy)")
        print(f"{'dtype':<10} {'serve loop':>10} {'HF generate':>12}")
        for dt in ("float32", "bfloat16", "int8"):
            print(f"{dt:<10} {decode[dt + '/serve_loop']:>10} {decode[dt + '/hf_generate']:>12}")
    batching = {}
    if args.batch_sequences:  # before the server starts: both use the cores
        batching = batch_speed(folders[0], [p for _, p in prompts[: args.batch_sequences]], args.max_tokens,
                               args.threads or 2)
        print(f"\n{args.batch_sequences} sequences x {args.max_tokens} greedy tokens at once, "
              f"{metas[0]['name']}, tokens/s (second of two runs, {args.threads or 2} threads)")
        for k in ("serve_batcher", "hf_generate_batch", "serve_one_at_a_time"):
            print(f"{k:<22} {batching[k]:>8}")
    overhead = grammar_overhead(folders[0], args.decode_tokens or 48, args.threads or 2)
    print(f"\nstructured outputs, ms per token (greedy, best of 3): plain {overhead['plain']}, "
          f"json_schema {overhead['json_schema']}")
    port = _free_port()
    t0 = time.perf_counter()
    proc = start_server(folders, port, args)
    print(f"server up in {time.perf_counter() - t0:.1f} s (log {args.log})", file=sys.stderr)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        run_level(url, 1, 4, prompts, args.max_tokens)  # warm-up (first-call costs in torch), not reported
        results = []
        for n in args.levels:
            results.append(run_level(url, n, args.requests, prompts, args.max_tokens))
            print(f"{n} clients: done", file=sys.stderr, flush=True)
        schema = structured(url, metas[0]["name"], args.structured, args.max_tokens) if args.structured else {}
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"\nslmforge serve, {len(folders)} models ({', '.join(m['name'] for m in metas)}), model auto, "
          f"max_tokens {args.max_tokens}, server slots {args.max_concurrency}, dtype {args.dtype}")
    head = (f"{'clients':>7} {'requests':>8} {'failures':>8} {'p50 s':>7} {'p95 s':>7} {'tokens/s':>9} "
            f"{'routed ok':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['failures']:>8} {r['p50_s']:>7} {r['p95_s']:>7} "
              f"{r['tokens_per_s']:>9} {r['routed_to_domain_model']:>9}")
    if schema:
        print(f"\njson_schema requests to {metas[0]['name']}: {schema['valid']}/{schema['requests']} parse and "
              f"validate, {schema['mean_completion_tokens']} tokens each on average")
        for e in schema["errors"]:
            print("  ", e)
    print(json.dumps({"benchmark": "serve_load", "results": results, "decode_ms_per_token": decode,
                      "batching_tokens_per_s": batching, "grammar_ms_per_token": overhead,
                      "structured": schema,
                      "command": " ".join(shlex.quote(a) for a in sys.argv),
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}))
    if any(r["failures"] for r in results) or (schema and schema["valid"] < schema["requests"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
