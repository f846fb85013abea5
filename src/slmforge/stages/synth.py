"""synth: guided synthetic data from the curated train split, grounded in its text and filtered.

Chunks: the domain sources' train documents (never val/test), split at blank lines into chunks of
about `chunk_chars`, each with its section title; chunks are chosen to cover the topics (or, without
topics, the documents) evenly. Per chunk the teacher makes the `kinds` asked for. The extractive
teacher (default) needs no model; `openai` and `hf` teachers get a Jinja prompt per kind (override
with `templates: {kind: path}`) with the seed examples as few-shot examples, and must answer JSON.
Filters, each recorded on every item: schema, length, exact and near duplicates (MinHash over word
3-grams), groundedness (share of the answer's content words found in the chunk), and
decontamination (any shared 13-gram with the val/test splits). Output, in TRL's formats:
`sft.jsonl` (`messages`), `rationale.jsonl`, `dpo.jsonl` (`prompt`/`chosen`/`rejected`), `items.jsonl`
(every kept item with its fields and verdicts), `rejected.jsonl` (with the failing verdict) and a
`report.md`. Work goes in shards with completion markers, and model teachers' replies are cached in
`<workdir>/teacher-cache/`, so a killed run resumes and asks nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import RecipePath, StageConfig, resolve_path
from slmforge.console import console, count_progress, info
from slmforge.errors import UserError
from slmforge.extractive import Chunk, ExtractiveTeacher, Pool, content_words, heading_of, trivial_baselines
from slmforge.records import read_documents

NAME = "synth"
INPUTS = ("curate",)
KINDS = ("qa", "mcq", "completion", "summary", "instruction", "rationale", "preference")


class Config(StageConfig):
    """Which teacher, which kinds, how much, and how strict the filters are."""

    teacher: Literal["extractive", "openai", "hf"] = Field("extractive", description="who writes the items")
    openai: dict | None = Field(None, description="teacher: openai: base_urls, model, api_key_env, concurrency, ...")
    hf_model: RecipePath | None = Field(None, description="teacher: hf: a local HF model folder")
    kinds: list[Literal["qa", "mcq", "completion", "summary", "instruction", "rationale", "preference"]] = Field(
        list(KINDS), description="task kinds to generate")
    per_chunk: int = Field(1, ge=1, description="items of each kind per chunk")
    max_chunks: int | None = Field(400, ge=1, description="chunks to use at most (None: all)")
    chunk_chars: int = Field(1500, ge=200, description="target characters per chunk")
    seeds: RecipePath | None = Field(None, description="JSONL or YAML of seed examples (question/answer or "
                                                "instruction/response), used as few-shot examples")
    topics: list[str] | None = Field(None, description="topics to cover evenly (chunks are matched by words)")
    templates: dict[str, str] = Field(default_factory=dict, description="kind -> a Jinja template file")
    min_answer_chars: int = Field(2, ge=1)
    max_answer_chars: int = Field(2000, ge=10)
    min_grounded: float = Field(0.6, ge=0, le=1, description="share of the answer's content words in the chunk")
    near_dup_jaccard: float = Field(0.7, gt=0, le=1, description="word 3-gram Jaccard above which a prompt is a near-duplicate")
    decontam_ngram: int = Field(13, ge=5, description="n-gram size for decontamination against val/test")
    shard_chunks: int = Field(50, ge=1, description="chunks per shard (the unit of resume)")
    fitness_requests: int = Field(8, ge=1, description="model teachers: requests of the fitness check")
    fitness_min_pass: float = Field(0.5, ge=0, le=1, description="share that must pass the filters")
    seed: int = 0

    @field_validator("templates")
    @classmethod
    def _abs_templates(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        bad = [k for k in v if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kind(s) {', '.join(bad)}; kinds are {', '.join(KINDS)}")
        return {k: str(resolve_path(p, info)) for k, p in v.items()}

    @model_validator(mode="after")
    def _teacher(self):
        if self.teacher == "openai" and not self.openai:
            raise ValueError("teacher: openai needs an `openai:` section with base_urls and model")
        if self.openai:
            from pydantic import ValidationError

            from slmforge.teacher import OpenAIConfig

            try:
                OpenAIConfig(**self.openai)
            except ValidationError as e:
                raise ValueError("openai: " + "; ".join(
                    f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
        if self.teacher == "hf" and not self.hf_model:
            raise ValueError("teacher: hf needs hf_model: a local model folder")
        return self


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {"curate": store.resolve("curate:latest")}
    # the teacher's reply cache lives beside the run directories, so a re-run with other settings or
    # --force pays for no request twice
    cache = store.workdir / "teacher-cache"
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs["curate"], out, cache), resumable=True,
                       force=force)


# ---- chunks ----------------------------------------------------------------------------------------
def chunk_document(doc: dict, chunk_chars: int) -> list[Chunk]:
    """Split at blank lines into chunks of about chunk_chars, never inside a paragraph or code block."""
    paras = [p for p in doc["text"].split("\n\n") if p.strip()]
    chunks, cur = [], []
    for p in paras:
        if cur and sum(len(x) for x in cur) + len(p) > chunk_chars:
            chunks.append(cur)
            cur = []
        cur.append(p)
    if cur:
        chunks.append(cur)
    title = doc.get("title") or ""
    out = []
    for i, ps in enumerate(chunks):
        heading = next((p.lstrip("# ").strip() for p in ps if p.startswith("#")), None)
        out.append(Chunk(f"{doc['id']}#{i}", doc["id"], doc["source"], heading or title, "\n\n".join(ps)))
    return out


def split_chunks(curate: Artifact, split: str, sources: list[str], chunk_chars: int) -> list[Chunk]:
    """Every chunk of the sources' documents in one split of the curate stage."""
    return [c for s in sources for d in read_documents(curate.path / "data" / split, s)
            for c in chunk_document(d, chunk_chars)]


