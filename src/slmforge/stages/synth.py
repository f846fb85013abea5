"""synth: guided synthetic data from the curated train split, grounded in its text and filtered.

Chunks: the domain sources' train documents (never val/test), split at blank lines into chunks of
about `chunk_chars`, each with its section title; chunks are chosen to cover the topics (or, without
topics, the documents) evenly. Per chunk the teacher makes the `kinds` asked for. The extractive
teacher (default) needs no model; `openai` and `hf` teachers get a Jinja prompt per kind (override
with `templates: {kind: path}`) with the seed examples as few-shot examples, and must answer JSON.
Filters (`synthesis.py`), each recorded on every item: schema, length, exact and near duplicates
(MinHash over word 3-grams), groundedness (share of the answer's content words found in the chunk),
and decontamination (any shared 13-gram with the val/test splits). Output, in TRL's formats:
`sft.jsonl` (`messages`), `rationale.jsonl`, `dpo.jsonl` (`prompt`/`chosen`/`rejected`), `reading.jsonl`
(`text`: reading-comprehension documents, which pretrain can mix in with `pretrain.reading`), `items.jsonl`
(every kept item with its fields and verdicts), `rejected.jsonl` (with the failing verdict) and a
`report.md`. Work goes in shards with completion markers, and model teachers' replies are cached in
`<workdir>/teacher-cache/`, so a killed run resumes and asks nothing twice.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.common import read_jsonl, write_jsonl
from slmforge.config import RecipePath, resolve_path
from slmforge.console import console, info, progress
from slmforge.errors import UserError
from slmforge.records import Curated
from slmforge.synthetic.extractive import ExtractiveTeacher, Pool, trivial_baselines
from slmforge.synthetic.synthesis import (
    KINDS,
    REASONS,
    Filters,
    FilterState,
    Kind,
    TeacherConfig,
    answer_text,
    apply_filters,
    generate_items,
    load_seeds,
    ngrams,
    prompt_text,
    select_chunks,
    split_chunks,
)

NAME = "synth"
INPUTS = ("curate",)


def default_kinds(teacher: str) -> list[str]:
    """Every kind of training item a teacher can write: `rationale` (reasoning) needs a model, `evidence`
    is the extractive teacher's quoted sentences; `reading` (pretraining text) only when asked for."""
    return [k for k in KINDS if k not in ("reading", "rationale" if teacher == "extractive" else "evidence")]


class Config(TeacherConfig):
    """Which teacher, which kinds, how much, and how strict the filters are."""

    kinds: list[Kind] = Field(default_factory=list, description="task kinds to generate (default: every kind the "
                                                                "teacher can write; rationale needs a model teacher)")
    per_chunk: int = Field(1, ge=1, description="items of each kind per chunk")
    max_chunks: int | None = Field(400, ge=1, description="chunks to use at most (None: all)")
    chunk_chars: int = Field(1500, ge=200, description="target characters per chunk")
    seeds: RecipePath | None = Field(None, description="JSONL or YAML of seed examples (question/answer or "
                                                "instruction/response), used as few-shot examples")
    topics: list[str] | None = Field(None, description="topics to cover evenly (chunks are matched by words)")
    templates: dict[str, str] = Field(default_factory=dict, description="kind -> a Jinja template file")
    min_answer_chars: int = Field(Filters.min_answer_chars, ge=1)
    max_answer_chars: int = Field(Filters.max_answer_chars, ge=10)
    min_grounded: float = Field(Filters.min_grounded, ge=0, le=1,
                                description="share of the answer's content words in the chunk")
    near_dup_jaccard: float = Field(Filters.near_dup_jaccard, gt=0, le=1,
                                    description="word 3-gram Jaccard above which a prompt is a near-duplicate")
    decontam_ngram: int = Field(Filters.decontam_ngram, ge=5, description="n-gram size for decontamination "
                                                                          "against val/test")
    shard_chunks: int = Field(50, ge=1, description="chunks per shard (the unit of resume)")
    fitness_requests: int = Field(8, ge=1, description="model teachers: requests of the fitness check")
    fitness_min_pass: float = Field(0.5, ge=0, le=1, description="share that must pass the filters")

    @field_validator("templates")
    @classmethod
    def _abs_templates(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        bad = [k for k in v if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kind(s) {', '.join(bad)}; kinds are {', '.join(KINDS)}")
        return {k: str(resolve_path(p, info)) for k, p in v.items()}

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data):
        if isinstance(data, dict) and not data.get("kinds"):
            data = {**data, "kinds": default_kinds(data.get("teacher", "extractive"))}
        return data

    @model_validator(mode="after")
    def _kinds_fit_teacher(self):
        if self.teacher == "extractive" and "rationale" in self.kinds:
            raise ValueError("kinds: rationale is the teacher's own reasoning, and the extractive teacher has no "
                             "model to reason with; ask for `evidence` (the supporting sentences, quoted) or set "
                             "a model teacher (teacher: hf or openai)")
        return self


def external(cfg: Config) -> dict:
    """The teacher's identity (hf_model: a base or a folder), and the contents of the seeds and template
    files, so that replacing or editing any of them re-runs this stage."""
    from slmforge.artifacts import fingerprint

    return cfg.external() | ({"seeds": fingerprint(cfg.seeds)} if cfg.seeds else {}) \
        | ({"templates": {k: fingerprint(p) for k, p in cfg.templates.items()}} if cfg.templates else {})


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {"curate": store.resolve("curate:latest")}
    # the teacher's reply cache lives beside the run directories, so a re-run with other settings or
    # --force pays for no request twice
    cache = store.workdir / "teacher-cache"
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, Curated.of(inputs["curate"]), out, cache),
                       resumable=True, force=force, external=external(cfg))


