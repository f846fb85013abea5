"""report: one self-contained HTML page (pictures embedded as PNG) and a Markdown summary per run.

It gathers what the other stages measured: the data (documents and characters per split, what each
curation step dropped), the tokenizer (bytes per token and fertility against a general tokenizer of
the same size), every model (parameters, tokens, epochs over the domain data, FLOPs, wall time,
tokens/s, MFU), the scores side by side with chance and the trivial-rule baselines, the quality gate
with its margins, checkpoint selection, bar charts, loss curves, and sample answers next to the
references. Nothing is recomputed: a report is cheap to rebuild after a change of layout.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from pydantic import Field

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import StageConfig
from slmforge.console import info
from slmforge.records import Benchmarks, set_of
from slmforge.results import bench_rows, best_line, gate_lines, reference, set_tasks

NAME = "report"
INPUTS = ("curate", "tokenizer", "bench", "evaluate")


class Config(StageConfig):
    """What the report shows."""

    title: str = Field("slmforge report", description="the page's title")
    samples: int = Field(3, ge=0, description="sample answers per generation task shown next to the references")


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in INPUTS}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out), force=force)


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    ev = inputs["evaluate"]
    results = json.loads((ev.path / "results.json").read_text(encoding="utf-8"))
    bench = _bench_items(Benchmarks.of(inputs["bench"]))
    doc = {"title": cfg.title, "curate": inputs["curate"].manifest["metrics"],
           "tokenizer": inputs["tokenizer"].manifest["metrics"], "results": results, "bench": bench,
           "samples": cfg.samples, "provenance": inputs["bench"].manifest["metrics"].get("independence", {}),
           "lineage": {s: f"{a.stage}/{a.key}" for s, a in inputs.items()}}
    (out / "report.html").write_text(render_html(doc), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    final = out.with_name(out.name.removesuffix(".partial"))
    info(f"  report · {final / 'report.html'}")
    return {"html": "report.html", "markdown": "report.md",
            "gate_passed": (results.get("gate") or {}).get("passed")}


def _bench_items(bench: Benchmarks) -> dict[str, dict]:
    """{task: {item id: item}} of the generation tasks, to show references next to answers."""
    return {t: {r["id"]: r for r in bench.items(s)} for s, t in bench.tasks.items()
            if s in ("qa", "summarization") and (bench.task_dir / f"{s}.jsonl").is_file()}


# ---- pictures ----------------------------------------------------------------------------------------
def _png(fig) -> str:
    """The figure as an embeddable PNG data URL; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(models: dict) -> list[tuple[str, str]]:
    """(title, PNG data URI) for the training loss and the per-source validation losses of every
    pretrained model (its folder holds train_log.jsonl and val_log.jsonl)."""
    plt = _plt()
    # pretraining runs only (they keep val_log.jsonl): SFT and DPO losses are on other scales
    logs = {n: Path(m["path"]) for n, m in models.items() if m.get("path") and (Path(m["path"]) / "val_log.jsonl").is_file()}
    if not logs:
        return []
    pictures = []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, p in logs.items():
        rows = [json.loads(x) for x in (p / "train_log.jsonl").read_text().splitlines()]
        kd = models[name].get("loss") == "kd"  # compress's distilled variants: their objective, not the LM loss
        ax.plot([r["tokens"] / 1e6 for r in rows], [r["loss"] for r in rows], label=name + (" (KD objective)" if kd
                                                                                          else ""), lw=1)
    ax.set(xlabel="training tokens (M)", ylabel="train loss (nats/token)", title="Training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    pictures.append(("Training loss", _png(fig)))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, p in logs.items():
        rows = [json.loads(x) for x in (p / "val_log.jsonl").read_text().splitlines()]
        for source in [k for k in (rows[0] if rows else {}) if k not in ("step", "tokens")]:
            ax.plot([r["tokens"] / 1e6 for r in rows], [r[source] for r in rows], marker=".", label=f"{name} · {source}")
    ax.set(xlabel="training tokens (M)", ylabel="val loss (nats/token)", title="Validation loss per source")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    pictures.append(("Validation loss per source", _png(fig)))
    return pictures


def score_charts(m: dict) -> list[tuple[str, str]]:
    """Bar charts: bits per byte per source, and the benchmark scores per task with chance marked."""
    plt = _plt()
    pictures = []
    if m["scores"]:
        names = list(m["scores"])
        sources = list(next(iter(m["scores"].values())))
        fig, ax = plt.subplots(figsize=(7, 3.2))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([j + i * width for j in range(len(sources))], [m["scores"][n][s]["bpb"] for s in sources], width,
                   label=n)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(sources))], sources)
        ax.set(ylabel="bits per byte (lower is better)", title="Test-split bits per byte")
        ax.legend(fontsize=8)
        pictures.append(("Bits per byte", _png(fig)))
    if m["benchmarks"]:
        names = list(m["benchmarks"])
        rows = [(t, k) for t, k in bench_rows(m) if k in ("acc", "acc_norm", "acc_mutual_info", "exact_match", "f1",
                                                            "rougeL")]
        width = 0.8 / len(names)
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows)), 3.4))
        for i, n in enumerate(names):
            ax.bar([j + i * width for j in range(len(rows))],
                   [m["benchmarks"][n].get(t, {}).get(k) or 0 for t, k in rows], width, label=n)
        ax.axhline(0.25, color="grey", ls="--", lw=1, label="chance (choice tasks)")
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))],
                      [f"{set_of(t)}\n{k}" for t, k in rows], fontsize=7)
        ax.set(ylabel="score (higher is better)", title="Domain benchmarks", ylim=(0, 1))
        ax.legend(fontsize=7)
        pictures.append(("Domain benchmarks", _png(fig)))
    return pictures


