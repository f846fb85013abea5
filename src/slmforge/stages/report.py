"""report: one self-contained HTML page (pictures embedded as PNG) and a Markdown summary per run.

It gathers what the other stages measured: the data (documents and characters per split, what each
curation step dropped), the tokenizer (bytes per token and fertility against a general tokenizer of
the same size), every model (parameters, tokens, epochs over the domain data, FLOPs, wall time,
tokens/s, MFU), the scores side by side with chance and the trivial-rule baselines, the quality gate
with its margins, checkpoint selection, bar charts, loss curves, and sample answers next to the
references. Nothing is recomputed: a report is cheap to rebuild after a change of layout.

The page and the summary are drawn from one list of sections (`sections`: headings, tables as header
and rows, paragraphs, figures) by the Jinja templates in templates/report/; the Markdown summary leaves
out what only the page shows (pictures, data, tokenizer, samples) and has shorter forms of a few parts.
"""

from __future__ import annotations

import functools
import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from markupsafe import Markup
from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import StageConfig
from slmforge.console import info
from slmforge.evaluation.charts import loss_curves, score_charts
from slmforge.evaluation.results import gate_lines
from slmforge.evaluation.stats import widest_interval
from slmforge.evaluation.tables import (
    Table,
    Zero,
    bench_table,
    bpb_table,
    compression,
    data_tables,
    gain_table,
    gate_table,
    model_table,
    selection_table,
    tokenizer_table,
    zero_scores,
)
from slmforge.evaluation.verdict import bpb_line, verdict
from slmforge.records import Benchmarks, Curated, Evaluation, Tokenized

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
    results = Evaluation.of(ev).results
    benchmarks = Benchmarks.of(inputs["bench"])
    bench = _bench_items(benchmarks)
    curated, tokenized = Curated.of(inputs["curate"]), Tokenized.of(inputs["tokenizer"])
    final = out.with_name(out.name.removesuffix(".partial"))
    said = verdict(results)
    doc = {"title": cfg.title, "curate": {"splits": curated.splits, "roles": curated.roles, "filters": curated.filters,
                                          "docs_in": curated.docs_in},
           "tokenizer": {"eval": tokenized.eval, "domain_token_saving": tokenized.domain_token_saving},
           "results": results, "bench": bench, "samples": cfg.samples,
           "provenance": benchmarks.independence,
           "lineage": {s: f"{a.stage}/{a.key}" for s, a in inputs.items()}, "verdict": said,
           "run": {"key": final.name, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "evaluate": ev.key,
                   "evaluated": ev.manifest.get("started"), "recipe": cfg._recipe.get("name"),
                   "recipe_path": cfg._recipe.get("path"), "workdir": str(workdir)}}
    parts = sections(doc)
    (out / "report.html").write_text(render_html(doc, parts), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(doc, parts), encoding="utf-8")
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


def _bench_items(bench: Benchmarks) -> dict[str, dict]:
    """{task: {item id: item}} of the generation tasks, to show references next to answers."""
    return {t: {r["id"]: r for r in bench.items(s)} for s, t in bench.tasks.items()
            if s in ("qa", "summarization") and (bench.task_dir / f"{s}.jsonl").is_file()}


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


# ---- the sections: what the page and the summary show ------------------------------------------------
@dataclass
class Block:
    """One part of a section, drawn by kind (templates/report/): `text` paragraphs (Markdown: lines as they
    are), `notes` paragraphs (Markdown: bullets), `bullets` (an item is a text or a (bold label, text)
    pair), `fields` (label, text) rows whose `quoted` spans are code, a `table`, `figures` ((title, PNG
    data URL) each) and `samples` ((prompt, [(label, text)]) each: a prompt and what each one wrote).
    Strings are escaped on the page, except Markup: the page's own prose, drawn as written."""

    kind: Literal["text", "notes", "bullets", "fields", "table", "figures", "samples"]
    content: Any
    only: Literal["page", "summary"] | None = None  # None: on the page and in the Markdown summary
    css: str | None = None  # the HTML class of `text` paragraphs


@dataclass
class Section:
    """A heading and its blocks; the header (the verdict's supporting lines) has no heading."""

    title: str | None
    blocks: list[Block]
    short: str | None = None  # the Markdown summary's heading, where it is shorter than the page's
    level: int = 2
    page_only: bool = False  # left out of the Markdown summary


