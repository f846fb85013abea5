"""Evaluate's results as the readers show them (evaluate's console table, the report, the model
cards): the (task, metric) rows, the chance / trivial-rule reference of a row, the quality gate's lines."""

from __future__ import annotations

from slmforge.records import set_of


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
    a, b = gate["compare"]
    lines = [f"quality gate ({a} beats {b}, both beat chance): {'PASSED' if gate['passed'] else 'NOT MET'}"]
    for c in gate["checks"]:
        lines.append(f"  {c['set']} {c['metric']}: {a} {c[a]:.3f} ±{c['ci95'][a]:.3f}, {b} {c[b]:.3f} "
                     f"±{c['ci95'][b]:.3f}, chance {c['chance']:.2f}, margin {c['margin']:+.3f} "
                     f"({c['items']} items) {'ok' if c['passed'] else 'NOT MET'}")
    return lines
