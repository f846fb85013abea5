"""compress: what distillation costs per token, and what each variant is worth after equal tokens.

1. Throughput (--steps, default 6 timed after 1 warm-up): SmolLM2-135M pruned to a quarter (compress's
   default ratio, importance on 64 shipped PostgreSQL sequences), trained in slmforge.training.loop's loop on
   2 x 1024-token sequences per step (recipes/compress.yaml's batch), bf16 autocast where supported:
   LM loss only against logit distillation (the teacher's forward included); and the teacher's own
   training step (what continued pretraining of the 135M model costs per token), for scale.
2. Quality (--run, default recipes/compress.yaml's evaluate in runs/dapt, as `make compress` leaves it):
   every model the recipe scored, on the same items: bits per byte on each test split, the choice sets'
   headline metrics and QA F1, the training FLOPs of the model's whole lineage (6·N·D per trained stage,
   2·N_teacher·D for the teacher's forward in distillation, and the calibration pass), and for each
   choice set a paired test (McNemar exact, slmforge.evaluation.stats) of each compressed model against the
   teacher and against SmolLM2 as it is; a margin with p >= 0.05 reads "no difference shown".

    .venv/bin/python benchmarks/compress.py                     # both
    .venv/bin/python benchmarks/compress.py --skip-throughput   # the table only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def corpus_stream(tokenizer, docs: int = 400):
    import gzip

    import numpy as np

    ids = []
    with gzip.open(REPO / "data" / "postgresql_docs.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= docs:
                break
            ids += [tokenizer.bos_token_id, *tokenizer(json.loads(line)["text"])["input_ids"], tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def throughput(steps: int, ratio: float) -> dict:
    import torch

    from slmforge.hardware import peak_flops, use_bf16
    from slmforge.models import bases
    from slmforge.models.modeling import load_model, shape_of
    from slmforge.training import prune
    from slmforge.training.distill import Distiller
    from slmforge.training.loop import TrainConfig, setup, train_step
    from slmforge.training.packing import Sampler

    torch.set_num_threads(os.cpu_count() or 1)
    teacher, tok = load_model(bases.get("smollm2-135m").path)
    stream = corpus_stream(tok)
    calib = stream[: 64 * 128].reshape(64, 128)
    bf16 = use_bf16("auto")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    t0 = time.perf_counter()
    imp = prune.importance(teacher, calib, 8, autocast)
    calib_s = time.perf_counter() - t0
    shape = prune.target_sizes(teacher.config, ratio * sum(p.numel() for p in teacher.parameters()))
    student = prune.prune(teacher, prune.choose(imp, teacher.config, shape))
    cfg = TrainConfig(tokens=10**9, batch_tokens=2048, micro_batch=2, lr=1e-3)
    peak = peak_flops(bf16)
    out = {"shape": shape.__dict__, "student_params": sum(p.numel() for p in student.parameters()),
           "teacher_params": sum(p.numel() for p in teacher.parameters()), "bf16": bf16,
           "calibration_tokens_per_s": round(imp.tokens / calib_s, 1), "threads": torch.get_num_threads()}
    runs = {"student, LM loss": (student, None), "student, distillation (teacher forward included)":
            (student, Distiller(teacher, 0.5, 1.0)), "teacher (135M), LM loss": (teacher, None)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, loss) in runs.items():
            model = copy.deepcopy(model)
            for p in model.parameters():  # the Distiller froze the teacher's; its own run trains them
                p.requires_grad_(True)
            sampler = Sampler({"pg": stream}, ["pg"], 1024, 0)
            loop = setup("bench", cfg, model, shape_of(model, 1024), sampler, {}, Path(tmp), peak, bf16,
                         stage="benchmark", loss=loss)
            train_step(loop, 0, 1000)  # warm-up
            t0 = time.perf_counter()
            for s in range(1, steps + 1):
                train_step(loop, s, 1000)
            dt = time.perf_counter() - t0
            out[name] = round(steps * loop.tokens_per_step / dt, 1)
            print(f"  {name}: {out[name]:,.0f} tokens/s", flush=True)
    return out


def quality(run: Path | None) -> dict:
    from slmforge.artifacts import ArtifactStore
    from slmforge.config import load_recipe
    from slmforge.evaluation.results import set_tasks
    from slmforge.evaluation.stats import compare
    from slmforge.pipeline import stage_states
    from slmforge.records import model_lineage

    if run is None:
        recipe = load_recipe(REPO / "recipes" / "compress.yaml", [])
        keys = {p.stage: (p.key, p.state) for p in stage_states(recipe)}
        key, state = keys["evaluate"]
        if state != "done":
            raise SystemExit("benchmarks/compress.py: recipes/compress.yaml has not been evaluated; run `make compress`")
        store = ArtifactStore(recipe.workdir)
        run = store.load("evaluate", key).path
    store = ArtifactStore(run.parents[1])
    res = json.loads((run / "results.json").read_text())
    tasks, head = set_tasks(res), res["headline"]
    rows = {}
    for name, meta in res["models"].items():
        flops, tokens = 0.0, {}
        if meta.get("stage"):
            for m in model_lineage(store, meta["stage"], meta["key"], name):
                flops += m.meta.get("flops_with_pruning") or m.meta.get("flops") or 0
                tokens[f"{m.stage}/{m.model}"] = m.tokens
        bench = res["benchmarks"].get(name, {})
        rows[name] = {"params": (meta.get("shape") or {}).get("params"), "flops": flops, "tokens": tokens,
                      "bpb": {s: v["bpb"] for s, v in res["scores"].get(name, {}).items()},
                      "scores": {s: bench.get(tasks[s], {}).get(k) for s, k in head.items() if s in tasks}
                      | {"qa f1": bench.get(tasks.get("qa", ""), {}).get("f1")},
                      "outcomes": {s: res["outcomes"].get(name, {}).get(tasks[s], {}).get(k)
                                   for s, k in head.items() if s in tasks}}
    tests = []
    refs = [r for r in ("specialist", "smollm2") if r in rows]
    for name in (n for n in rows if n not in refs):
        for ref in refs:
            for s in head:
                a, b = rows[name]["outcomes"].get(s), rows[ref]["outcomes"].get(s)
                if a is None or b is None:
                    continue
                t = compare(a, b)
                diff = rows[name]["scores"][s] - rows[ref]["scores"][s]
                tests.append({"model": name, "against": ref, "set": s, "diff": round(diff, 4),
                              "p_value": t["p_value"], "verdict": ("better" if diff > 0 else "worse")
                              if t["p_value"] < 0.05 else "no difference shown"})
    return {"evaluate": str(run), "rows": rows, "tests": tests, "headline": head,
            "domain": res["domain_sources"], "general": res["general_sources"]}


def print_quality(q: dict) -> None:
    sources = [*q["domain"], *q["general"]]
    cols = list(next(iter(q["rows"].values()))["scores"])
    print("| model | params | " + " | ".join(f"{s} bpb" for s in sources) + " | "
          + " | ".join(f"{c} {q['headline'].get(c, '')}".strip() for c in cols) + " | training FLOPs |")
    print("|---" * (3 + len(sources) + len(cols)) + "|")
    for name, r in q["rows"].items():
        print(f"| {name} | {(r['params'] or 0) / 1e6:.1f}M | "
              + " | ".join(f"{r['bpb'].get(s, float('nan')):.3f}" for s in sources) + " | "
              + " | ".join("-" if r["scores"][c] is None else f"{r['scores'][c]:.3f}" for c in cols)
              + f" | {r['flops']:.2e} |")
    print()
    for t in q["tests"]:
        print(f"  {t['model']} vs {t['against']} on {t['set']}: {t['diff']:+.3f}, p = {t['p_value']:.3g}: {t['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--run", type=Path, default=None, help="an evaluate artifact folder (default: the recipe's)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    out = {"command": " ".join(shlex.quote(a) for a in ["benchmarks/compress.py", *sys.argv[1:]])}
    if not args.skip_throughput:
        print("throughput (tokens/s of the trained model, one optimizer step = 2 x 1024 tokens):")
        out["throughput"] = throughput(args.steps, args.ratio)
    out["quality"] = quality(args.run)
    print_quality(out["quality"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
