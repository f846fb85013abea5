"""The quality gate (gate.py): the specialist against the strongest rival, paired, per choice set."""

from pathlib import Path

from slmforge.evaluation.gate import quality_gate
from slmforge.records import Benchmarks


def _bench(n):
    return Benchmarks(Path("."), {"mcq": "t_mcq", "completion": "t_completion"}, {}, {"mcq": n, "completion": n}, {},
                      {"mcq": "acc", "completion": "acc_mutual_info"},
                      {"mcq": {"chance": 0.25}, "completion": {"chance": 0.25}})


def _model(mcq, comp):
    return ({"t_mcq": {"acc": sum(mcq) / len(mcq)}, "t_completion": {"acc_mutual_info": sum(comp) / len(comp)}},
            {"t_mcq": {"acc": mcq}, "t_completion": {"acc_mutual_info": comp}})


def test_the_gate_takes_the_strongest_rival_and_needs_significance():
    n = 100
    spec = _model([1] * 80 + [0] * 20, [1] * 70 + [0] * 30)
    weak = _model([1] * 30 + [0] * 70, [1] * 30 + [0] * 70)
    base = _model([1] * 78 + [0] * 22, [1] * 20 + [0] * 80)  # as good on mcq, far worse on completion
    benchmarks = {"specialist": spec[0], "generalist": weak[0], "smollm2": base[0]}
    outcomes = {"specialist": spec[1], "generalist": weak[1], "smollm2": base[1]}
    g = quality_gate(benchmarks, outcomes, _bench(n), "specialist", ["generalist", "smollm2"])
    mcq, comp = g["checks"]
    assert mcq["b"] == "smollm2" and mcq["verdict"] == "not shown" and mcq["p_value"] > 0.05  # 0.80 vs 0.78
    assert comp["b"] == "generalist" and comp["verdict"] == "passed" and comp["p_value"] < 0.05
    assert g["verdict"] == "not shown" and not g["passed"]  # never "passed" with a margin inside the noise
    only_weak = quality_gate(benchmarks, outcomes, _bench(n), "specialist", ["generalist"])
    assert only_weak["verdict"] == "passed" and only_weak["passed"]


def test_a_significant_loss_fails_and_no_rival_means_no_gate():
    spec = _model([1] * 30 + [0] * 70, [1] * 30 + [0] * 70)
    strong = _model([1] * 90 + [0] * 10, [1] * 90 + [0] * 10)
    b, o = {"specialist": spec[0], "smollm2": strong[0]}, {"specialist": spec[1], "smollm2": strong[1]}
    g = quality_gate(b, o, _bench(100), "specialist", ["smollm2"])
    assert g["verdict"] == "failed" and all(c["verdict"] == "failed" for c in g["checks"])
    assert quality_gate(b, o, _bench(100), "specialist", ["generalist"]) is None
