"""Evaluate's results as tables (a header and rows of text cells), each defined once and drawn three
ways: by evaluate's console (rich), on the report's HTML page and in its Markdown summary (Jinja
templates). A table's options pick the detail a reader shows (perplexity next to bits per byte on the
page, zero scores flagged in the report, short set names on the console); the figures are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmforge.evaluation.results import bench_rows, num, reference, set_tasks
from slmforge.records import set_of


@dataclass
class Table:
    """A header and rows of cells: text, or a Zero (a score of exactly zero, drawn flagged)."""

    head: list[str]
    rows: list[list]
    short_head: list[str] | None = None  # the Markdown summary's header, where it is shorter than the page's


# ---- scores ------------------------------------------------------------------------------------------
ZERO_MEANS = {"exact_match": "never produced an answer matching the reference",
              "f1": "never produced an answer sharing a word with the reference",
              "rouge": "never produced an answer sharing a word with the reference",
              "judge": "never had an answer accepted by the judge", "acc": "never picked the right option"}


def meaning(metric: str) -> str | None:
    """What a score of zero on `metric` says about the model (None: the metric has no such reading)."""
    return next((v for k, v in ZERO_MEANS.items() if metric.startswith(k)), None)


class Zero(str):
    """A table cell holding a score of exactly zero: drawn flagged."""


def score_cell(v, metric: str, flag: bool = True) -> str:
    """A score for a table: '-' when not scored; with `flag`, '0.000 ⚠' (a Zero) when exactly zero."""
    if v is None:
        return "-"
    return Zero("0.000 ⚠") if flag and v == 0 and meaning(metric) else f"{v:.3f}"


def zero_scores(m: dict) -> list[str]:
    """One line per (task, metric) on which some model scored exactly zero, naming the models and what
    the zero means."""
    lines = []
    for t, k in bench_rows(m):
        zero = [n for n, r in m["benchmarks"].items() if r.get(t, {}).get(k) == 0] if meaning(k) else []
        if not zero:
            continue
        items = m.get("bench_sizes", {}).get(set_of(t))
        on = f" on any of the {items} items" if items else ""
        if len(zero) > 1 and len(zero) == len(m["benchmarks"]):
            said = f"every model: none of them ever {meaning(k).removeprefix('never ')}{on}"
        else:
            said = f"{', '.join(zero)}: {'each' if len(zero) > 1 else 'the'} model {meaning(k)}{on}"
        lines.append(f"{set_of(t)} {k} = 0.000 — for {said} (a measured zero, not a missing score)")
    return lines


def bpb_table(m: dict, ppl: bool = False, roles: bool = False) -> Table:
    """Bits per byte of every model on each source's test split; with `ppl` the perplexity beside it,
    with `roles` each source's role (domain, general) in the header."""
    sources = list(next(iter(m["scores"].values())))
    dom = m.get("domain_sources") or []
    head = [f"{s} bpb / ppl" if ppl else f"{s} ({'domain' if s in dom else 'general'})" if roles else s
            for s in sources]
    rows = [[n, *(f"{per[s]['bpb']:.3f} / {per[s]['ppl']:.1f}" if ppl else f"{per[s]['bpb']:.3f}" for s in sources)]
            for n, per in m["scores"].items()]
    return Table(["model", *head], rows)


def bench_table(m: dict, flag: bool = True, sets: bool = False, reference_head: str = "chance / best trivial rule"
                ) -> Table:
    """Every (task, metric) of the domain benchmarks, one column per model, then chance and the best
    trivial rule (headed `reference_head`); `flag` marks zero scores, `sets` labels the rows by set name
    instead of task name."""
    names = list(m["benchmarks"])
    rows = [[f"{set_of(t) if sets else t} · {k}", *(score_cell(m["benchmarks"][n].get(t, {}).get(k), k, flag)
                                                   for n in names), reference(m, t, k)] for t, k in bench_rows(m)]
    return Table(["task · metric", *names, reference_head], rows,
                 ["task · metric", *names, "chance / trivial"])


def gate_table(gate: dict) -> Table:
    """The quality gate's checks: each choice set's specialist and strongest rival with their 95% intervals."""
    rows = [[c["set"], c["metric"], f"{c['a_score']:.3f} ± {c['ci95'][c['a']]:.3f}",
             f"{c['b']} {c['b_score']:.3f} ± {c['ci95'][c['b']]:.3f}", f"{c['chance']:.2f}", f"{c['margin']:+.3f}",
             f"{c['p_value']:.3g}", c["items"], c["verdict"]] for c in gate["checks"]]
    return Table(["set", "metric", gate["specialist"], "strongest rival", "chance", "margin", "p", "items",
                  "verdict"], rows)


CHAIN = ("specialist", "sft", "sft-rationale", "dpo")


def gain_table(m: dict) -> Table | None:
    """Each post-training step's scores and change against the step before: pretrain -> sft ->
    sft-rationale -> dpo, on the headline metrics and the generation tasks, with the trivial baseline
    (None with fewer than two of those models)."""
    names = [n for n in CHAIN if n in m["benchmarks"]]
    if len(names) < 2:
        return None
    tasks = set_tasks(m)
    cols = [(s, metric) for s, metric in m["headline"].items()] + \
           [(s, k) for s, k in (("qa", "exact_match"), ("qa", "f1"), ("summarization", "rougeL")) if s in tasks]
    rows, prev = [], None
    for n in names:
        vals = [m["benchmarks"][n].get(tasks.get(s, ""), {}).get(k) for s, k in cols]
        rows.append([n] + [_with_change(v, prev[i] if prev else None, k) for i, (v, (_, k)) in enumerate(zip(vals, cols))])
        prev = vals
    rows.append(["chance / best trivial rule"] + [reference(m, tasks[s], k) if s in m["headline"] else ""
                                                  for s, k in cols])
    return Table(["model", *(f"{s} {k}" for s, k in cols)], rows)


