"""Scratch training against continued pretraining of a real base, in one table: the essay's open question
("it is possible to build on top of an existing generalist model after expanding its vocabulary, but it's
yet to be seen whether this is more or less effective than training from scratch").

Reads finished runs (default: the demo, which is the DAPT of SmolLM2 with its control `recovered`, then
recipes/scratch.yaml and recipes/dapt-expand.yaml, as `make compare` leaves them) and puts every model their evaluate stages scored in one table: bits per byte on each test
split, the benchmarks' headline metrics, and the FLOPs each model cost to train, 6·N·D (N parameters, D
training tokens) summed over its lineage (pretrain as its manifest records it, then SFT and DPO), with a
base's own pretraining (6·N·D) apart.
The runs must share their benchmark sets (the same bench key) so that every model answered the same
items; then each choice-set headline is tested pairwise (McNemar exact on the same items) against the
strongest other model, and a margin with p >= 0.05 reads "not shown".

    .venv/bin/python benchmarks/compare.py                          # runs/demo runs/scratch runs/dapt-expand
    .venv/bin/python benchmarks/compare.py runs/demo runs/scratch --json out.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def trained(store, meta: dict) -> dict:
    """A stage model's training, from its lineage's manifests: FLOPs (6·N·D per stage, pretrain's as its
    manifest records it), the route its pretraining took, and its parameter count."""
    from slmforge.records import model_lineage

    chain = model_lineage(store, meta["stage"], meta["key"], meta["name"])
    flops = sum(m.meta.get("flops") or 6 * (m.meta.get("shape") or {}).get("params", 0) * m.tokens for m in chain)
    # a stage that trained but recorded no tokens (sft with max_steps before the trainer counted them)
    unknown = [m.stage for m in chain if not m.tokens and (m.meta.get("steps") or 0) > 0]
    pre = store.load(chain[0].stage, chain[0].key).manifest["metrics"] if chain else {}
    route = "scratch"
    if pre.get("init_from"):
        route = f"DAPT of {pre['init_from']['base']}"
        if pre.get("expand_vocab"):
            route += f" + {pre['expand_vocab']['chosen']:,} domain tokens"
    return {"flops": flops, "unknown": unknown, "route": route, "params": (chain[-1].meta.get("shape") or {}).get("params") if chain
            else None, "tokens": {m.stage: m.tokens for m in chain},
            "base_flops": (pre.get("init_from") or {}).get("pretrain_flops")}


def load_run(workdir: Path) -> dict:
    from slmforge.artifacts import ArtifactStore

    store = ArtifactStore(workdir)
    art = store.resolve("evaluate:latest")
    return {"workdir": str(workdir), "store": store, "results": json.loads((art.path / "results.json").read_text()),
            "bench": art.manifest["inputs"]["bench"]}


def is_base(meta: dict) -> bool:
    """A pretrained base scored as it is (a stage's model records the folder it started from as `base`)."""
    return not meta.get("stage") and bool(meta.get("base"))


def describe(name: str, meta: dict, t: dict) -> str:
    if is_base(meta):
        return f"{meta['base']} as it is"
    if not meta.get("stage"):
        return f"the folder {meta.get('path')}"
    if (meta.get("control") or {}).get("base"):
        return f"{meta['control']['base']} continued on general text only (the control, the same tokens)"
    post = {"sft": " → SFT", "sft-rationale": " → SFT (rationales)", "dpo": " → SFT → DPO"}.get(name, "")
    return t["route"] + (" generalist" if name == "generalist" else "") + post


def gather(runs: list[dict]) -> dict:
    from slmforge.evaluation.results import set_tasks

    keys = {r["bench"] for r in runs}
    if len(keys) > 1:
        raise SystemExit("compare: the runs' benchmark sets differ (bench keys " + ", ".join(
            f"{r['workdir']}: {r['bench']}" for r in runs) + "); give them the same ingest, curate, synth and "
            "bench sections so that every model answers the same items")
    rows, seen_bases = [], set()
    head = runs[0]["results"]["headline"]
    for run in runs:
        res = run["results"]
        tasks = set_tasks(res)
        for name, meta in res["models"].items():
            if is_base(meta):
                if meta["base"] in seen_bases:
                    continue  # a rival every run scores: once is enough (same items, same weights)
                seen_bases.add(meta["base"])
            meta = {**meta, "name": name}  # a stage's model is scored under its own name
            tr = trained(run["store"], meta) if meta.get("stage") else {"flops": 0.0, "unknown": [], "params": None,
                                                                           "tokens": {}}
            bench = res["benchmarks"].get(name, {})
            outcomes = res["outcomes"].get(name, {})
            rows.append({
                "run": Path(run["workdir"]).name, "model": name, "what": describe(name, meta, tr),
                "params": (meta.get("shape") or {}).get("params") or tr["params"],
                "bpb": {s: v["bpb"] for s, v in res["scores"].get(name, {}).items()},
                "scores": {s: bench.get(t, {}).get(k) for s, k in head.items() if (t := tasks.get(s))}
                | {"qa f1": bench.get(tasks.get("qa", ""), {}).get("f1"),
                   "summarization rougeL": bench.get(tasks.get("summarization", ""), {}).get("rougeL")},
                "outcomes": {s: outcomes.get(tasks[s], {}).get(k) for s, k in head.items() if s in tasks},
                "train_flops": tr["flops"], "train_tokens": tr["tokens"], "flops_unknown_for": tr["unknown"],
                "base_pretrain_flops": meta.get("pretrain_flops") or tr.get("base_flops")})
    return {"rows": rows, "headline": head, "domain": runs[0]["results"]["domain_sources"],
            "general": runs[0]["results"]["general_sources"]}


def significance(rows: list[dict], head: dict) -> list[dict]:
    """For each choice set: the best model by its headline, then McNemar against every other model."""
    from slmforge.evaluation.stats import compare

    out = []
    for s, metric in head.items():
        have = [r for r in rows if r["outcomes"].get(s) is not None]
        if len(have) < 2:
            continue
        best = max(have, key=lambda r: r["scores"][s])
        for r in have:
            if r is best:
                continue
            a, b = best["outcomes"][s], r["outcomes"][s]
            if len(a) != len(b):
                raise SystemExit(f"compare: {s}: {best['run']}/{best['model']} has {len(a)} items, "
                                 f"{r['run']}/{r['model']} {len(b)}")
            t = compare(a, b)
            out.append({"set": s, "metric": metric, "best": f"{best['run']}/{best['model']}",
                        "other": f"{r['run']}/{r['model']}", "best_score": best["scores"][s],
                        "other_score": r["scores"][s], "p_value": t["p_value"], "test": t["test"],
                        "verdict": "better" if t["verdict"] == "passed" else t["verdict"]})
    return out


def fmt_flops(x: float | None) -> str:
    return f"{x:.1e}" if x else "0"


def table(g: dict, tests: list[dict]) -> str:
    sources = [*g["domain"], *g["general"]]
    score_cols = list(g["rows"][0]["scores"])
    lines = ["| model | route | " + " | ".join(f"{s} bpb" for s in sources) + " | "
             + " | ".join(f"{c} {g['headline'].get(c, '')}".strip() for c in score_cols)
             + " | training FLOPs | base's pretraining FLOPs |",
             "|" + "---|" * (4 + len(sources) + len(score_cols))]
    best = {c: max((r["scores"][c] for r in g["rows"] if r["scores"].get(c) is not None), default=None)
            for c in score_cols}
    low = {s: min((r["bpb"][s] for r in g["rows"] if s in r["bpb"]), default=None) for s in sources}
    for r in g["rows"]:
        def cell(v, top):
            return "-" if v is None else (f"**{v:.3f}**" if v == top else f"{v:.3f}")
        lines.append(f"| {r['run']}/{r['model']} | {r['what']} | "
                     + " | ".join(cell(r["bpb"].get(s), low[s]) for s in sources) + " | "
                     + " | ".join(cell(r["scores"].get(c), best[c]) for c in score_cols)
                     + f" | {'≥ ' if r['flops_unknown_for'] else ''}{fmt_flops(r['train_flops'])}"
                     + (f" (+ {', '.join(r['flops_unknown_for'])}: tokens not recorded)" if r["flops_unknown_for"] else "")
                     + f" | {fmt_flops(r['base_pretrain_flops'])} |")
    lines.append("")
    for t in tests:
        lines.append(f"- {t['set']} {t['metric']}: {t['best']} {t['best_score']:.3f} vs {t['other']} "
                     f"{t['other_score']:.3f}, {t['test']} p = {t['p_value']:.3g}: {t['verdict']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="*", default=["runs/demo", "runs/scratch", "runs/dapt-expand"])
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args()
    runs = [load_run(Path(w)) for w in args.workdirs]
    g = gather(runs)
    tests = significance(g["rows"], g["headline"])
    print(table(g, tests))
    out = {"rows": [{k: v for k, v in r.items() if k != "outcomes"} for r in g["rows"]], "tests": tests,
           "command": shlex.join([sys.executable, *sys.argv])}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
