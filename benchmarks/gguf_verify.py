"""Which weights to serve on a CPU: the demo's model as GGUF (f32, f16, q8_0) in llama.cpp, against
transformers in fp32, bf16 and torch's dynamic int8, all on the same threads. For each: generation speed
(tokens/s, one sequence, greedy, prompt processing included) and greedy agreement with transformers fp32 (the share
of generated tokens before the first difference, over the prompts; f16 GGUF is also compared with the
f16-rounded weights, which is what the export stage's check requires to be exact).

    .venv/bin/python benchmarks/gguf_verify.py                    # runs/demo's dpo model, 2 threads
    .venv/bin/python benchmarks/gguf_verify.py --model specialist --threads 2 --tokens 128

Needs a finished `make demo` and xllamacpp (llama.cpp's prebuilt binding; `make setup` installs it). llama.cpp
runs in process through llama-server's completion code (slmforge.deploy.gguf.LlamaCpp), so its tokens/s include
that code's per-request work. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from slmforge.records import MODELS  # model -> the stage that makes it

REPO = Path(__file__).resolve().parents[1]


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    n = sum(len(x) for x in a)
    same = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b))
    return round(same / n, 4)


def timed(fn, prompts_ids: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    """Greedy tokens per prompt and tokens/s (prompt processing included, ~50 tokens of each 128+50)."""
    outs, started = [], time.perf_counter()
    for ids in prompts_ids:
        outs.append(fn(ids))
    return outs, len(prompts_ids) * n / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=str(REPO / "runs" / "demo"))
    p.add_argument("--model", default="dpo", choices=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--prompts", type=int, default=4)
    args = p.parse_args()

    import torch

    from slmforge.artifacts import ArtifactStore
    from slmforge.deploy.gguf import (
        LlamaCpp,
        hf_greedy,
        llama_cpp_version,
        reference_model,
        verify_prompts,
        write_gguf,
    )
    from slmforge.models.modeling import load_model
    from slmforge.records import read_documents

    torch.set_num_threads(args.threads)
    store = ArtifactStore(Path(args.workdir))
    src = store.resolve(f"{MODELS[args.model]}:latest").path / args.model
    curate = store.resolve("curate:latest")
    domain = [s for s, r in curate.manifest["metrics"]["roles"].items() if r == "domain"]
    texts = [r["text"] for r in read_documents(curate.path / "data" / "test", domain[0], columns=["text"])][:args.prompts]
    model, tok = load_model(src)
    model.eval()
    ctx = model.config.max_position_embeddings
    prompts = verify_prompts(tok, texts, chat=False, k=args.prompts)
    ids = [tok(t)["input_ids"][: ctx - args.tokens] for t in prompts]

    rows = []
    def hf(m):
        return lambda x: hf_greedy(m, x, args.tokens)[0]

    ref, tps = timed(hf(model), ids, args.tokens)
    rows.append({"engine": "transformers", "weights": "fp32", "tokens_per_s": round(tps, 1), "agreement": 1.0})
    bf16, _ = load_model(src, dtype=torch.bfloat16)
    out, tps = timed(hf(bf16.eval()), ids, args.tokens)
    rows.append({"engine": "transformers", "weights": "bf16", "tokens_per_s": round(tps, 1),
                 "agreement": prefix_agreement(ref, out)})
    with warnings.catch_warnings():  # torch deprecates its quantized tensors (still the CPU int8 path in 2.13)
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(load_model(src)[0].eval(), {torch.nn.Linear}, dtype=torch.qint8)
    out, tps = timed(hf(int8), ids, args.tokens)
    rows.append({"engine": "transformers", "weights": "dynamic int8", "tokens_per_s": round(tps, 1),
                 "agreement": prefix_agreement(ref, out)})
    f16_ref, _ = timed(hf(reference_model(src, "f16")[0]), ids, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in ("f32", "f16", "q8_0"):
            g = write_gguf(src, Path(tmp) / f"m.{outtype}.gguf", outtype, args.model)
            llm = LlamaCpp(Path(tmp) / g["file"], ctx, args.threads)
            out, tps = timed(lambda x, llm=llm: llm.greedy(x, args.tokens), ids, args.tokens)
            llm.close()
            row = {"engine": "llama.cpp", "weights": outtype, "tokens_per_s": round(tps, 1),
                   "agreement": prefix_agreement(ref, out), "file_mb": round(g["bytes"] / 2**20, 2)}
            if outtype == "f16":
                row["agreement_with_f16_weights"] = prefix_agreement(f16_ref, out)
            rows.append(row)

    print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, context {ctx}), "
          f"{args.threads} threads, {len(ids)} prompts x {args.tokens} greedy tokens, {llama_cpp_version()}")
    print(f"{'engine':13s} {'weights':13s} {'tokens/s':>9s} {'agreement':>10s} {'file MB':>8s}")
    for r in rows:
        print(f"{r['engine']:13s} {r['weights']:13s} {r['tokens_per_s']:9.1f} {r['agreement']:10.3f} "
              f"{r.get('file_mb', ''):>8}" + (f"  (vs f16 weights: {r['agreement_with_f16_weights']:.3f})"
                                              if "agreement_with_f16_weights" in r else ""))
    print(json.dumps({"model": args.model, "threads": args.threads, "tokens": args.tokens, "prompts": len(ids),
                      "rows": rows}))


if __name__ == "__main__":
    main()
