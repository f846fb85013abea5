"""The report's verdict: one sentence saying which model is best on the domain, by how much, whether that
is more than noise, against which generalists, and at what cost.

A model's domain score is its mean over the items of the choice sets' headline metrics (bench's
`headline`, e.g. mcq acc and completion acc_mutual_info), pooled so that every item counts once. The best
model this run trained (pretrain, sft, dpo, compress models) is compared with the strongest generalist
(the quality gate's rivals: the same-size generalist and every pretrained base evaluate scored) on the
same items with a paired test (stats.compare: McNemar's exact test on right/wrong outcomes). Picking the
best of k models on these very items favours luck, so its p-value is multiplied by k (Bonferroni). A
difference with p >= 0.05 is no gain, whatever its sign. The cost is the parameters, training tokens,
FLOPs and wall time along the model's lineage (dpo <- sft <- pretrain, as far as evaluate scored them),
next to the generalist's.
"""

from __future__ import annotations

from slmforge.evaluation.results import num, set_tasks
from slmforge.evaluation.stats import ALPHA, compare, paired_docs


def rivals(m: dict) -> list[str]:
    """The generalists: the gate's rivals, or (no gate) the generalist and every pretrained base."""
    models = m.get("models", {})
    if m.get("gate"):
        return [r for r in m["gate"]["rivals"] if r in models]
    return [n for n, mm in models.items()
            if n == "generalist" or mm.get("control") or (mm.get("stage") is None and isinstance(mm.get("base"), str))]


def domain_scores(m: dict) -> tuple[dict[str, tuple[str, str]], dict[str, dict]]:
    """({set: (task, headline metric)}, {model: {score, items, per_set, outcomes}}) for every model with a
    score on each choice set; the per-item outcomes are None where evaluate kept none."""
    tasks = set_tasks(m)
    sets = {s: (tasks[s], k) for s, k in (m.get("headline") or {}).items() if s in tasks}
    out = {}
    for n, r in m.get("benchmarks", {}).items():
        per = {s: r.get(t, {}).get(k) for s, (t, k) in sets.items()}
        if not sets or any(v is None for v in per.values()):
            continue
        outs = {s: ((m.get("outcomes") or {}).get(n, {}).get(t) or {}).get(k) for s, (t, k) in sets.items()}
        if all(outs.values()):
            items = sum(len(o) for o in outs.values())
            score = sum(sum(o) for o in outs.values()) / items
        else:
            sizes = {s: (m.get("bench_sizes") or {}).get(s, 0) for s in sets}
            items = sum(sizes.values())
            score = sum(per[s] * sizes[s] for s in sets) / items if items else sum(per.values()) / len(per)
        out[n] = {"score": score, "items": items, "per_set": per, "outcomes": outs}
    return sets, out


def paired(a: dict, b: dict, sets, factor: int = 1) -> dict | None:
    """a against b on the pooled items of `sets`: {diff, p (times `factor`), test, items, outcome:
    better | worse | tie}, or None without per-item outcomes for both."""
    xs, ys = [], []
    for s in sets:
        oa, ob = a["outcomes"].get(s), b["outcomes"].get(s)
        if not oa or not ob or len(oa) != len(ob):
            return None
        xs += oa
        ys += ob
    r = compare(xs, ys)
    p = min(1.0, r["p_value"] * factor)
    diff = (sum(xs) - sum(ys)) / len(xs)
    return {"diff": round(diff, 4), "p": float(f"{p:.4g}"), "test": r["test"], "items": len(xs),
            "outcome": "tie" if p >= ALPHA or diff == 0 else "better" if diff > 0 else "worse"}


# ---- words -------------------------------------------------------------------------------------------
def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _p(t: dict) -> str:
    return "p < 0.001" if t["p"] < 0.001 else f"p = {t['p']:.2g}"


def _params(m: dict, n: str) -> int | None:
    return (m["models"].get(n, {}).get("shape") or {}).get("params")


