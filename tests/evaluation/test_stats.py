import pytest

from slmforge.evaluation.stats import compare, mcnemar, paired_docs, paired_permutation, widest_interval


def test_mcnemar_counts_only_disagreements_and_matches_the_binomial():
    a = [1] * 30 + [0] * 10 + [1] * 10
    b = [1] * 30 + [1] * 2 + [0] * 8 + [0] * 10
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["items"]) == (10, 2, 50)  # the 38 agreements carry no information
    # two-sided exact binomial: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 2**12
    assert r["p_value"] == pytest.approx(2 * 79 / 2**12, rel=1e-4)
    assert compare(a, b)["verdict"] == "passed" and compare(b, a)["verdict"] == "failed"


def test_a_tie_or_a_small_margin_is_not_shown():
    same = [1, 0, 1, 1, 0] * 10
    assert compare(same, same) == {**compare(same, same), "verdict": "not shown", "p_value": 1.0}
    a = [1] * 26 + [0] * 24
    b = [1] * 24 + [0] * 26  # two more right answers out of 50: inside the noise
    assert compare(a, b)["verdict"] == "not shown"
    with pytest.raises(ValueError, match="same items"):
        mcnemar([1, 0], [1])


def test_the_permutation_test_takes_graded_scores():
    a = [0.9, 0.8, 0.7, 0.95, 0.85] * 8
    b = [0.2, 0.3, 0.1, 0.25, 0.15] * 8
    r = compare(a, b)
    # every resample's mean difference is smaller than the observed one: p sits at the Monte Carlo floor
    assert r["test"] == "paired permutation" and r["verdict"] == "passed" and r["at_floor"]
    assert r["p_value"] == pytest.approx(2 / 10_001, rel=1e-6)
    assert paired_permutation([0.5, 0.6], [0.5, 0.6])["p_value"] == 1.0


def test_the_permutation_test_is_exact_on_few_items():
    # 4 items: all 16 sign flips enumerated. Differences +0.1, +0.2, +0.3, -0.05 (mean 0.1375); flips whose
    # |mean| >= 0.1375: the observed one, all-positive (0.1625) and their mirror images -> 4 of 16
    a, b = [0.6, 0.7, 0.8, 0.45], [0.5, 0.5, 0.5, 0.5]
    r = paired_permutation(a, b)
    assert r["p_value"] == pytest.approx(4 / 16) and not r["at_floor"]
    assert compare(a, b)["verdict"] == "not shown"


def test_the_per_document_test_matches_scipy_and_says_which_model_is_lower():
    from scipy.stats import wilcoxon

    a = [0.90, 1.10, 0.80, 1.00, 0.95, 1.20, 0.85, 1.05, 0.70, 0.99]
    b = [x + d for x, d in zip(a, [0.05, 0.04, 0.06, 0.03, 0.05, 0.07, -0.01, 0.05, 0.04, 0.06])]
    r = paired_docs(a, b)
    assert (r["a_lower"], r["b_lower"], r["items"]) == (9, 1, 10)
    assert r["p_value"] == pytest.approx(wilcoxon(a, b).pvalue, rel=1e-5) and r["p_value"] < 0.05
    assert r["verdict"] == "passed" and paired_docs(b, a)["verdict"] == "failed"
    assert paired_docs(a, a)["verdict"] == "not shown" and paired_docs(a, a)["p_value"] == 1.0
    near = [x + d for x, d in zip(a, [0.01, -0.01, 0.02, -0.02, 0.01, -0.01, 0.0, 0.01, -0.01, 0.0])]
    assert paired_docs(a, near)["verdict"] == "not shown"
    with pytest.raises(ValueError, match="same, non-empty documents"):
        paired_docs([1.0], [1.0, 2.0])


def test_the_widest_interval_is_wilsons_at_one_half():
    # Wilson at p = 1/2: half-width z / (2 sqrt(n + z^2)) (z = 1.959964); on 340 items 0.0528
    z = 1.959964
    for n in (20, 340):
        assert widest_interval(n) == pytest.approx(z / (2 * (n + z * z) ** 0.5), rel=1e-5)