def select_chunks(chunks: list[Chunk], max_chunks: int | None, topics: list[str] | None, seed: int) -> list[Chunk]:
    """Cover topics (or documents) evenly: round-robin over groups, in a seeded order."""
    groups: dict[str, list[Chunk]] = defaultdict(list)
    if topics:
        topic_words = [set(content_words(t)) for t in topics]
        for c in chunks:
            words = set(content_words(c.title + " " + c.text))
            scores = [len(words & tw) / (len(tw) or 1) for tw in topic_words]
            best = int(np.argmax(scores))
            if scores[best] > 0:
                groups[topics[best]].append(c)
    else:
        for c in chunks:
            groups[c.doc_id].append(c)
    rng = random.Random(seed)
    order = sorted(groups)
    rng.shuffle(order)
    for g in order:
        rng.shuffle(groups[g])
    picked, i = [], 0
    while any(groups[g] for g in order) and (max_chunks is None or len(picked) < max_chunks):
        g = order[i % len(order)]
        if groups[g]:
            picked.append(groups[g].pop())
        i += 1
    return picked


# ---- filters ---------------------------------------------------------------------------------------
REQUIRED = {"qa": ("question", "answer"), "mcq": ("question", "options", "answer_index"),
            "completion": ("question", "options", "answer_index"), "summary": ("question", "answer"),
            "instruction": ("question", "answer"), "rationale": ("question", "answer", "rationale"),
            "preference": ("prompt", "chosen", "rejected")}


def schema_problem(item: dict) -> str | None:
    for f in REQUIRED[item["kind"]]:
        if item.get(f) in (None, "", []):
            return f"missing {f}"
    if item["kind"] in ("mcq", "completion"):
        opts = item["options"]
        if len(opts) != 4 or len(set(opts)) != 4 or not 0 <= item["answer_index"] < 4:
            return "options must be 4 distinct strings and answer_index in 0..3"
    return None


def grounded_share(answer: str, chunk_text: str) -> float:
    words = content_words(answer)
    if not words:
        return 0.0
    have = set(content_words(chunk_text))
    return sum(w in have for w in words) / len(words)


def ngrams(text: str, n: int) -> set[int]:
    w = re.findall(r"\w+", text.lower())
    return {hash(" ".join(w[i:i + n])) for i in range(len(w) - n + 1)}


