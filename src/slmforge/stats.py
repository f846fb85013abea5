"""Significance of a difference between two models scored on the same items.

McNemar's exact test for paired right/wrong outcomes: only the items where the two models disagree
carry information; under "no difference" each of them is equally likely to favour either model, so the
count favouring one model is Binomial(discordant, 1/2). Two-sided p-value from scipy's binomtest. With
per-item scores that are not 0/1, a paired bootstrap of the mean difference is used instead.
"""

from __future__ import annotations

import random

ALPHA = 0.05


def mcnemar(a: list[float], b: list[float]) -> dict:
    """Paired exact test on 0/1 outcomes of the same items: {test, p_value, a_only, b_only, items}."""
    from scipy.stats import binomtest

    if len(a) != len(b):
        raise ValueError(f"paired test needs the same items: {len(a)} vs {len(b)} outcomes")
    a_only = sum(1 for x, y in zip(a, b) if x > y)
    b_only = sum(1 for x, y in zip(a, b) if y > x)
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return {"test": "McNemar exact (two-sided)", "p_value": float(f"{p:.6g}"), "a_only": a_only, "b_only": b_only,
            "items": len(a)}


def paired_bootstrap(a: list[float], b: list[float], iters: int = 10_000, seed: int = 0) -> dict:
    """Two-sided paired bootstrap of mean(a - b): the share of resamples on the other side of zero, doubled."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired test needs the same, non-empty items: {len(a)} vs {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    n, mean = len(d), sum(d) / len(d)
    if all(x == 0 for x in d):
        return {"test": "paired bootstrap", "p_value": 1.0, "items": n}
    other = sum(1 for _ in range(iters) if (sum(d[rng.randrange(n)] for _ in range(n)) / n > 0) != (mean > 0))
    # with no resample on the other side the p-value is the floor 2 / (iters + 1): "p <= floor", not "p ="
    return {"test": "paired bootstrap", "p_value": round(min(1.0, 2 * (other + 1) / (iters + 1)), 6), "items": n,
            "at_floor": other == 0}


def compare(a: list[float], b: list[float]) -> dict:
    """The fitting paired test (McNemar for 0/1 outcomes, else the bootstrap) and its verdict for "a beats
    b": passed (a higher, p < ALPHA), failed (b higher, p < ALPHA) or "not shown" (inside the noise)."""
    binary = all(x in (0, 1) for x in (*a, *b))
    r = mcnemar(a, b) if binary else paired_bootstrap(a, b)
    diff = (sum(a) - sum(b)) / max(len(a), 1)
    r["verdict"] = "not shown" if r["p_value"] >= ALPHA or diff == 0 else ("passed" if diff > 0 else "failed")
    return r


def paired_docs(a: list[float], b: list[float]) -> dict:
    """Two models' bits per byte on the same documents (lower is better): Wilcoxon's signed-rank test on
    the per-document differences (scipy; two-sided), with how many documents each model was lower on and
    the verdict for "a is lower than b". Documents, not windows or tokens, are the unit: they are what was
    sampled, and two tokenizers cut the same text into different windows."""
    from scipy.stats import wilcoxon

    if len(a) != len(b) or not a:
        raise ValueError(f"paired test needs the same, non-empty documents: {len(a)} vs {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    a_lower, b_lower = sum(1 for x in d if x < 0), sum(1 for x in d if x > 0)
    p = 1.0 if a_lower + b_lower == 0 else float(wilcoxon(a, b, alternative="two-sided").pvalue)
    mean = sum(d) / len(d)
    verdict = "not shown" if p >= ALPHA or mean == 0 else ("passed" if mean < 0 else "failed")
    return {"test": "Wilcoxon signed-rank (two-sided), per document", "p_value": float(f"{p:.6g}"),
            "a_lower": a_lower, "b_lower": b_lower, "items": len(a), "verdict": verdict}
