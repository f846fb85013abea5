"""report: one self-contained HTML page (pictures embedded as PNG) and a Markdown summary per run.

It gathers what the other stages measured: the data (documents and characters per split, what each
curation step dropped), the tokenizer (bytes per token and fertility against a general tokenizer of
the same size), every model (parameters, tokens, epochs over the domain data, FLOPs, wall time,
tokens/s, MFU), the scores side by side with chance and the trivial-rule baselines, the quality gate
with its margins, checkpoint selection, bar charts, loss curves, and sample answers next to the
references. Nothing is recomputed: a report is cheap to rebuild after a change of layout.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import StageConfig
from slmforge.console import info
from slmforge.evaluation.charts import loss_curves, score_charts
from slmforge.evaluation.results import bench_rows, gate_lines, reference, set_tasks
from slmforge.evaluation.stats import widest_interval
from slmforge.evaluation.verdict import bpb_line, num, verdict
from slmforge.records import Benchmarks, set_of

NAME = "report"
INPUTS = ("curate", "tokenizer", "bench", "evaluate")


class Config(StageConfig):
    """What the report shows."""

    title: str = Field("slmforge report", description="the page's title")
    samples: int = Field(3, ge=0, description="sample answers per generation task shown next to the references")
    # the recipe the config was read from (its name and path, for the page's header): not in the cache key
    _recipe: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _from_recipe(self, info: ValidationInfo):
        ctx = info.context or {}
        self._recipe = {"name": ctx.get("recipe_name"), "path": str(ctx["recipe_path"]) if ctx.get("recipe_path")
                        else None}
        return self


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in INPUTS}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out, store.workdir), force=force)


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path, workdir: Path) -> dict:
    ev = inputs["evaluate"]
    results = json.loads((ev.path / "results.json").read_text(encoding="utf-8"))
    bench = _bench_items(Benchmarks.of(inputs["bench"]))
    final = out.with_name(out.name.removesuffix(".partial"))
    said = verdict(results)
    doc = {"title": cfg.title, "curate": inputs["curate"].manifest["metrics"],
           "tokenizer": inputs["tokenizer"].manifest["metrics"], "results": results, "bench": bench,
           "samples": cfg.samples, "provenance": inputs["bench"].manifest["metrics"].get("independence", {}),
           "lineage": {s: f"{a.stage}/{a.key}" for s, a in inputs.items()}, "verdict": said,
           "run": {"key": final.name, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "evaluate": ev.key,
                   "evaluated": ev.manifest.get("started"), "recipe": cfg._recipe.get("name"),
                   "recipe_path": cfg._recipe.get("path"), "workdir": str(workdir)}}
    (out / "report.html").write_text(render_html(doc), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    info(f"  report · {final / 'report.html'}")
    return {"html": "report.html", "markdown": "report.md", "gate_passed": (results.get("gate") or {}).get("passed"),
            "verdict": {k: said[k] for k in ("outcome", "best", "rival", "diff", "p") if k in said}}


def run_lines(doc: dict) -> list[tuple[str, str]]:
    """(label, text) of the page's header: run id, date, recipe, and where the exports will be."""
    r = doc.get("run") or {}
    if not r:
        return []
    recipe = r.get("recipe_path")
    ev = f"; scores from evaluate {r['evaluate']}" + (f" (run {r['evaluated']})" if r.get("evaluated") else "")
    export = Path(r["workdir"]) / "export" / "latest"
    return [("Run", f"report {r['key']}, built {r['date']}{ev}"),
            ("Recipe", f"{r['recipe']} ({recipe})" if recipe else "none recorded (built without a recipe file)"),
            ("Workdir", r["workdir"]),
            ("Exports", (f"{export} once the export stage has run (it runs after the report); "
                         f"`slmforge path export --recipe {recipe or 'RECIPE'}` prints the folder"))]


ZERO_MEANS = {"exact_match": "never produced an answer matching the reference",
              "f1": "never produced an answer sharing a word with the reference",
              "rouge": "never produced an answer sharing a word with the reference",
              "judge": "never had an answer accepted by the judge", "acc": "never picked the right option"}


def _meaning(metric: str) -> str | None:
    return next((v for k, v in ZERO_MEANS.items() if metric.startswith(k)), None)


class Zero(str):
    """A table cell holding a score of exactly zero: drawn flagged."""


def score_cell(v, metric: str) -> str:
    """A score for a table: '-' when not scored, '0.000 ⚠' (flagged) when exactly zero."""
    if v is None:
        return "-"
    return Zero("0.000 ⚠") if v == 0 and _meaning(metric) else f"{v:.3f}"


def zero_scores(m: dict) -> list[str]:
    """One line per (task, metric) on which some model scored exactly zero, naming the models and what
    the zero means."""
    lines = []
    for t, k in bench_rows(m):
        zero = [n for n, r in m["benchmarks"].items() if r.get(t, {}).get(k) == 0] if _meaning(k) else []
        if not zero:
            continue
        items = m.get("bench_sizes", {}).get(set_of(t))
        on = f" on any of the {items} items" if items else ""
        if len(zero) > 1 and len(zero) == len(m["benchmarks"]):
            said = f"every model: none of them ever {_meaning(k).removeprefix('never ')}{on}"
        else:
            said = f"{', '.join(zero)}: {'each' if len(zero) > 1 else 'the'} model {_meaning(k)}{on}"
        lines.append(f"{set_of(t)} {k} = 0.000 — for {said} (a measured zero, not a missing score)")
    return lines