def sections(doc: dict) -> list[Section]:
    """Every section of the report, in order; those with nothing to show are left out."""
    m = EMPTY | doc["results"]
    found = [_header(doc, m), _gate(m), _flags(m), _charts(m), _bits_per_byte(m), *_benchmarks(doc, m), _gains(m),
             _selection(m), _models(m), _compression(m), *_data(doc), _loss_curves(m), _answers(doc),
             _continuations(m), _footer(doc)]
    return [s for s in found if s is not None]


def _header(doc: dict, m: dict) -> Section:
    blocks = [Block("text", [bpb])] if (bpb := bpb_line(m)) else []
    if head := run_lines(doc):
        blocks.append(Block("fields", head))
    return Section(None, blocks)


def _gate(m: dict) -> Section | None:
    gate = m.get("gate")
    if not gate:
        return None
    e = html.escape
    said = Markup(f"{e(gate['specialist'])} must beat the strongest of {e(', '.join(gate['rivals']))} on each choice "
                  f"set's headline accuracy, significantly (paired test on the same items, p &lt; {gate['alpha']}), "
                  "and beat chance; a margin inside the noise is \"not shown\". ± is a 95% interval.")
    return Section(f"Quality gate: {gate['verdict']}", [
        Block("text", [said], "page"), Block("table", gate_table(gate), "page"),
        Block("text", gate_lines(gate), "summary")], short="Quality gate")


def _flags(m: dict) -> Section | None:
    flags = [f"{n}: {f}" for n, mm in m.get("models", {}).items() for f in mm.get("flags", [])] + zero_scores(m)
    return Section("Flags", [Block("bullets", flags)]) if flags else None


def _charts(m: dict) -> Section | None:
    charts = score_charts(m)
    return Section("Charts", [Block("figures", charts)], page_only=True) if charts else None


def _bits_per_byte(m: dict) -> Section | None:
    if not m.get("scores"):
        return None
    vs = {s: f"specialist {g['specialist_bpb']:.3f} vs generalist {g['generalist_bpb']:.3f}"
          for s, g in m["margins"].items()}
    page = [(s, f"{vs[s]} bits/byte: {abs(g['relative']):.1%} {'better' if g['relative'] > 0 else 'worse'}")
            for s, g in m["margins"].items()]
    summary = [(s, f"{vs[s]} ({g['relative']:+.1%})") for s, g in m["margins"].items()]
    return Section("Bits per byte on the test splits (lower is better)", [
        Block("table", bpb_table(m, ppl=True), "page"), Block("table", bpb_table(m), "summary"),
        Block("bullets", page, "page"), Block("bullets", summary, "summary")], short="Bits per byte (lower is better)")


def _benchmarks(doc: dict, m: dict) -> list[Section]:
    """The benchmark scores, then (a subsection) where the benchmarks come from."""
    if not m.get("benchmarks"):
        return []
    sizes = (f"Items per set: {', '.join(f'{k} {v}' for k, v in m['bench_sizes'].items())}. Headline metric per "
             f"choice set: {', '.join(f'{k} {v}' for k, v in m['headline'].items())}.")
    out = [Section("Domain benchmarks (lm-evaluation-harness)", [Block("table", bench_table(m)),
                                                                Block("text", [sizes], "page")],
                   short="Domain benchmarks")]
    head, rows, notes = provenance(doc)
    if rows:
        out.append(Section("Where the benchmarks come from", [Block("table", Table(head, rows)),
                                                              Block("notes", notes)], level=3))
    return out


def _gains(m: dict) -> Section | None:
    table = gain_table(m)
    if table is None:
        return None
    n = min(m["bench_sizes"].get(s, 0) for s in m["headline"]) or 1
    said = Markup("The same harness and items for every model; in brackets the change against the row above. With "
                  f"{n} items a choice score's 95% interval (Wilson) is at most ±{widest_interval(n):.3f}; "
                  "seed-to-seed noise: benchmarks/posttrain_seeds.py.")
    return Section(Markup("Post-training: each stage's gain"), [Block("text", [said], "page"), Block("table", table)],
                   short="Post-training gains")