def _with_change(v, before, metric: str) -> str:
    cell = score_cell(v, metric)
    if v is None or before is None:
        return cell
    return (Zero if isinstance(cell, Zero) else str)(f"{cell} ({v - before:+.3f})")


def selection_table(m: dict) -> Table:
    """Checkpoint selection: each stage model's snapshot scores on the dev sets and the one chosen."""
    return Table(["model", "metric", "dev items", "scores by snapshot", "chosen"],
                 [[n, s["metric"], s["dev_items"], ", ".join(f"{k} {v:.3f}" for k, v in s["scores"].items()),
                   s["chosen"]] for n, s in m["selection"].items()])


def model_table(models: dict) -> Table:
    """What each model is and cost: where it came from, parameters, tokens, epochs over the domain data,
    FLOPs, wall time, tokens/s and MFU (a pretrained base's tokens and FLOPs are its pretraining's)."""
    rows = []
    for n, mm in models.items():
        shape = mm.get("shape", {})
        base = mm.get("stage") is None and isinstance(mm.get("base"), str)  # a pretrained base, as it is
        tokens = f"{mm['tokens'] / 1e6:.2f}M" if mm.get("tokens") else \
            f"{num(mm['pretrain_tokens'])} (its pretraining)" if mm.get("pretrain_tokens") else ""
        flops = f"{mm['flops']:.2e}" if "flops" in mm else \
            f"{mm['pretrain_flops']:.2e} (its pretraining)" if mm.get("pretrain_flops") else ""
        rows.append([n, mm.get("stage") or ("endpoint" if mm.get("endpoint") else f"base {mm['base']}" if base
                                            else "folder"),
                     f"{shape['params'] / 1e6:.2f}M" if shape else "", tokens,
                     f"{mm['domain_epochs']:.2f}" if "domain_epochs" in mm else "", flops,
                     f"{mm['train_time_s']:.0f}s" if mm.get("train_time_s") is not None else "",
                     f"{mm['tokens_per_s']:,.0f}" if mm.get("tokens_per_s") is not None else "",
                     f"{mm['mfu']:.1%}" if mm.get("mfu") else ""])
    return Table(["model", "from", "params", "tokens", "domain epochs", "FLOPs", "time", "tokens/s", "MFU"], rows)


def compression(models: dict) -> tuple[list[str], list[list], list[str]]:
    """(head, rows, notes) for the compress stage's variants: how each was made, its size against the
    teacher's, and what pruning kept (the share of the teacher's importance per kind)."""
    made = {n: mm for n, mm in models.items() if mm.get("pruning")}
    rows, notes = [], []
    for n, mm in made.items():
        t = mm.get("teacher", {}).get("params") or 0
        p = mm["shape"]["params"]
        s = mm["pruning"]["shape"]
        rows.append([n, "pruned teacher" if mm.get("init") == "pruned" else "random",
                     {"kd": f"distillation (alpha {mm.get('alpha')}, T {mm.get('temperature')})", "lm": "LM loss"}.get(
                         mm.get("loss"), "none"), f"{p / 1e6:.2f}M ({p / t:.0%})" if t else f"{p / 1e6:.2f}M",
                     f"{s['layers']} layers, hidden {s['hidden']}, heads {s['heads']}/{s['kv_heads']} kv, ffn {s['ffn']}",
                     f"{mm.get('tokens', 0) / 1e6:.3f}M", f"{mm.get('flops_with_pruning', 0):.2e}"])
    if made:
        mm = next(iter(made.values()))
        pr, kept = mm["pruning"], mm["pruning"]["importance_kept"]
        notes.append(f"Importance measured on {pr['calibration_tokens']:,} domain tokens; removed layers "
                     f"{pr['removed_layers']} of {pr['teacher_shape']['layers']}; the kept structures hold "
                     f"{kept['hidden']:.0%} of the hidden channels' importance, {kept['heads']:.0%} of the heads' "
                     f"and {kept['ffn']:.0%} of the FFN channels' (per layer, mean). Training loss of a distilled "
                     "variant is its distillation objective; compare validation losses and the scores above.")
    return ["variant", "start", "trained with", "params (of teacher)", "shape", "tokens", "FLOPs (with pruning)"], \
        rows, notes


def data_tables(c: dict) -> tuple[Table, Table]:
    """(documents and characters per source and split, what each curation step dropped) from curate's
    `splits`, `roles` and `filters`."""
    splits = [[s, *(f"{per[k]['docs']:,} / {per[k]['chars'] / 1e6:.2f}M" for k in ("train", "val", "test")),
               c["roles"].get(s, "")] for s, per in c["splits"].items()]
    drops = [[step, f"{f['seen']:,}", f"{f['dropped']:,}", f"{f['dropped'] / max(f['seen'], 1):.1%}",
              ", ".join(f"{k} {v}" for k, v in sorted(f["by_reason"].items(), key=lambda kv: -kv[1])[:4])]
             for step, f in c["filters"].items()]
    return (Table(["source", "train", "val", "test", "role"], splits),
            Table(["step", "seen", "dropped", "share", "main reasons"], drops))


def tokenizer_table(t: dict) -> Table:
    """Bytes per token and fertility of each tokenizer on each kind of text (the tokenizer stage's `eval`)."""
    return Table(["tokenizer", "text", "bytes/token", "fertility"],
                 [[tok, text, f"{v['bytes_per_token']:.2f}", f"{v['fertility']:.2f}"]
                  for tok, per in t["eval"].items() for text, v in per.items()])
