"""What reading-comprehension pretraining does to the demo specialist, at equal training tokens.

Two pretraining runs of the demo's specialist (recipes/demo.yaml: depth 3, 2,187,264 tokens, the same
mixture schedule, seed and snapshots), which differ in one setting: `pretrain.reading`, the share of
domain sequences drawn from the synth stage's reading-comprehension texts (every train-split chunk
followed by questions mined from it: `synth.kinds: [reading]`, the extractive teacher) instead of the
raw domain text. Both are scored by the same evaluate stage settings on the same benchmark items (one
bench artifact: its qa questions by SmolLM2, as in the demo): bits per byte on each test split and the
headline metrics, with McNemar's exact test on every choice set (a margin with p >= 0.05 is "not shown").

    .venv/bin/python benchmarks/reading.py                 # reading 0 against 0.3; 32 minutes here next to a test run
    .venv/bin/python benchmarks/reading.py --share 0.5 --json runs/reading.json

The runs live in runs/reading (their own workdir; the demo's is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(recipe: Path, share: float) -> Path:
    """`slmforge run` of the recipe with pretrain.reading = share; the evaluate artifact's folder."""
    cmd = [sys.executable, "-m", "slmforge.cli", "run", str(recipe), "--until", "evaluate",
           "--set", f"pretrain.reading={share}"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    from slmforge.artifacts import ArtifactStore
    from slmforge.config import load_recipe

    store = ArtifactStore(load_recipe(recipe).workdir)
    return store.resolve("evaluate:latest").path


def main() -> int:
    import yaml

    from slmforge.evaluation.stats import compare
    from slmforge.records import set_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--share", type=float, default=0.3, help="pretrain.reading of the second run")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "reading.json")
    args = ap.parse_args()

    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    for stage in ("sft", "dpo", "report", "export", "serve"):
        recipe.pop(stage, None)
    recipe.update(name="reading", workdir="reading")  # beside the recipe, in runs/
    recipe["ingest"]["sources"] = [{**s, "paths": [str((ROOT / "recipes" / p).resolve()) for p in s["paths"]]}
                                   for s in recipe["ingest"]["sources"]]
    recipe["synth"] = {"kinds": ["reading"], "max_chunks": None}
    recipe["pretrain"]["baseline"] = False
    recipe["evaluate"]["models"] = ["pretrain"]
    path = ROOT / "runs" / "reading.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text("# written by benchmarks/reading.py\n" + yaml.safe_dump(recipe, sort_keys=False))
    results = {}
    for share in (0.0, args.share):
        results[share] = json.loads((run(path, share) / "results.json").read_text())
    base, mixed = results[0.0], results[args.share]
    rows = []
    for source, b in base["scores"]["specialist"].items():
        rows.append({"what": f"bits per byte · {source}", "raw text": b["bpb"],
                     f"reading {args.share}": mixed["scores"]["specialist"][source]["bpb"], "test": "-"})
    for task, metric in sorted({(t, m) for t in base["benchmarks"]["specialist"]
                                for m in (base["headline"].get(set_of(t)), "f1", "rougeL") if m}):
        a = base["benchmarks"]["specialist"].get(task, {}).get(metric)
        b = mixed["benchmarks"]["specialist"].get(task, {}).get(metric)
        if a is None or b is None:
            continue
        oa = base["outcomes"]["specialist"][task][metric]
        ob = mixed["outcomes"]["specialist"][task][metric]
        test = compare(ob, oa)
        rows.append({"what": f"{set_of(task)} · {metric}", "raw text": a, f"reading {args.share}": b,
                     "test": f"{test['verdict']} (p{'≤' if test.get('at_floor') else '='}{test['p_value']:.3g}, {len(oa)} items)"})
    tokens = {s: r["models"]["specialist"].get("tokens") for s, r in results.items()}
    out = {"share": args.share, "tokens": tokens, "rows": rows,
           "command": f".venv/bin/python benchmarks/reading.py --share {args.share}"}
    args.json.write_text(json.dumps(out, indent=2))
    width = max(len(r["what"]) for r in rows)
    print(f"{'':{width}}  raw text   reading {args.share}   reading better?")
    for r in rows:
        print(f"{r['what']:{width}}  {r['raw text']:8.4f}   {r[f'reading {args.share}']:8.4f}      {r['test']}")
    print(f"training tokens: {tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