class NearDup:
    """MinHash LSH over word 3-grams of each prompt (64 hashes in 16 bands of 4), then an exact
    Jaccard check. datatrove's MinHash runs as file-based multi-stage jobs; for a few thousand short
    items an in-memory index is simpler (5,000 items: well under a second here)."""

    def __init__(self, threshold: float, seed: int = 0):
        self.threshold = threshold
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**61 - 1, 64, dtype=np.uint64)
        self.b = rng.integers(0, 2**61 - 1, 64, dtype=np.uint64)
        self.buckets: dict[tuple, list[int]] = defaultdict(list)
        self.shingles: list[set[int]] = []

    def _sig(self, sh: set[int]) -> np.ndarray:
        x = np.fromiter((h & 0xFFFFFFFFFFFF for h in sh), dtype=np.uint64)
        return ((x[:, None] * self.a + self.b) % np.uint64(2**61 - 1)).min(axis=0)

    def seen(self, text: str) -> bool:
        """True when text is a near-duplicate of an earlier one; else it is added."""
        sh = ngrams(text, 3) or {hash(text)}
        sig = self._sig(sh)
        keys = [(i, tuple(sig[i * 4:(i + 1) * 4])) for i in range(16)]
        for k in keys:
            for j in self.buckets.get(k, ()):
                other = self.shingles[j]
                if len(sh & other) / len(sh | other) >= self.threshold:
                    return True
        idx = len(self.shingles)
        self.shingles.append(sh)
        for k in keys:
            self.buckets[k].append(idx)
        return False


def prompt_text(item: dict) -> str:
    return item.get("question") or item["messages"][0]["content"]


def answer_text(item: dict) -> str:
    if item["kind"] in ("mcq", "completion"):
        return item["options"][item["answer_index"]]
    if item["kind"] == "preference":
        return item["chosen"][0]["content"]
    return item["answer"]


def apply_filters(item: dict, chunk: Chunk, cfg: Config, state: dict) -> dict:
    """Verdicts for every filter, in order; the first failure decides."""
    v: dict[str, str] = {}
    problem = schema_problem(item)
    v["schema"] = problem or "ok"
    if problem:
        return v
    ans = answer_text(item)
    v["length"] = "ok" if cfg.min_answer_chars <= len(ans) <= cfg.max_answer_chars else f"answer has {len(ans)} chars"
    key = (item["kind"], " ".join(prompt_text(item).lower().split()), ans.strip().lower())
    v["exact_dup"] = "duplicate" if key in state["exact"] else "ok"
    state["exact"].add(key)
    v["near_dup"] = "near-duplicate prompt" if state["near"][item["kind"]].seen(prompt_text(item) + " " + ans) else "ok"
    share = grounded_share(ans, chunk.text)
    v["grounded"] = "ok" if share >= cfg.min_grounded else f"{share:.0%} of the answer's words are in the chunk"
    text = " ".join([prompt_text(item), ans, item.get("rationale", "")])
    hits = ngrams(text, cfg.decontam_ngram) & state["heldout"]
    v["decontam"] = "ok" if not hits else f"{len(hits)} {cfg.decontam_ngram}-grams shared with val/test"
    return v


# ---- model teachers ----------------------------------------------------------------------------------
SCHEMAS = {
    "qa": {"question": "string", "answer": "string"},
    "mcq": {"question": "string", "options": "array", "answer_index": "integer"},
    "completion": {"question": "string", "options": "array", "answer_index": "integer"},
    "summary": {"answer": "string"},
    "instruction": {"question": "string", "answer": "string"},
    "rationale": {"question": "string", "answer": "string", "rationale": "string"},
    "preference": {"question": "string", "chosen": "string", "rejected": "string"},
}


def json_schema(kind: str) -> dict:
    props = {k: {"type": t} if t != "array" else {"type": "array", "items": {"type": "string"}}
             for k, t in SCHEMAS[kind].items()}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def load_seeds(path: str | None) -> list[dict]:
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise UserError(f"synth.seeds: {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            rows = yaml.safe_load(text) or []
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, json.JSONDecodeError) as e:
        raise UserError(f"synth.seeds: {p} is not valid JSONL/YAML: {e}") from None
    seeds = []
    for i, r in enumerate(rows):
        q = r.get("question") or r.get("instruction")
        a = r.get("answer") or r.get("response")
        if not (isinstance(q, str) and isinstance(a, str)):
            raise UserError(f"synth.seeds: {p} item {i + 1} needs question/answer or instruction/response strings")
        seeds.append({"question": q, "answer": a})
    return seeds


def render_prompt(kind: str, chunk: Chunk, seeds: list[dict], cfg: Config) -> tuple[str, str]:
    """(prompt, template name) from the kind's Jinja template."""
    import jinja2

    if kind in cfg.templates:
        path = Path(cfg.templates[kind])
        if not path.is_file():
            raise UserError(f"synth.templates.{kind}: {path} does not exist")
        source, name = path.read_text(encoding="utf-8"), str(path)
    else:
        from importlib.resources import files

        source = files("slmforge").joinpath(f"templates/synth/{kind}.j2").read_text(encoding="utf-8")
        name = f"builtin:{kind}"
    tmpl = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(source)
    return tmpl.render(chunk=chunk.text, title=heading_of(chunk), seeds=seeds[:3], schema=SCHEMAS[kind]), name


