import pytest

from slmforge.stats import compare, mcnemar, paired_bootstrap, paired_docs


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


def test_the_bootstrap_takes_graded_scores():
    a = [0.9, 0.8, 0.7, 0.95, 0.85] * 8
    b = [0.2, 0.3, 0.1, 0.25, 0.15] * 8
    r = compare(a, b)
    assert r["test"] == "paired bootstrap" and r["verdict"] == "passed" and r["p_value"] < 0.01
    assert paired_bootstrap([0.5, 0.6], [0.5, 0.6])["p_value"] == 1.0


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
