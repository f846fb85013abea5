"""Evaluate's results as the readers show them (evaluate's console table, the report, the model
cards): the (task, metric) rows, the chance / trivial-rule reference of a row, the quality gate's lines,
and numbers in words."""

from __future__ import annotations

from slmforge.records import set_of


def num(x: float) -> str:
    """2901312 -> 2.9M, 2e12 -> 2.0T, 47104 -> 47.1k."""
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.1f}{unit}"
    return f"{x:.0f}"


def set_tasks(m: dict) -> dict[str, str]:
    """{set name: task name} of every task any model was scored on."""
    return {set_of(t): t for r in m.get("benchmarks", {}).values() for t in r}


def bench_rows(m: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs any model has, in a stable order."""
    pairs = {(t, k) for r in m["benchmarks"].values() for t, ms in r.items() for k in ms if k != "alias"}
    return sorted(pairs)


def reference(m: dict, task: str, metric: str) -> str:
    """'chance / best trivial rule' for an accuracy metric of a choice task, else ''."""
    base = m["baselines"].get(set_of(task), {})
    if not base or not metric.startswith("acc"):
        return ""
    return f"{base['chance']:.2f} / {max(v for k, v in base.items() if k not in ('items', 'chance')):.2f}"


def gate_lines(gate: dict | None) -> list[str]:
    if not gate:
        return []
    lines = [f"quality gate ({gate['specialist']} against the strongest of {', '.join(gate['rivals'])}, paired "
             f"test on the same items, p < {gate['alpha']}): {gate['verdict'].upper()}"]
    for c in gate["checks"]:
        lines.append(f"  {c['set']} {c['metric']}: {c['a']} {c['a_score']:.3f} ±{c['ci95'][c['a']]:.3f}, {c['b']} "
                     f"{c['b_score']:.3f} ±{c['ci95'][c['b']]:.3f}, margin {c['margin']:+.3f}, chance {c['chance']:.2f}, "
                     f"{c['test']} p {'≤' if c.get('at_floor') else '='} {c['p_value']:.3g}" + (f" ({c['a_only']} vs {c['b_only']} of {c['items']} "
                                                             "items right for one model only)" if "a_only" in c else "")
                     + f": {c['verdict']}")
    return lines


def best_line(m: dict) -> str:
    """One sentence: which model is best on the domain, by how much, and the gate's verdict."""
    parts = []
    dom = m.get("domain_sources") or []
    bpb = {n: sum(per[s]["bpb"] for s in dom) / len(dom) for n, per in m.get("scores", {}).items()
           if dom and all(s in per for s in dom)}
    if bpb:
        ranked = sorted(bpb, key=lambda n: (bpb[n], n))
        text = f"best on the domain by bits per byte: {ranked[0]} ({bpb[ranked[0]]:.3f})"
        if len(ranked) > 1:
            text += f", {1 - bpb[ranked[0]] / bpb[ranked[1]]:.1%} fewer than {ranked[1]} ({bpb[ranked[1]]:.3f})"
        parts.append(text)
    head = m.get("headline") or {}
    tasks = set_tasks(m)
    mean = {}
    for n, r in m.get("benchmarks", {}).items():
        vals = [r.get(tasks.get(s, ""), {}).get(k) for s, k in head.items()]
        if vals and all(v is not None for v in vals):
            mean[n] = sum(vals) / len(vals)
    if mean:
        ranked = sorted(mean, key=lambda n: (-mean[n], n))
        text = f"on the choice sets' headline metrics ({', '.join(f'{s} {k}' for s, k in head.items())}, mean): " \
               f"{ranked[0]} {mean[ranked[0]]:.3f}"
        if len(ranked) > 1:
            text += f" vs {ranked[1]} {mean[ranked[1]]:.3f}"
        parts.append(text)
    if m.get("gate"):
        parts.append(f"quality gate: {m['gate']['verdict']}")
    return ("; ".join(parts) + ".") if parts else ""


def flag_empty(benchmarks: dict, outcomes: dict, share: float) -> dict[str, list[str]]:
    """{model: [flag lines]} for generation tasks whose answers are mostly empty: their scores become None
    (not scored), because an empty answer says the prompt, stop sequences or template do not fit the
    model, not that it knows nothing."""
    flags: dict[str, list[str]] = {}
    for name, per in outcomes.items():
        for task, o in per.items():
            if o.get("empty", 0) >= share:
                benchmarks[name][task] = {k: None for k in benchmarks[name].get(task, {})} | {"empty": o["empty"]}
                flags.setdefault(name, []).append(f"{set_of(task)}: {o['empty']:.0%} of the answers are empty, so it "
                                                  "is not scored (check the prompt's length, stop sequences and "
                                                  "chat template for this model)")
    return flags