# ---- the stage ---------------------------------------------------------------------------------------
def _heldout(curated: Curated, n: int) -> set[int]:
    grams: set[int] = set()
    for split in ("val", "test"):
        for row in curated.documents(split, columns=["text"]):
            grams |= ngrams(row["text"], n)
    return grams


def _build(cfg: Config, curated: Curated, out: Path, cache: Path) -> dict:
    chunks = split_chunks(curated, "train", curated.domain, cfg.chunk_chars)
    picked = select_chunks(chunks, cfg.max_chunks, cfg.topics, cfg.seed)
    if not picked:
        raise UserError("synth: no chunks to work from; the domain train split is empty")
    seeds = load_seeds(cfg.seeds)
    state = FilterState(Filters.of(cfg), _heldout(curated, cfg.decontam_ngram))
    teacher = ExtractiveTeacher(Pool.build(chunks), cfg.seed) if cfg.teacher == "extractive" else \
        cfg.model_teacher(cache)
    if cfg.teacher != "extractive":
        _fitness(cfg, teacher, picked, seeds, state)

    shards = [picked[i:i + cfg.shard_chunks] for i in range(0, len(picked), cfg.shard_chunks)]
    (out / "shards").mkdir(exist_ok=True)
    counts: Counter = Counter()
    t0 = time.time()
    with progress(f"synth · {cfg.teacher}", len(picked), "chunks") as bar:
        for si, shard in enumerate(shards):
            path = out / "shards" / f"shard-{si:05d}.jsonl"
            if path.is_file():  # completion marker: the shard was written whole
                rows = read_jsonl(path)
                for r in rows:  # rebuild the dedup state from finished shards
                    apply_filters(r, next(c for c in shard if c.id == r["chunk_id"]), state)
            else:
                rows = generate_items(teacher, shard, cfg.kinds, cfg.per_chunk, seeds, cfg.templates, state)
                write_jsonl(path, rows)
            counts["items"] += len(rows)
            bar.update(advance=len(shard), items=f"{counts['items']:,} items")
    elapsed = time.time() - t0
    return _write_outputs(cfg, out, shards, teacher, elapsed, len(picked), len(chunks))


