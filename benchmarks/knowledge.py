"""Knowledge mode (BLADE-style) on the demo's QA set: does the specialist's passage help a generalist?

`slmforge serve` runs in this process (uvicorn on loopback) with the demo's dpo specialist and a
generalist (default: SmolLM2-135M-Instruct, the built-in base; --generalist takes a catalog name or
folder), the generalist also being the local fallback. For every item of the demo's qa benchmark (bench's
test split, never trained on) the question alone, closed-book (the benchmark's own passage is NOT given),
is asked twice through the official openai client, greedy: to the generalist directly, and with
`slmforge: {knowledge: true}`, where the routed specialist first writes --passage-tokens tokens about
the question and the generalist answers with that passage in its system prompt. Both answers are scored
against the reference answer with the benchmark's token F1; the difference is tested with a paired
permutation test (slmforge.evaluation.stats.compare). --clients requests run at once (the server batches them).

    .venv/bin/python benchmarks/knowledge.py --workdir runs/demo     # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router import DEMO, demo_exports  # benchmarks/router.py: the export-like demo folders


def f1(pred: str, ref: str) -> float:
    """The qa benchmark's token F1 (slmforge.evaluation.prompts UTILS: _f1), here so the score is the benchmark's."""
    p, r = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", ref.lower())
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(DEMO), help="a run's workdir with curate, pretrain, dpo, bench")
    p.add_argument("--out", default="/tmp/slmforge-knowledge", help="where the export-like folders go")
    p.add_argument("--generalist", default="smollm2-135m", help="a base name, catalog name or model folder")
    p.add_argument("--items", type=int, default=60, help="qa items (at most the benchmark's)")
    p.add_argument("--passage-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48, help="answer length")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import openai
    import torch
    import uvicorn

    from slmforge.artifacts import ArtifactStore
    from slmforge.evaluation.stats import compare
    from slmforge.models import bases
    from slmforge.serve.app import create_app
    from slmforge.serve.config import Config

    torch.set_num_threads(args.threads)
    spec = demo_exports(Path(args.out), Path(args.workdir))[0]
    gen = str(bases.get(args.generalist).path) if bases.is_name(args.generalist) else args.generalist
    bench = ArtifactStore(Path(args.workdir)).resolve("bench:latest")
    items = [json.loads(x) for x in (bench.path / "tasks" / "qa.jsonl").read_text().splitlines() if x.strip()]
    items = items[: args.items]

    cfg = Config(models=[str(spec)], fallback=gen, max_concurrency=args.clients, max_queue=4 * args.clients,
                 router={"eval_docs": 0})
    app = create_app(cfg, log=lambda msg: print(msg, file=sys.stderr))
    gen_name = app.state.server.fallback_local
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none",
                           max_retries=0, timeout=600)

    def ask(item: dict, knowledge: bool) -> dict:
        extra = {"slmforge": {"knowledge": True, "passage_tokens": args.passage_tokens}} if knowledge else {}
        r = client.chat.completions.create(model="auto" if knowledge else gen_name, temperature=0,
                                           max_tokens=args.max_tokens, extra_body=extra,
                                           messages=[{"role": "user", "content": item["question"]}])
        answer = r.choices[0].message.content
        ext = r.model_extra.get("slmforge") or {}
        return {"answer": answer, "f1": f1(answer, item["answer"]), "model": r.model,
                "specialist": (ext.get("knowledge") or {}).get("specialist"),
                "passage": (ext.get("knowledge") or {}).get("passage")}

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            plain = list(pool.map(lambda it: ask(it, False), items))
            helped = list(pool.map(lambda it: ask(it, True), items))
    finally:
        server.should_exit = True
    wall = time.perf_counter() - t0
    a, b = [x["f1"] for x in helped], [x["f1"] for x in plain]
    test = compare(a, b)
    passage_f1 = [f1(x["passage"] or "", it["answer"]) for x, it in zip(helped, items, strict=True)]
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    print(f"\nknowledge mode on {len(items)} qa items of {bench.path} (closed-book questions, greedy, "
          f"{args.passage_tokens}-token passages, answers of at most {args.max_tokens} tokens)")
    print(f"{'who answers':<46} {'token F1':>8}")
    print(f"{gen_name + ' alone':<46} {mean(b):>8}")
    print(f"{gen_name + ' + ' + spec.name + ' passage':<46} {mean(a):>8}")
    print(f"{'(the passage itself, as an answer)':<46} {mean(passage_f1):>8}")
    print(f"difference {mean(a) - mean(b):+.4f}: {test['test']} p = {test['p_value']} -> {test['verdict']}")
    print(json.dumps({"benchmark": "knowledge", "items": len(items), "generalist": gen_name, "specialist": spec.name,
                      "f1_alone": mean(b), "f1_with_passage": mean(a), "f1_passage": mean(passage_f1),
                      "test": test, "wall_s": round(wall, 1), "examples": [
                          {"question": it["question"], "reference": it["answer"], "alone": x["answer"],
                           "passage": y["passage"], "with_passage": y["answer"]}
                          for it, x, y in list(zip(items, plain, helped, strict=True))[:3]],
                      "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