def item_from_reply(kind: str, data: dict) -> dict:
    item = {"kind": kind, **{k: data.get(k) for k in SCHEMAS[kind]}}
    if kind == "summary":
        item["question"] = "Summarize this section of the documentation."
    if kind == "preference":
        item["prompt"] = [{"role": "user", "content": data.get("question") or ""}]
        item["chosen"] = [{"role": "assistant", "content": data.get("chosen") or ""}]
        item["rejected"] = [{"role": "assistant", "content": data.get("rejected") or ""}]
        item["answer"] = data.get("chosen")
    if kind in ("mcq", "completion") and isinstance(item.get("options"), list) and \
            isinstance(item.get("answer_index"), int) and 0 <= item["answer_index"] < len(item["options"]):
        item["answer"] = item["options"][item["answer_index"]]
    q, a = item.get("question") or "", item.get("answer") or ""
    item["messages"] = [{"role": "user", "content": q}, {"role": "assistant", "content": str(a)}]
    return item


def model_teacher(cfg: Config, cache: Path):
    from slmforge import teacher as T

    if cfg.teacher == "hf":
        return T.HFTeacher(cfg.hf_model, cache)
    return T.OpenAITeacher(T.OpenAIConfig(**cfg.openai), cache)


# ---- the stage ---------------------------------------------------------------------------------------
def _heldout(curate: Artifact, n: int) -> set[int]:
    grams: set[int] = set()
    for split in ("val", "test"):
        for row in read_documents(curate.path / "data" / split, columns=["text"]):
            grams |= ngrams(row["text"], n)
    return grams


def _build(cfg: Config, curate: Artifact, out: Path, cache: Path) -> dict:
    roles = curate.manifest["metrics"]["roles"]
    domain = [s for s, r in roles.items() if r == "domain"]
    chunks = split_chunks(curate, "train", domain, cfg.chunk_chars)
    picked = select_chunks(chunks, cfg.max_chunks, cfg.topics, cfg.seed)
    if not picked:
        raise UserError("synth: no chunks to work from; the domain train split is empty")
    seeds = load_seeds(cfg.seeds)
    state = {"exact": set(), "near": defaultdict(lambda: NearDup(cfg.near_dup_jaccard, cfg.seed)),
             "heldout": _heldout(curate, cfg.decontam_ngram)}
    teacher = ExtractiveTeacher(Pool.build(chunks), cfg.seed) if cfg.teacher == "extractive" else \
        model_teacher(cfg, cache)
    if cfg.teacher != "extractive":
        _fitness(cfg, teacher, picked, seeds, state)

    shards = [picked[i:i + cfg.shard_chunks] for i in range(0, len(picked), cfg.shard_chunks)]
    (out / "shards").mkdir(exist_ok=True)
    counts: Counter = Counter()
    t0 = time.time()
    with count_progress() as progress:
        task = progress.add_task(f"synth · {cfg.teacher}", total=len(picked))
        for si, shard in enumerate(shards):
            path = out / "shards" / f"shard-{si:05d}.jsonl"
            if path.is_file():  # completion marker: the shard was written whole
                rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
                for r in rows:  # rebuild the dedup state from finished shards
                    apply_filters(r, next(c for c in shard if c.id == r["chunk_id"]), cfg, state)
            else:
                rows = generate_items(cfg, teacher, shard, seeds, state)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
                os.replace(tmp, path)
            counts["items"] += len(rows)
            progress.update(task, advance=len(shard))
    elapsed = time.time() - t0
    return _write_outputs(cfg, out, shards, teacher, elapsed, len(picked), len(chunks))