def describe(m: dict, n: str, best: str | None = None, score: float | None = None) -> str:
    """'smollm2 (0.633, the pretrained base smollm2-135m with 134.5M parameters)', 'the same-size generalist
    (0.396)', ...: the model, its domain score if given, and what it is."""
    mm, p = m["models"].get(n, {}), _params(m, n)
    size = f"{num(p)} parameters" if p else "size unknown"
    bits = [f"{score:.3f}"] if score is not None else []
    if mm.get("stage") is None and isinstance(mm.get("base"), str):
        bits.append(f"the pretrained base {mm['base']} with {size}" if mm["base"] != n else size)
        if mm.get("quantized"):
            bits.append(f"as a dequantized {mm['quantized']} copy")
    elif (mm.get("control") or {}).get("base"):
        c = mm["control"]
        bits.append(f"{c['base']} continued on general text only for the specialist's {num(c['tokens'])} tokens "
                    f"and schedule" + (f", from a dequantized {c['quantized']} copy" if c.get("quantized") else ""))
    elif best and p and p == _params(m, best):
        if n != "generalist":
            bits.append("the same size")
        n = "the same-size generalist" if n == "generalist" else n
    else:
        bits.append(size)
    return f"{n} ({', '.join(bits)})"


def sci(x: float) -> str:
    return f"{x:.1e}".replace("e+", "e")


def lineage(m: dict, n: str) -> tuple[list[str], bool]:
    """([n, the model it was trained from, ...] among the scored models, whether the chain is complete)."""
    models = m["models"]
    by_path = {mm.get("path"): k for k, mm in models.items() if mm.get("path")}
    chain, cur = [n], models[n]
    while True:
        base = cur.get("base")
        if isinstance(base, dict):  # compress: {stage, key, model}
            parent = next((k for k, mm in models.items() if mm.get("stage") == base.get("stage")
                           and mm.get("key") == base.get("key") and k == base.get("model")), None)
        elif isinstance(base, str) and cur.get("stage"):
            parent = by_path.get(base)
        else:
            return chain, True
        if parent is None or parent in chain:
            return chain, parent is not None
        chain.append(parent)
        cur = models[parent]


def cost(m: dict, n: str, rival: str | None) -> str:
    """'2.9M parameters (2.2% of smollm2's 134.5M), 2.6M training tokens (...), ... (smollm2: ...)'."""
    models = m["models"]
    p, pr = _params(m, n), _params(m, rival) if rival else None
    parts = [f"{num(p)} parameters" + (f" ({p / pr:.1%} of {rival}'s {num(pr)})" if pr and p != pr else
                                        f", the same size as {rival}" if pr else "") if p else "parameters unknown"]
    chain, complete = lineage(m, n)
    chain = chain[::-1]  # in training order
    tokens = [(k, models[k]["tokens"]) for k in chain if models[k].get("tokens")]
    at_least = "" if complete else "at least "
    if tokens:
        parts.append(f"{at_least}{num(sum(t for _, t in tokens))} training tokens" +
                     (f" ({' + '.join(f'{k} {num(t)}' for k, t in tokens)})" if len(tokens) > 1 else ""))
    flops = [(k, models[k]["flops"]) for k in chain if models[k].get("flops")]
    if flops:
        rest = [k for k in chain if not models[k].get("flops")]
        parts.append(f"{at_least}{sci(sum(f for _, f in flops))} FLOPs" +
                     (f" (in {', '.join(k for k, _ in flops)}; {', '.join(rest)} recorded none)" if rest else ""))
    wall = [models[k]["train_time_s"] for k in chain if models[k].get("train_time_s")]
    if wall:
        parts.append(f"{at_least}{duration(sum(wall))} of training")
    text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    r = models.get(rival, {}) if rival else {}
    if r.get("pretrain_tokens"):
        text += f" (against {rival}'s {num(r['pretrain_tokens'])} tokens" + (
            f" and {sci(r['pretrain_flops'])} FLOPs" if r.get("pretrain_flops") else "") + " of pretraining)"
    elif r.get("tokens"):
        text += f" (against {rival}'s {num(r['tokens'])} tokens" + (
            f" and {sci(r['flops'])} FLOPs" if r.get("flops") else "") + ")"
    return text