# ---- HTML --------------------------------------------------------------------------------------------
def _table(head: list[str], rows: list[list]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def data_rows(c: dict) -> tuple[list[list], list[list]]:
    splits = [[s, *(f"{per[k]['docs']:,} / {per[k]['chars'] / 1e6:.2f}M" for k in ("train", "val", "test")),
               c["roles"].get(s, "")] for s, per in c["splits"].items()]
    drops = [[step, f"{f['seen']:,}", f"{f['dropped']:,}", f"{f['dropped'] / max(f['seen'], 1):.1%}",
              ", ".join(f"{k} {v}" for k, v in sorted(f["by_reason"].items(), key=lambda kv: -kv[1])[:4])]
             for step, f in c["filters"].items()]
    return splits, drops


def tokenizer_rows(t: dict) -> list[list]:
    return [[tok, text, f"{v['bytes_per_token']:.2f}", f"{v['fertility']:.2f}"]
            for tok, per in t["eval"].items() for text, v in per.items()]


def model_rows(models: dict) -> list[list]:
    rows = []
    for n, mm in models.items():
        shape = mm.get("shape", {})
        rows.append([n, mm.get("stage") or ("endpoint" if mm.get("endpoint") else "folder"),
                     f"{shape['params'] / 1e6:.2f}M" if shape else "", f"{mm['tokens'] / 1e6:.2f}M" if mm.get("tokens") else "",
                     f"{mm['domain_epochs']:.2f}" if "domain_epochs" in mm else "",
                     f"{mm['flops']:.2e}" if "flops" in mm else "",
                     f"{mm['train_time_s']:.0f}s" if mm.get("train_time_s") is not None else "",
                     f"{mm['tokens_per_s']:,.0f}" if mm.get("tokens_per_s") is not None else "",
                     f"{mm['mfu']:.1%}" if mm.get("mfu") else ""])
    return rows


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


CHAIN = ("specialist", "sft", "sft-rationale", "dpo")


def gain_rows(m: dict) -> tuple[list[str], list[list]]:
    """Each post-training step's scores and change against the step before: pretrain -> sft ->
    sft-rationale -> dpo, on the headline metrics and the generation tasks, with the trivial baseline."""
    names = [n for n in CHAIN if n in m["benchmarks"]]
    if len(names) < 2:
        return [], []
    tasks = set_tasks(m)
    cols = [(s, metric) for s, metric in m["headline"].items()] + \
           [(s, k) for s, k in (("qa", "exact_match"), ("qa", "f1"), ("summarization", "rougeL")) if s in tasks]
    rows, prev = [], None
    for n in names:
        vals = [m["benchmarks"][n].get(tasks.get(s, ""), {}).get(k) for s, k in cols]
        rows.append([n] + [("-" if v is None else f"{v:.3f}" + ("" if prev is None or prev[i] is None
                                                                 else f" ({v - prev[i]:+.3f})"))
                           for i, v in enumerate(vals)])
        prev = vals
    rows.append(["chance / best trivial rule"] + [reference(m, tasks[s], k) if s in m["headline"] else ""
                                                  for s, k in cols])
    return [f"{s} {k}" for s, k in cols], rows


def answer_blocks(doc: dict) -> list[tuple[str, str, dict]]:
    """(task, prompt excerpt, reference, {model: answer}) for the first sample items of each generation task."""
    answers = doc["results"].get("answers", {})
    out = []
    for task, items in doc["bench"].items():
        ids = []
        for per in answers.values():
            ids += [a["id"] for a in per.get(task, []) if a["id"] not in ids]
        for i in ids[: doc["samples"]]:
            item = items.get(i)
            if not item:
                continue
            prompt = " ".join(x for x in (item.get("passage"), item.get("question")) if x) or item.get("document", "")[:400]
            ref = item.get("answer") or item.get("summary", "")
            got = {m: next((a["response"] for a in per.get(task, []) if a["id"] == i), None) for m, per in answers.items()}
            out.append((task, prompt, ref, {m: a for m, a in got.items() if a is not None}))
    return out


def provenance(doc: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """(head, rows, notes): per benchmark set, who wrote it and whether the training data came from the
    same generator; and the judge's verdict prompt and agreement with F1, when a judge graded qa."""
    rows = [[k, v["generator"], v["training_data"], "yes: a gain may be the generator's style" if v["same_generator"]
             else "no", "no" if not v["same_prompt_shape"] else "yes"] for k, v in doc.get("provenance", {}).items()]
    notes = []
    for k, v in doc.get("provenance", {}).items():
        writer = v["generator"].partition(":")[2]
        for name, meta in doc["results"].get("models", {}).items():
            if writer and meta.get("base") == writer:
                notes.append(f"{name} is scored on the {k} set, which the same model wrote: it may find its own "
                             "questions easier than other models do.")
    j = doc["results"].get("judge")
    if j:
        notes.append(f"qa is also graded by a judge ({j['model']} at {j['base_url']}), on each model's first "
                     f"{max((a.get('items', 0) + a.get('unparsed', 0) for a in j['per_model'].values()), default=0)} "
                     f"answers; its score is the `judge` row. Agreement with F1 >= {j['f1_correct_at']}: " +
                     "; ".join(f"{n} {a['agreement']:.0%} (kappa {a['kappa']:.2f}, {a['items']} items)"
                               for n, a in j["per_model"].items() if a.get("items")) +
                     (f"; pooled {j['pooled']['agreement']:.0%} (kappa {j['pooled']['kappa']:.2f})"
                      if j["pooled"].get("items") else ""))
        notes.append("The judge's prompt: " + j["prompt"].replace("\n", " "))
    return ["set", "written by", "training data by", "same generator", "training prompts in its shape"], rows, notes


def render_html(doc: dict) -> str:
    e = html.escape
    m = doc["results"]
    parts = [f"<h1>{e(doc['title'])}</h1>"]
    if best := best_line(m):
        parts.append(f"<p><b>{e(best[0].upper() + best[1:])}</b></p>")
    gate = m.get("gate")
    if gate:
        rows = [[c["set"], c["metric"], f"{c['a_score']:.3f} ± {c['ci95'][c['a']]:.3f}",
                 f"{c['b']} {c['b_score']:.3f} ± {c['ci95'][c['b']]:.3f}", f"{c['chance']:.2f}", f"{c['margin']:+.3f}",
                 f"{c['p_value']:.3g}", c["items"], c["verdict"]] for c in gate["checks"]]
        parts.append(f"<h2>Quality gate: {e(gate['verdict'])}</h2>"
                     f"<p>{e(gate['specialist'])} must beat the strongest of {e(', '.join(gate['rivals']))} on each "
                     f"choice set's headline accuracy, significantly (paired test on the same items, p &lt; "
                     f"{gate['alpha']}), and beat chance; a margin inside the noise is \"not shown\". ± is a 95% "
                     "interval.</p>" +
                     _table(["set", "metric", gate["specialist"], "strongest rival", "chance", "margin", "p",
                             "items", "verdict"], rows))
    flags = [f"{n}: {f}" for n, mm in m.get("models", {}).items() for f in mm.get("flags", [])]
    if flags:
        parts.append("<h2>Flags</h2><ul>" + "".join(f"<li>{e(f)}</li>" for f in flags) + "</ul>")
    for title, uri in score_charts(m):
        parts.append(f"<img alt='{e(title)}' src='{uri}'>")
    if m["scores"]:
        sources = list(next(iter(m["scores"].values())))
        parts.append("<h2>Bits per byte on the test splits (lower is better)</h2>" + _table(
            ["model", *(f"{s} bpb / ppl" for s in sources)],
            [[n, *(f"{per[s]['bpb']:.3f} / {per[s]['ppl']:.1f}" for s in sources)] for n, per in m["scores"].items()]))
        parts.append("<ul>" + "".join(
            f"<li><b>{e(s)}</b>: specialist {g['specialist_bpb']:.3f} vs generalist {g['generalist_bpb']:.3f} bits/byte: "
            f"{abs(g['relative']):.1%} {'better' if g['relative'] > 0 else 'worse'}</li>" for s, g in m["margins"].items())
            + "</ul>")
    if m["benchmarks"]:
        names = list(m["benchmarks"])
        parts.append("<h2>Domain benchmarks (lm-evaluation-harness)</h2>" + _table(
            ["task · metric", *names, "chance / best trivial rule"],
            [[f"{t} · {k}", *(_fmt(m["benchmarks"][n].get(t, {}).get(k)) for n in names), reference(m, t, k)]
             for t, k in bench_rows(m)]))
        parts.append("<p>Items per set: " + ", ".join(f"{k} {v}" for k, v in m["bench_sizes"].items()) +
                     ". Headline metric per choice set: " + ", ".join(f"{k} {v}" for k, v in m["headline"].items()) +
                     ".</p>")
        head, rows, notes = provenance(doc)
        if rows:
            parts.append("<h3>Where the benchmarks come from</h3>" + _table(head, rows) +
                         "".join(f"<p>{e(x)}</p>" for x in notes))
    head, rows = gain_rows(m)
    if rows:
        n = min(m["bench_sizes"].get(s, 0) for s in m["headline"]) or 1
        parts.append("<h2>Post-training: each stage's gain</h2><p>The same harness and items for every model; in "
                     f"brackets the change against the row above. With {n} items a choice score's 95% interval is "
                     f"about ±{1.96 * (0.25 / n) ** 0.5:.3f}; seed-to-seed noise is in the README.</p>" +
                     _table(["model", *head], rows))
    if m.get("selection"):
        parts.append("<h2>Checkpoint selection (dev sets from the val split)</h2>" + _table(
            ["model", "metric", "dev items", "scores by snapshot", "chosen"],
            [[n, s["metric"], s["dev_items"], ", ".join(f"{k} {v:.3f}" for k, v in s["scores"].items()), s["chosen"]]
             for n, s in m["selection"].items()]))
    parts.append("<h2>Models</h2>" + _table(
        ["model", "from", "params", "tokens", "domain epochs", "FLOPs", "time", "tokens/s", "MFU"], model_rows(m["models"])))
    notes = [f"{n}: {mm['note']}" for n, mm in m["models"].items() if mm.get("note")]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in notes) + "</ul>")
    head, rows, notes = compression(m["models"])
    if rows:
        parts.append("<h2>Compression: a smaller student of the teacher</h2>" + _table(head, rows) +
                     "".join(f"<p>{e(x)}</p>" for x in notes))
    splits, drops = data_rows(doc["curate"])
    parts.append("<h2>Data</h2><p>Documents / characters per split.</p>" +
                 _table(["source", "train", "val", "test", "role"], splits) +
                 f"<p>Curation: {doc['curate']['docs_in']:,} documents in; what each step dropped:</p>" +
                 _table(["step", "seen", "dropped", "share", "main reasons"], drops))
    parts.append("<h2>Tokenizer</h2><p>Bytes per token (higher is better) and fertility (tokens per word, lower is "
                 f"better); the domain tokenizer saves {doc['tokenizer']['domain_token_saving']:.1%} of the tokens on "
                 "domain text.</p>" + _table(["tokenizer", "text", "bytes/token", "fertility"], tokenizer_rows(doc["tokenizer"])))
    curves = loss_curves(m["models"])
    if curves:
        parts.append("<h2>Loss curves</h2>" + "".join(f"<h3>{e(t)}</h3><img alt='{e(t)}' src='{u}'>" for t, u in curves))
    blocks = answer_blocks(doc)
    if blocks:
        parts.append("<h2>Sample answers next to the references</h2>" + "".join(
            f"<div class='s'><p class='p'>{e(t)}: {e(p)}</p><p><b>reference</b>: {e(r)}</p>" +
            "".join(f"<p><b>{e(n)}</b>: {e(a)}</p>" for n, a in got.items()) + "</div>" for t, p, r, got in blocks))
    samples = m.get("samples", {})
    if samples:
        parts.append("<h2>Greedy continuations of test documents</h2>" + "".join(
            f"<div class='s'><p class='p'>{e(p)}</p>" + "".join(f"<p><b>{e(o['model'])}</b>: {e(o['completion'])}</p>"
                                                              for o in outs) + "</div>" for p, outs in samples.items()))
    parts.append("<p class='p'>Built from " + ", ".join(f"{k} {v}" for k, v in doc["lineage"].items()) + ".</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(doc['title'])}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:6px 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}.s{{border-left:3px solid #69c;padding-left:8px;margin:8px 0}}.p{{color:#555}}</style></head>
<body>{''.join(parts)}</body></html>"""


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_markdown(doc: dict) -> str:
    m = doc["results"]
    lines = [f"# {doc['title']}", ""]
    if best := best_line(m):
        lines += [f"**{best[0].upper() + best[1:]}**", ""]
    if m.get("gate"):
        lines += ["## Quality gate", "", *gate_lines(m["gate"]), ""]
    flags = [f"- {n}: {f}" for n, mm in m.get("models", {}).items() for f in mm.get("flags", [])]
    if flags:
        lines += ["## Flags", "", *flags, ""]
    if m["scores"]:
        sources = list(next(iter(m["scores"].values())))
        lines += ["## Bits per byte (lower is better)", "", "| model | " + " | ".join(sources) + " |",
                  "|---|" + "---|" * len(sources)]
        lines += [f"| {n} | " + " | ".join(f"{per[s]['bpb']:.3f}" for s in sources) + " |" for n, per in m["scores"].items()]
        lines += [""] + [f"- {s}: specialist {g['specialist_bpb']:.3f} vs generalist {g['generalist_bpb']:.3f} "
                         f"({g['relative']:+.1%})" for s, g in m["margins"].items()] + [""]
    if m["benchmarks"]:
        names = list(m["benchmarks"])
        lines += ["## Domain benchmarks", "", "| task · metric | " + " | ".join(names) + " | chance / trivial |",
                  "|---|" + "---|" * (len(names) + 1)]
        lines += [f"| {t} · {k} | " + " | ".join(_fmt(m["benchmarks"][n].get(t, {}).get(k)) for n in names) +
                  f" | {reference(m, t, k)} |" for t, k in bench_rows(m)]
        lines.append("")
        head, rows, notes = provenance(doc)
        if rows:
            lines += ["### Where the benchmarks come from", "", "| " + " | ".join(head) + " |",
                      "|---|" + "---|" * (len(head) - 1)] + ["| " + " | ".join(r) + " |" for r in rows]
            lines += [""] + [f"- {x}" for x in notes] + [""]
    head, rows = gain_rows(m)
    if rows:
        lines += ["## Post-training gains", "", "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if m.get("selection"):
        lines += ["## Checkpoint selection", ""] + [
            f"- {n}: {s['metric']} on {s['dev_items']} dev items: " +
            ", ".join(f"{k} {v:.3f}" for k, v in s["scores"].items()) + f"; chosen: {s['chosen']}"
            for n, s in m["selection"].items()] + [""]
    lines += ["## Models", "", "| model | from | params | tokens | domain epochs | FLOPs | time | tokens/s | MFU |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in model_rows(m["models"])]
    head, rows, notes = compression(m["models"])
    if rows:
        lines += ["", "## Compression", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""] + notes
    return "\n".join(lines) + "\n"
