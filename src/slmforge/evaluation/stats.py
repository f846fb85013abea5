"""Significance of a difference between two models scored on the same items.

McNemar's exact test for paired right/wrong outcomes: only the items where the two models disagree
carry information; under "no difference" each of them is equally likely to favour either model, so the
count favouring one model is Binomial(discordant, 1/2). Two-sided p-value from scipy's binomtest. With
per-item scores that are not 0/1, a paired permutation test of the mean difference (scipy) is used instead.
"""

from __future__ import annotations

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


def paired_permutation(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Two-sided paired permutation test of mean(a - b) (scipy.stats.permutation_test, permutation_type
    "samples": under "no difference" each item's two scores are exchangeable, so the sign of each
    difference is flipped at random; exact when 2**items <= resamples). For graded per-item scores
    (F1, ROUGE-L, a judge's 0-1), where McNemar does not apply."""
    import numpy as np
    from scipy.stats import permutation_test

    if len(a) != len(b) or not a:
        raise ValueError(f"paired test needs the same, non-empty items: {len(a)} vs {len(b)}")
    n = len(a)
    if all(x == y for x, y in zip(a, b)):
        return {"test": "paired permutation", "p_value": 1.0, "items": n}
    r = permutation_test((np.asarray(a, float), np.asarray(b, float)), lambda x, y, axis: np.mean(x - y, axis=axis),
                         permutation_type="samples", vectorized=True, n_resamples=resamples,
                         alternative="two-sided", random_state=seed)
    exact = 2 ** n <= resamples
    # Monte Carlo: with no resample as extreme, scipy's p is its floor 1 / (resamples + 1), doubled for the
    # two sides: "p <= floor", not "p =". An exact test has no floor.
    at_floor = not exact and r.pvalue <= 2 / (resamples + 1) + 1e-12
    return {"test": "paired permutation", "p_value": float(f"{float(r.pvalue):.6g}"), "items": n,
            "at_floor": bool(at_floor)}


def compare(a: list[float], b: list[float]) -> dict:
    """The fitting paired test (McNemar for 0/1 outcomes, else the paired permutation test) and its verdict for "a beats
    b": passed (a higher, p < ALPHA), failed (b higher, p < ALPHA) or "not shown" (inside the noise)."""
    binary = all(x in (0, 1) for x in (*a, *b))
    r = mcnemar(a, b) if binary else paired_permutation(a, b)
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


def widest_interval(items: int, confidence: float = 0.95) -> float:
    """Half-width of the widest confidence interval an accuracy on `items` 0/1 items can have (at 50%):
    the Wilson score interval of scipy's binomtest, which keeps its coverage on small sets where the
    normal approximation does not."""
    from scipy.stats import binomtest

    ci = binomtest(items // 2, items).proportion_ci(confidence, method="wilson")
    return float(ci.high - ci.low) / 2