def verdict(m: dict) -> dict:
    """{outcome: win | tie | loss | untested | none, sentence, best, rival, ...} from evaluate's results."""
    models = m.get("models") or {}
    riv = rivals(m)
    own = [n for n, mm in models.items() if mm.get("stage") and n not in riv]
    sets, scores = domain_scores(m)
    if not sets or not scores:
        return {"outcome": "none", "sentence": "No verdict: evaluate recorded no score on the domain's choice sets "
                "(bench's mcq and completion), so no model can be called best on the domain."}
    what = f"the choice sets' headline metrics ({', '.join(f'{s} {k}' for s, (_, k) in sets.items())}"
    own_s = sorted((n for n in own if n in scores), key=lambda n: (-scores[n]["score"], n))
    riv_s = sorted((n for n in riv if n in scores), key=lambda n: (-scores[n]["score"], n))
    if not own_s:
        best_g = f"; the best generalist is {riv_s[0]}, {scores[riv_s[0]]['score']:.3f} on {what})" if riv_s else ""
        return {"outcome": "none", "sentence": "No verdict: no model trained in this run has a score on every "
                f"choice set{best_g}."}
    best = own_s[0]
    b = scores[best]
    on = f"{what} over {b['items']} items)"
    if not riv_s:
        return {"outcome": "none", "best": best, "score": round(b["score"], 4),
                "sentence": f"No verdict against a generalist, because evaluate scored none (add the generalist or a "
                            "base such as {name: smollm2, base: smollm2-135m} to evaluate.models): the best model "
                            f"of this run is {best}, {b['score']:.3f} on {on}, at {cost(m, best, None)}."}
    k = len(own_s)
    rival = riv_s[0]
    r = scores[rival]
    t = paired(b, r, sets, k)
    facts = {"best": best, "rival": rival, "score": round(b["score"], 4), "rival_score": round(r["score"], 4),
             "items": b["items"], "sets": {s: k_ for s, (_, k_) in sets.items()}, "compared": k}
    strongest = f"the strongest generalist, {describe(m, rival, best, r['score'])}"
    if t is None:
        return facts | {"outcome": "untested", "diff": round(b["score"] - r["score"], 4), "sentence": (
            f"{best}, the best model of this run, scores {b['score']:.3f} on {on}, {b['score'] - r['score']:+.3f} "
            f"against {strongest}, but evaluate kept no per-item outcomes, so whether that is more than noise is "
            f"unknown; {best} comes at {cost(m, best, rival)}.")}
    outcome = {"better": "win", "tie": "tie", "worse": "loss"}[t["outcome"]]
    head = _head(m, outcome, t, best, b["score"], rival, r["score"], on, k)
    clauses = [head, *_also(m, sets, scores, best, riv_s, t, k), f"{best} comes at {cost(m, best, rival)}"]
    return facts | {"outcome": outcome, "diff": t["diff"], "p": t["p"], "test": t["test"], "lead": head,
                    "sentence": "; ".join(clauses) + "."}


def _head(m: dict, outcome: str, t: dict, best: str, score: float, rival: str, rival_score: float, on: str,
          k: int) -> str:
    """The verdict's main clause: the best model of the run against the strongest generalist `rival`, paired
    test `t` (Bonferroni-corrected for picking the best of `k`)."""
    strongest = f"the strongest generalist, {describe(m, rival, best, rival_score)}"
    corr = f", Bonferroni-corrected for picking the best of {k} models" if k > 1 else ""
    stat = f"{t['test'].split(' (')[0]} test on the same items, {_p(t)}{corr}"
    if outcome == "win":
        return (f"The best model on the domain is {best}: {score:.3f} on {on}, {t['diff']:+.3f} over "
                f"{strongest}, a significant gain ({stat})")
    if outcome == "tie":
        return (f"No model of this run is significantly better on the domain than {strongest}: the best, {best}, "
                f"scores {score:.3f} on {on}, {t['diff']:+.3f}: inside the noise ({stat}), so "
                f"{'no gain' if t['diff'] >= 0 else 'no significant loss either'}")
    return (f"The best model on the domain is the generalist {describe(m, rival, best, rival_score)}, not a "
            f"model of this run: the best of them, {best}, scores {score:.3f} on {on}, {t['diff']:+.3f}: "
            f"significantly worse ({stat})")