def generate_items(cfg, teacher, shard: list[Chunk], seeds, state) -> list[dict]:
    rows = []
    if isinstance(teacher, ExtractiveTeacher):
        made = [(c, it) for c in shard for kind in cfg.kinds for it in teacher.items(c, kind, cfg.per_chunk)]
    else:
        from slmforge.teacher import Request

        reqs, meta = [], []
        for c in shard:
            for kind in cfg.kinds:
                for k in range(cfg.per_chunk):
                    prompt, tname = render_prompt(kind, c, seeds, cfg)
                    reqs.append(Request(key=f"{c.id}:{kind}:{k}", messages=[{"role": "user", "content": prompt}],
                                        json_schema=json_schema(kind)))
                    meta.append((c, kind, tname))
        made = []
        for (c, kind, tname), reply in zip(meta, teacher.generate(reqs)):
            if reply.error or not isinstance(reply.data, dict):
                rows.append({"kind": kind, "chunk_id": c.id, "teacher": teacher.name, "template": tname,
                             "verdicts": {"teacher": reply.error or "not a JSON object"}, "kept": False})
                continue
            item = item_from_reply(kind, reply.data)
            item["template"] = tname
            made.append((c, item))
    for c, item in made:
        item.update(chunk_id=c.id, source_doc=c.doc_id, teacher=teacher.name)
        item["verdicts"] = apply_filters(item, c, cfg, state)
        item["kept"] = all(v == "ok" for v in item["verdicts"].values())
        item["id"] = hashlib.sha1(f"{c.id}:{item['kind']}:{prompt_text(item)}".encode()).hexdigest()[:16]
        rows.append(item)
    return rows


def _fitness(cfg, teacher, picked, seeds, state) -> None:
    """A few requests before the long run: if too few items pass, stop and say which filter failed."""
    probe = picked[: max(1, cfg.fitness_requests // max(1, len(cfg.kinds)))]
    trial = cfg.model_copy(update={"per_chunk": 1})
    scratch = {"exact": set(), "near": defaultdict(lambda: NearDup(cfg.near_dup_jaccard, cfg.seed)),
               "heldout": state["heldout"]}
    rows = generate_items(trial, teacher, probe, seeds, scratch)
    passed = sum(r["kept"] for r in rows)
    if not rows or passed / len(rows) < cfg.fitness_min_pass:
        fails = Counter(next((f"{k}: {v}" for k, v in r["verdicts"].items() if v != "ok"), "?")
                        for r in rows if not r["kept"])
        raise UserError(f"synth: the teacher failed the fitness check: {passed}/{len(rows)} trial items passed "
                        f"(need {cfg.fitness_min_pass:.0%}). Most common failure: "
                        f"{fails.most_common(1)[0][0] if fails else 'no reply'}. Check the model, the templates "
                        f"or synth.min_grounded before a long run.")
    info(f"  synth · fitness check: {passed}/{len(rows)} trial items passed")


def _write_outputs(cfg, out: Path, shards, teacher, elapsed: float, n_chunks: int, n_all_chunks: int) -> dict:
    rows = [json.loads(x) for si in range(len(shards))
            for x in (out / "shards" / f"shard-{si:05d}.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = [r for r in rows if r["kept"]]
    by_kind = Counter(r["kind"] for r in rows)
    kept_kind = Counter(r["kind"] for r in kept)
    dropped = Counter(f"{k}" for r in rows if not r["kept"] for k, v in r["verdicts"].items() if v != "ok")

    def dump(name, items):
        with open(out / name, "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")

    meta_keys = ("id", "kind", "chunk_id", "teacher", "template")
    dump("sft.jsonl", [{"messages": r["messages"], **{k: r[k] for k in meta_keys}}
                       for r in kept if r["kind"] not in ("preference", "rationale")])
    dump("rationale.jsonl", [{"question": r["question"], "answer": r["answer"], "rationale": r["rationale"],
                              **{k: r[k] for k in meta_keys}} for r in kept if r["kind"] == "rationale"])
    dump("dpo.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                        **{k: r[k] for k in meta_keys}} for r in kept if r["kind"] == "preference"])
    dump("items.jsonl", kept)
    dump("rejected.jsonl", [r for r in rows if not r["kept"]])
    quality = _quality(kept)
    stats = dict(getattr(teacher, "stats", {}) or {})
    metrics = {"teacher": teacher.name, "chunks": n_chunks, "chunks_available": n_all_chunks,
               "generated": dict(by_kind), "kept": dict(kept_kind), "dropped_by_filter": dict(dropped),
               "items_per_minute": round(len(rows) / max(elapsed, 1e-6) * 60, 1), "quality": quality,
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
    lines = ["# synth report", "", f"teacher: {m['teacher']}; chunks: {m['chunks']} of {m['chunks_available']}; "
             f"{m['items_per_minute']} items/minute; cost ${m['cost_usd']}", "",
             "| kind | generated | kept |", "|---|---|---|"]
    lines += [f"| {k} | {m['generated'].get(k, 0)} | {m['kept'].get(k, 0)} |" for k in KINDS if k in m["generated"]]
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
