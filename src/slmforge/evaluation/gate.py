"""The quality gate: does the specialist beat the strongest generalist on the domain's choice sets?

For each choice set's headline metric, the specialist is compared with the best-scoring of its rivals
(the scratch generalist and every pretrained base evaluate scored), on the same items, with a paired
test (stats.compare: McNemar's exact test on right/wrong outcomes). A win counts only when it is
significant (p < 0.05) and the specialist is above chance; a margin inside the noise reads "not shown",
never "passed". The gate passes when every set passes; it fails when the specialist is significantly
worse on any set.
"""

from __future__ import annotations

import math

from slmforge.evaluation.stats import ALPHA, compare
from slmforge.records import Benchmarks


def quality_gate(benchmarks: dict, outcomes: dict, bench: Benchmarks, specialist: str = "specialist",
                 rivals: list[str] | None = None) -> dict | None:
    """`benchmarks`: {model: {task: {metric: score}}}; `outcomes`: {model: {task: {metric: [per item]}}}."""
    rivals = [r for r in (rivals or []) if r in benchmarks and r != specialist]
    if specialist not in benchmarks or not rivals:
        return None
    checks = []
    for s, metric in bench.headline.items():
        task = bench.tasks.get(s)
        va = benchmarks[specialist].get(task, {}).get(metric)
        scored = {r: v for r in rivals if (v := benchmarks[r].get(task, {}).get(metric)) is not None}
        if va is None or not scored:
            continue
        b = max(sorted(scored), key=lambda r: scored[r])  # the strongest rival on this set
        vb, n, chance = scored[b], bench.sizes[s], bench.baselines[s]["chance"]
        test = compare(outcomes[specialist][task][metric], outcomes[b][task][metric])
        verdict = test["verdict"] if va > chance or test["verdict"] == "failed" else "not shown"
        ci = {m: round(1.96 * math.sqrt(max(v * (1 - v), 1e-9) / n), 4) for m, v in ((specialist, va), (b, vb))}
        checks.append({"set": s, "metric": metric, "items": n, "chance": chance, "a": specialist, "b": b,
                       "a_score": va, "b_score": vb, "scores": {specialist: va, **scored}, "ci95": ci,
                       "margin": round(va - vb, 4), **test, "verdict": verdict, "passed": verdict == "passed"})
    if not checks:
        return None
    verdicts = {c["verdict"] for c in checks}
    verdict = "passed" if verdicts == {"passed"} else "failed" if "failed" in verdicts else "not shown"
    return {"specialist": specialist, "rivals": rivals, "alpha": ALPHA, "checks": checks, "verdict": verdict,
            "passed": verdict == "passed"}