def _also(m: dict, sets: dict, scores: dict, best: str, riv_s: list[str], t: dict, k: int) -> list[str]:
    """The verdict's further clauses: `best` against every other generalist, and per set against the
    strongest (`riv_s[0]`) where a set disagrees with the pooled outcome `t` (p-values times `k`)."""
    rival, b = riv_s[0], scores[best]
    clauses = []
    verbs = {"better": "beats", "tie": "is not significantly different from", "worse": "is also significantly worse than"}
    for x in riv_s[1:]:
        o = paired(b, scores[x], sets, k)
        clauses.append(f"{best} {verbs[o['outcome']]} {describe(m, x, best, scores[x]['score'])}: {o['diff']:+.3f}, "
                       f"{_p(o)}" if o else f"{describe(m, x, best, scores[x]['score'])} is untested")
    per_set = {s: paired(b, scores[rival], [s], k) for s in sets} if len(sets) > 1 else {}
    signs = {o["outcome"] for o in per_set.values() if o and o["outcome"] != "tie"}
    if signs and (signs != {t["outcome"]}):
        word = {"better": "better", "worse": "worse", "tie": "no significant difference"}
        clauses.append(f"per set against {rival}, {best} is " + ", ".join(
            f"{word[o['outcome']]} on {s} ({o['diff']:+.3f}, {_p(o)})" for s, o in per_set.items() if o))
    return clauses


def bpb_line(m: dict) -> str:
    """Every model's bits per byte on the domain's test text, best first, then the best model this run
    trained against the generalist lowest there, paired on the same documents (stats.paired_docs; its
    p-value times the number of trained models, as in the verdict) ('' without scores)."""
    dom = m.get("domain_sources") or []
    scores = m.get("scores") or {}
    bpb = {n: sum(per[s]["bpb"] for s in dom) / len(dom) for n, per in scores.items()
           if dom and all(s in per for s in dom)}
    if not bpb:
        return ""
    line = (f"Bits per byte on the domain's test text ({', '.join(dom)}; lower is better): "
            + ", ".join(f"{n} {bpb[n]:.3f}" for n in sorted(bpb, key=lambda n: (bpb[n], n))) + ".")
    riv = [n for n in rivals(m) if n in bpb]
    own = [n for n, mm in (m.get("models") or {}).items() if mm.get("stage") and n not in riv and n in bpb]
    docs = {n: [d for s in dom for d in scores[n][s].get("docs") or []] for n in bpb}
    if not riv or not own:
        return line
    best, rival = min(own, key=lambda n: (bpb[n], n)), min(riv, key=lambda n: (bpb[n], n))
    if not docs[best] or len(docs[best]) != len(docs[rival]):
        return line + f" No paired test of {best} against {rival}: evaluate kept no per-document scores."
    t = paired_docs(docs[best], docs[rival])
    p = min(1.0, t["p_value"] * len(own))
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
    word = {"passed": "a significant gain", "failed": "a significant loss"}.get(t["verdict"], "no significant difference")
    if t["verdict"] != "not shown" and p >= ALPHA:
        word = "no significant difference"
    return (line + f" {best} against the lowest generalist, {rival}: lower on {t['a_lower']} of {t['items']} "
            f"documents, {word} (Wilcoxon signed-rank test on the per-document bits per byte, {p_text}"
            + (f", Bonferroni-corrected for picking the best of {len(own)} models" if len(own) > 1 else "") + ").")