def _selection(m: dict) -> Section | None:
    if not m.get("selection"):
        return None
    said = [f"{n}: {s['metric']} on {s['dev_items']} dev items: " +
            ", ".join(f"{k} {v:.3f}" for k, v in s["scores"].items()) + f"; chosen: {s['chosen']}"
            for n, s in m["selection"].items()]
    return Section("Checkpoint selection (dev sets from the val split)", [
        Block("table", selection_table(m), "page"), Block("bullets", said, "summary")], short="Checkpoint selection")


def _models(m: dict) -> Section:
    blocks = [Block("table", model_table(m["models"]))]
    if notes := [f"{n}: {mm['note']}" for n, mm in m["models"].items() if mm.get("note")]:
        blocks.append(Block("bullets", notes, "page"))
    return Section("Models", blocks)


def _compression(m: dict) -> Section | None:
    head, rows, notes = compression(m["models"])
    if not rows:
        return None
    return Section("Compression: a smaller student of the teacher", [Block("table", Table(head, rows)),
                                                                     Block("text", notes)], short="Compression")


def _data(doc: dict) -> list[Section]:
    """The data (documents and characters per split, what curation dropped) and the tokenizer."""
    splits, drops = data_tables(doc["curate"])
    curated = f"Curation: {doc['curate']['docs_in']:,} documents in; what each step dropped:"
    tokens = ("Bytes per token (higher is better) and fertility (tokens per word, lower is better); the domain "
              f"tokenizer saves {doc['tokenizer']['domain_token_saving']:.1%} of the tokens on domain text.")
    return [Section("Data", [Block("text", ["Documents / characters per split."]), Block("table", splits),
                             Block("text", [curated]), Block("table", drops)], page_only=True),
            Section("Tokenizer", [Block("text", [tokens]), Block("table", tokenizer_table(doc["tokenizer"]))],
                    page_only=True)]


def _loss_curves(m: dict) -> Section | None:
    curves = loss_curves(m["models"])
    return Section("Loss curves", [Block("figures", curves)], page_only=True) if curves else None


def _answers(doc: dict) -> Section | None:
    said = [(f"{t}: {p}", [("reference", r), *got.items()]) for t, p, r, got in answer_blocks(doc)]
    return Section("Sample answers next to the references", [Block("samples", said)], page_only=True) if said \
        else None


def _continuations(m: dict) -> Section | None:
    said = [(p, [(o["model"], o["completion"]) for o in outs]) for p, outs in m.get("samples", {}).items()]
    return Section("Greedy continuations of test documents", [Block("samples", said)], page_only=True) if said \
        else None


def _footer(doc: dict) -> Section:
    built = "Built from " + ", ".join(f"{k} {v}" for k, v in doc["lineage"].items()) + "."
    return Section(None, [Block("text", [built], css="p")], page_only=True)


# ---- drawing: the Jinja templates --------------------------------------------------------------------
@functools.cache
def _templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("slmforge", "templates/report"),
                             finalize=jinja2.pass_eval_context(_escape),
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["code"] = _code
    env.tests["zero"] = lambda c: isinstance(c, Zero)
    return env


def _escape(ctx, value):
    """On the page, every value escaped by html.escape (the entities the page has always had; Jinja's own
    escaping writes &#39; for '); Markup as it is. In the Markdown summary, values as they are."""
    if ctx.autoescape and not isinstance(value, Markup):
        return Markup(html.escape(str(value)))
    return value


def _code(text: str) -> Markup:
    """Escaped text with `quoted` spans as <code>."""
    return Markup("".join(f"<code>{html.escape(x)}</code>" if i % 2 else html.escape(x)
                          for i, x in enumerate(text.split("`"))))


def _render(template: str, doc: dict, parts: list[Section] | None) -> str:
    said = doc["verdict"]
    lead = said.get("lead") or said["sentence"]  # the sentence's main clause in bold, the rest after it
    return _templates().get_template(template).render(
        title=doc["title"], sentence=said["sentence"], lead=lead, rest=said["sentence"].removeprefix(lead),
        sections=sections(doc) if parts is None else parts)


def render_html(doc: dict, parts: list[Section] | None = None) -> str:
    """The page: `parts` (default: sections(doc)) through templates/report/report.html.j2."""
    return _render("report.html.j2", doc, parts)


def render_markdown(doc: dict, parts: list[Section] | None = None) -> str:
    """The Markdown summary: `parts` (default: sections(doc)) through templates/report/report.md.j2."""
    return _render("report.md.j2", doc, parts).rstrip("\n") + "\n"
