"""Seed-to-seed noise of post-training on the demo: sft and dpo trained again with other seeds (data
order, dropout-free init of nothing else: the same pretrained specialist and the same synth data),
scored by the evaluate stage on the same benchmark items, next to the demo's own (seed 0) scores.

    .venv/bin/python benchmarks/posttrain_seeds.py                 # seed 1 against the demo's seed 0
    .venv/bin/python benchmarks/posttrain_seeds.py --seeds 1 2

Needs a finished `make demo` (it reuses runs/demo's curate, pretrain, synth and bench artifacts) and
writes to runs/seeds/. Prints each model's headline scores per seed and the largest difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    args = p.parse_args()

    from slmforge.artifacts import ArtifactStore
    from slmforge.config import load_recipe
    from slmforge.stages import dpo, evaluate, sft

    recipe = load_recipe(args.recipe)
    demo = ArtifactStore(recipe.workdir)
    base = {s: demo.resolve(f"{s}:latest") for s in ("curate", "pretrain", "synth", "bench")}
    rows = {0: json.loads((demo.resolve("evaluate:latest").path / "results.json").read_text())["benchmarks"]}
    for seed in args.seeds:
        store = ArtifactStore(REPO / "runs" / "seeds" / f"seed-{seed}")
        s_art = sft.run(recipe.stages["sft"].model_copy(update={"seed": seed}), store, base)
        d_art = dpo.run(recipe.stages["dpo"].model_copy(update={"seed": seed}), store, {**base, "sft": s_art})
        ecfg = recipe.stages["evaluate"].model_copy(update={"models": ["sft", "dpo"], "select": None, "samples": 0})
        e_art = evaluate.run(ecfg, store, {**base, "sft": s_art, "dpo": d_art})
        rows[seed] = json.loads((e_art.path / "results.json").read_text())["benchmarks"]
    headline = dict(base["bench"].manifest["metrics"]["headline"], qa="f1")
    tasks = {t.rsplit("_", 1)[-1]: t for t in base["bench"].manifest["metrics"]["tasks"]}
    print(f"{'model':15s} {'metric':28s} " + " ".join(f"seed {s:<3d}" for s in rows) + "  max diff")
    for model in ("sft", "sft-rationale", "dpo"):
        for s, metric in headline.items():
            vals = [rows[seed].get(model, {}).get(tasks[s], {}).get(metric) for seed in rows]
            if None in vals:
                continue
            print(f"{model:15s} {s + ' ' + metric:28s} " + " ".join(f"{v:8.3f}" for v in vals) +
                  f"  {max(vals) - min(vals):8.3f}")


if __name__ == "__main__":
    main()