def _fitness(cfg, teacher, picked, seeds, state) -> None:
    """A few requests before the long run: if too few items pass, stop and say which filter failed."""
    probe = picked[: max(1, cfg.fitness_requests // max(1, len(cfg.kinds)))]
    scratch = FilterState(state.filters, state.heldout)
    rows = generate_items(teacher, probe, cfg.kinds, 1, seeds, cfg.templates, scratch)
    passed = sum(r["kept"] for r in rows)
    if not rows or passed / len(rows) < cfg.fitness_min_pass:
        fails = Counter(next((f"{k}: {v}" for k, v in r["verdicts"].items() if v != "ok"), "?")
                        for r in rows if not r["kept"])
        raise UserError(f"synth: the teacher failed the fitness check: {passed}/{len(rows)} trial items passed "
                        f"(need {cfg.fitness_min_pass:.0%}). Most common failure: "
                        f"{fails.most_common(1)[0][0] if fails else 'no reply'}. The teacher is not fit for "
                        "these kinds: use a bigger one (hf_model: a larger local chat model, or teacher: openai "
                        "with an OpenAI-compatible server such as vLLM or llama.cpp serving a 7B+ model), or "
                        "check the templates or synth.min_grounded before a long run.")
    info(f"  synth · fitness check: {passed}/{len(rows)} trial items passed")


def _write_outputs(cfg, out: Path, shards, teacher, elapsed: float, n_chunks: int, n_all_chunks: int) -> dict:
    rows = [r for si in range(len(shards)) for r in read_jsonl(out / "shards" / f"shard-{si:05d}.jsonl")]
    kept = [r for r in rows if r["kept"]]
    by_kind = Counter(r["kind"] for r in rows)
    kept_kind = Counter(r["kind"] for r in kept)
    dropped_by_kind: dict[str, Counter] = {}  # an item can fail more than one filter; each is counted
    for r in rows:
        if not r["kept"]:
            dropped_by_kind.setdefault(r["kind"], Counter()).update(
                k for k, v in r["verdicts"].items() if v != "ok")
    dropped = sum(dropped_by_kind.values(), Counter())

    def dump(name, items):
        write_jsonl(out / name, items)

    meta_keys = ("id", "kind", "chunk_id", "teacher", "template")
    dump("sft.jsonl", [{"messages": r["messages"], **{k: r[k] for k in meta_keys}}
                       for r in kept if r["kind"] not in ("preference", "reading", *REASONS)])
    dump("rationale.jsonl", [{"question": r["question"], "answer": r["answer"], "rationale": r["rationale"],
                              **{k: r[k] for k in meta_keys}} for r in kept if r["kind"] in REASONS])
    dump("dpo.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                        **{k: r[k] for k in meta_keys}} for r in kept if r["kind"] == "preference"])
    dump("reading.jsonl", [{"text": r["text"], **{k: r[k] for k in meta_keys}} for r in kept if r["kind"] == "reading"])
    dump("items.jsonl", kept)
    dump("rejected.jsonl", [r for r in rows if not r["kept"]])
    quality = _quality(kept)
    stats = dict(getattr(teacher, "stats", {}) or {})
    metrics = {"teacher": teacher.name, "chunks": n_chunks, "chunks_available": n_all_chunks,
               "generated": dict(by_kind), "kept": dict(kept_kind), "dropped_by_filter": dict(dropped),
               "acceptance": {k: round(kept_kind.get(k, 0) / n, 4) for k, n in by_kind.items()},
               "dropped_by_kind": {k: dict(v) for k, v in dropped_by_kind.items()},
               "items_per_minute": round(len(rows) / max(elapsed, 1e-6) * 60, 1), "quality": quality,
               "wall_s": round(elapsed, 1), "teacher_tokens": {k: stats.get(k, 0) for k in
                                                               ("prompt_tokens", "completion_tokens")},
               "teacher_stats": stats,
               "cost_usd": round(teacher.cost_usd(), 4) if hasattr(teacher, "cost_usd") else 0.0}
    (out / "report.md").write_text(_report(metrics, kept), encoding="utf-8")
    _print(metrics)
    return metrics


def _quality(kept: list[dict]) -> dict:
    """How answerable the choice items are by trivial rules (chance is 25%)."""
    out = {k: trivial_baselines([r for r in kept if r["kind"] == k]) for k in ("mcq", "completion")}
    return {k: v for k, v in out.items() if v}


def _report(m: dict, kept: list[dict]) -> str:
    tt = m.get("teacher_tokens", {})
    lines = ["# synth report", "", f"teacher: {m['teacher']}; chunks: {m['chunks']} of {m['chunks_available']}; "
             f"{m['items_per_minute']} items/minute ({m.get('wall_s', 0):.0f} s); teacher tokens: "
             f"{tt.get('prompt_tokens', 0):,} prompt, {tt.get('completion_tokens', 0):,} generated (this run, "
             f"cache hits not counted); cost ${m['cost_usd']}", "",
             "| kind | generated | kept | acceptance | dropped by filter |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {m['generated'].get(k, 0)} | {m['kept'].get(k, 0)} | {m['acceptance'].get(k, 0):.0%} | "
              + (", ".join(f"{f} {n}" for f, n in sorted(m["dropped_by_kind"].get(k, {}).items())) or "-") + " |"
              for k in KINDS if k in m["generated"]]
    lines += ["", "## Dropped by filter", ""] + [f"- {k}: {v}" for k, v in sorted(m["dropped_by_filter"].items())]
    lines += ["", "## Trivial-rule accuracy on choice items (chance 25%)", ""]
    lines += [f"- {k}: longest option {q['longest_option']:.0%}, most word overlap {q['most_overlap']:.0%}"
              f" ({q['items']} items)" for k, q in m["quality"].items()]
    rng = random.Random(0)
    sample = rng.sample(kept, min(10, len(kept)))
    lines += ["", "## Spot-check sample", ""]
    for r in sample:
        lines += [f"**{r['kind']}** ({r['chunk_id']}): {prompt_text(r)[:300]}", "", f"> {answer_text(r)[:300]}", ""]
    return "\n".join(lines) + "\n"


def _print(m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"synth ({m['teacher']}): {m['items_per_minute']:.0f} items/min")
    for col in ("kind", "generated", "kept"):
        t.add_column(col)
    for k in KINDS:
        if k in m["generated"]:
            t.add_row(k, str(m["generated"][k]), str(m["kept"].get(k, 0)))
    console.print(t)
    if m["dropped_by_filter"]:
        console.print("dropped by filter: " + ", ".join(f"{k} {v}" for k, v in sorted(m["dropped_by_filter"].items())))