def _bench_items(bench: Benchmarks) -> dict[str, dict]:
    """{task: {item id: item}} of the generation tasks, to show references next to answers."""
    return {t: {r["id"]: r for r in bench.items(s)} for s, t in bench.tasks.items()
            if s in ("qa", "summarization") and (bench.task_dir / f"{s}.jsonl").is_file()}


# ---- HTML --------------------------------------------------------------------------------------------
def _table(head: list[str], rows: list[list]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>" +
            "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows) + "</table>")


def _td(c) -> str:
    if isinstance(c, Zero):
        return "<td class='zero' title='a measured zero: see Flags'>" + html.escape(str(c)) + "</td>"
    return f"<td>{html.escape(str(c))}</td>"


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
        rows.append([n] + [_with_change(v, prev[i] if prev else None, k) for i, (v, (_, k)) in enumerate(zip(vals, cols))])
        prev = vals
    rows.append(["chance / best trivial rule"] + [reference(m, tasks[s], k) if s in m["headline"] else ""
                                                  for s, k in cols])
    return [f"{s} {k}" for s, k in cols], rows


def _with_change(v, before, metric: str) -> str:
    cell = score_cell(v, metric)
    if v is None or before is None:
        return cell
    return (Zero if isinstance(cell, Zero) else str)(f"{cell} ({v - before:+.3f})")


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


EMPTY = {"models": {}, "scores": {}, "margins": {}, "benchmarks": {}, "headline": {}, "bench_sizes": {},
         "baselines": {}}


def _code(text: str) -> str:
    """Escaped text with `quoted` spans as <code>."""
    return "".join(f"<code>{html.escape(x)}</code>" if i % 2 else html.escape(x) for i, x in enumerate(text.split("`")))


def render_html(doc: dict) -> str:
    e = html.escape
    m = EMPTY | doc["results"]
    said = doc["verdict"]
    lead = said.get("lead") or said["sentence"]  # the sentence's main clause in bold, the rest after it
    parts = [f"<h1>{e(doc['title'])}</h1>",
             f"<p class='verdict'><b>{e(lead)}</b>{e(said['sentence'].removeprefix(lead))}</p>"]
    if bpb := bpb_line(m):
        parts.append(f"<p>{e(bpb)}</p>")
    if head := run_lines(doc):
        parts.append("<table class='run'>" + "".join(f"<tr><th>{e(k)}</th><td>{_code(v)}</td></tr>" for k, v in head)
                     + "</table>")
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
    flags += zero_scores(m)
    if flags:
        parts.append("<h2>Flags</h2><ul>" + "".join(f"<li>{e(f)}</li>" for f in flags) + "</ul>")
    charts = score_charts(m)
    if charts:
        parts.append("<h2>Charts</h2>" + "".join(f"<h3>{e(t)}</h3><img alt='{e(t)}' src='{u}'>" for t, u in charts))
    if m.get("scores"):
        sources = list(next(iter(m["scores"].values())))
        parts.append("<h2>Bits per byte on the test splits (lower is better)</h2>" + _table(
            ["model", *(f"{s} bpb / ppl" for s in sources)],
            [[n, *(f"{per[s]['bpb']:.3f} / {per[s]['ppl']:.1f}" for s in sources)] for n, per in m["scores"].items()]))
        parts.append("<ul>" + "".join(
            f"<li><b>{e(s)}</b>: specialist {g['specialist_bpb']:.3f} vs generalist {g['generalist_bpb']:.3f} bits/byte: "
            f"{abs(g['relative']):.1%} {'better' if g['relative'] > 0 else 'worse'}</li>" for s, g in m["margins"].items())
            + "</ul>")
    if m.get("benchmarks"):
        names = list(m["benchmarks"])
        parts.append("<h2>Domain benchmarks (lm-evaluation-harness)</h2>" + _table(
            ["task · metric", *names, "chance / best trivial rule"],
            [[f"{t} · {k}", *(score_cell(m["benchmarks"][n].get(t, {}).get(k), k) for n in names), reference(m, t, k)]
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
                     f"brackets the change against the row above. With {n} items a choice score's 95% interval "
                     f"(Wilson) is at most ±{widest_interval(n):.3f}; seed-to-seed noise: benchmarks/posttrain_seeds.py.</p>" +
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
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
.verdict{{font-size:1.1em;border-left:5px solid #2a7;background:#f3faf6;padding:10px 14px}}
table.run th{{text-align:left;background:#f6f6f6}}table.run td{{text-align:left}}
td.zero{{background:#fde2df;color:#a01;font-weight:bold}}code{{background:#f2f2f2;padding:0 3px}}table{{border-collapse:collapse;margin:6px 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}.s{{border-left:3px solid #69c;padding-left:8px;margin:8px 0}}.p{{color:#555}}</style></head>
<body>{''.join(parts)}</body></html>"""


def render_markdown(doc: dict) -> str:
    m = EMPTY | doc["results"]
    lines = [f"# {doc['title']}", "", f"**{doc['verdict']['sentence']}**", ""]
    if bpb := bpb_line(m):
        lines += [bpb, ""]
    if head := run_lines(doc):
        lines += [f"- {k}: {v}" for k, v in head] + [""]
    if m.get("gate"):
        lines += ["## Quality gate", "", *gate_lines(m["gate"]), ""]
    flags = [f"- {n}: {f}" for n, mm in m.get("models", {}).items() for f in mm.get("flags", [])]
    flags += [f"- {x}" for x in zero_scores(m)]
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
        lines += [f"| {t} · {k} | " + " | ".join(score_cell(m["benchmarks"][n].get(t, {}).get(k), k) for n in names) +
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
