"""Synthetic items from text chunks: chunking, the filters every item passes, model-teacher prompts
and replies, and the typed teacher settings. The synth stage (training data) and the bench stage
(benchmarks, from the test split) both build on this; neither imports the other.

Filters, each recorded on every item: schema, length, exact and near duplicates (MinHash over word
3-grams), groundedness (share of the answer's content words found in the chunk), and decontamination
(any shared n-gram with held-out text).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from slmforge.common import read_jsonl
from slmforge.config import DEVICE_PATTERN, BatchSize, StageConfig
from slmforge.errors import UserError
from slmforge.hardware import auto_batch, resolve_device
from slmforge.records import Curated
from slmforge.synthetic.extractive import Chunk, ExtractiveTeacher, content_words, heading_of, reading_text
from slmforge.synthetic.teacher import OpenAIConfig

Kind = Literal["qa", "mcq", "completion", "summary", "instruction", "rationale", "evidence", "preference", "reading"]
KINDS: tuple[str, ...] = get_args(Kind)
# `rationale`: the teacher's own step-by-step reasoning from the chunk to the answer (model teachers);
# `evidence`: the chunk's supporting sentences, quoted (the extractive teacher: it cannot reason). Both
# carry the text in a `rationale` field: the second task of step-by-step distillation.
REASONS = ("rationale", "evidence")
# `reading`: the chunk followed by questions and answers about it, a document for pretraining (not SFT)


# ---- who writes the items ------------------------------------------------------------------------------
class TeacherConfig(StageConfig):
    """The teacher settings synth and bench share: extractive (no model), an OpenAI-compatible server
    (vLLM, SGLang, TGI, llama.cpp, Ollama, OpenAI) or a local HF model folder."""

    teacher: Literal["extractive", "openai", "hf"] = Field("extractive", description="who writes the items")
    openai: OpenAIConfig | None = Field(None, description="teacher: openai: base_urls, model, api_key_env, "
                                                          "concurrency, ...")
    hf_model: str | None = Field(None, description="teacher: hf: a base (`slmforge base list`, e.g. smollm2-135m) "
                                                   "or a local HF chat-model folder")
    hf_batch: BatchSize = Field("auto", description="teacher: hf: prompts per generate() call, auto: 16 on the CPU, "
                                "64 on a GPU (left-padded, KV cache; "
                                                "sampled replies depend on it, so it is part of the cache key)")
    hf_dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="teacher: hf: weights while generating")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="teacher: hf: where it runs; " + "auto: the GPU where one is visible, else the CPU; cpu; cuda or cuda:N (an error without that GPU)")
    seed: int = Field(0, description="chunk selection, extractive choices and the model teacher's sampling")

    @field_validator("hf_model")
    @classmethod
    def _hf_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        from slmforge.models.bases import folder_or_name

        return None if v is None else folder_or_name(v, info)

    @model_validator(mode="after")
    def _teacher(self):
        if self.teacher == "openai" and not self.openai:
            raise ValueError("teacher: openai needs an `openai:` section with base_urls and model")
        if self.teacher == "hf" and not self.hf_model:
            raise ValueError("teacher: hf needs hf_model: a base name (smollm2-135m) or a local model folder")
        return self

    def key_dict(self) -> dict[str, Any]:
        """Where the servers are and how hard they are pushed does not change the replies."""
        d = super().key_dict()
        d.pop("device", None)  # where the teacher runs, not what it is asked
        if d.get("openai"):
            d["openai"] = {k: v for k, v in d["openai"].items() if k not in OpenAIConfig.NOT_IN_KEY}
        return d

    def external(self) -> dict:
        """The identity of the hf teacher, for the stage's cache key: a named base's (bases.fingerprint), a
        folder's files (artifacts.fingerprint)."""
        from slmforge.artifacts import fingerprint
        from slmforge.models import bases

        if self.teacher != "hf" or not self.hf_model:
            return {}
        name = bases.base_name(self.hf_model)
        return {"hf_model": bases.fingerprint(name) if name else fingerprint(self.hf_model)}

    def model_teacher(self, cache: Path):
        from slmforge.models import bases
        from slmforge.synthetic import teacher as T

        if self.teacher == "hf":
            device = resolve_device(self.device, "device")
            return T.HFTeacher(bases.locate(self.hf_model), cache, max_batch=auto_batch(self.hf_batch, device, 16, 64),
                               dtype=self.hf_dtype, seed=self.seed, device=device)
        return T.OpenAITeacher(self.openai, cache)


def teacher_label(cfg: dict) -> str:
    """A teacher by name, from a synth or bench config: extractive, hf:<base or folder>, openai:<model>."""
    from slmforge.models import bases

    if cfg.get("teacher", "extractive") == "extractive":
        return "extractive"
    if cfg["teacher"] == "hf":
        return "hf:" + (bases.base_name(cfg["hf_model"]) or Path(cfg["hf_model"]).name)
    return f"openai:{cfg['openai']['model']}"


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


def split_chunks(curated: Curated, split: str, sources: list[str], chunk_chars: int) -> list[Chunk]:
    """Every chunk of the sources' documents in one split of the curate stage."""
    return [c for s in sources for d in curated.documents(split, s) for c in chunk_document(d, chunk_chars)]


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
            "evidence": ("question", "answer", "rationale"), "reading": ("question", "answer", "pairs"),
            "preference": ("prompt", "chosen", "rejected")}


def schema_problem(item: dict) -> str | None:
    for f in REQUIRED[item["kind"]]:
        if item.get(f) in (None, "", []):
            return f"missing {f}"
    if item["kind"] == "reading" and not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(x, str) and x.strip() for x in p) for p in item["pairs"]):
        return "questions and answers must be non-empty strings, as many of each"
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


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() of a str is salted per process by
    PYTHONHASHSEED, so which items a filter drops would differ between runs)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def ngrams(text: str, n: int) -> set[int]:
    w = re.findall(r"\w+", text.lower())
    return {stable_hash(" ".join(w[i:i + n])) for i in range(len(w) - n + 1)}


class NearDup:
    """MinHash LSH over word 3-grams of each prompt (64 hashes in 16 bands of 4), then an exact
    Jaccard check. datatrove's MinHash runs as file-based multi-stage jobs; for a few thousand short
    items an in-memory index is simpler (no files, one pass).

    Each hash is (a*x + b) mod p with p = 2**31 - 1 and x, a, b < p, so a*x + b < 2**62 is exact in
    uint64. (datatrove's and datasketch's signatures multiply a 32-bit shingle by a coefficient up to
    2**61 in uint64, which wraps before the modulus; the family is then no longer the universal one
    MinHash's estimate assumes.)"""

    P = np.uint64(2**31 - 1)

    def __init__(self, threshold: float, seed: int = 0):
        self.threshold = threshold
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(self.P), 64, dtype=np.uint64)
        self.b = rng.integers(0, int(self.P), 64, dtype=np.uint64)
        self.buckets: dict[tuple, list[int]] = defaultdict(list)
        self.shingles: list[set[int]] = []

    def signature(self, sh: set[int]) -> np.ndarray:
        x = np.fromiter((h % int(self.P) for h in sh), dtype=np.uint64)
        return ((x[:, None] * self.a + self.b) % self.P).min(axis=0)

    def seen(self, text: str) -> bool:
        """True when text is a near-duplicate of an earlier one; else it is added."""
        sh = ngrams(text, 3) or {stable_hash(text)}
        sig = self.signature(sh)
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


@dataclass(frozen=True)
class Filters:
    """The thresholds of the filters (the synth stage's defaults; synth's Config sets them all)."""

    min_answer_chars: int = 2
    max_answer_chars: int = 2000
    min_grounded: float = 0.6
    near_dup_jaccard: float = 0.7
    decontam_ngram: int = 13
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> Filters:
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


@dataclass
class FilterState:
    """What the duplicate filters have seen so far, and the held-out n-grams of decontamination."""

    filters: Filters
    heldout: set[int] = field(default_factory=set)
    exact: set = field(default_factory=set)
    near: dict = field(default_factory=dict)

    def near_dup(self, kind: str) -> NearDup:
        if kind not in self.near:
            self.near[kind] = NearDup(self.filters.near_dup_jaccard, self.filters.seed)
        return self.near[kind]


def prompt_text(item: dict) -> str:
    return item.get("question") or item["messages"][0]["content"]


def answer_text(item: dict) -> str:
    if item["kind"] in ("mcq", "completion"):
        return item["options"][item["answer_index"]]
    if item["kind"] == "preference":
        return item["chosen"][0]["content"]
    return item["answer"]


def apply_filters(item: dict, chunk: Chunk, state: FilterState) -> dict:
    """Verdicts for every filter, in order; the first failure decides."""
    f = state.filters
    v: dict[str, str] = {}
    problem = schema_problem(item)
    v["schema"] = problem or "ok"
    if problem:
        return v
    ans = answer_text(item)
    v["length"] = "ok" if f.min_answer_chars <= len(ans) <= f.max_answer_chars else f"answer has {len(ans)} chars"
    key = (item["kind"], " ".join(prompt_text(item).lower().split()), ans.strip().lower())
    v["exact_dup"] = "duplicate" if key in state.exact else "ok"
    state.exact.add(key)
    v["near_dup"] = "near-duplicate prompt" if state.near_dup(item["kind"]).seen(prompt_text(item) + " " + ans) else "ok"
    share = grounded_share(ans, chunk.text)
    v["grounded"] = "ok" if share >= f.min_grounded else f"{share:.0%} of the answer's words are in the chunk"
    if item["kind"] in REASONS and v["grounded"] == "ok":  # the reasoning, too, must come from the chunk
        share = grounded_share(item["rationale"], chunk.text)
        if share < f.min_grounded:
            v["grounded"] = f"{share:.0%} of the rationale's words are in the chunk"
    text = " ".join([prompt_text(item), ans, item.get("rationale", "")])
    hits = ngrams(text, f.decontam_ngram) & state.heldout
    v["decontam"] = "ok" if not hits else f"{len(hits)} {f.decontam_ngram}-grams shared with val/test"
    return v


# ---- model teachers ----------------------------------------------------------------------------------
SCHEMAS = {
    "qa": {"question": "string", "answer": "string"},
    "mcq": {"question": "string", "options": "array", "answer_index": "integer"},
    "completion": {"question": "string", "options": "array", "answer_index": "integer"},
    "summary": {"answer": "string"},
    "instruction": {"question": "string", "answer": "string"},
    "rationale": {"question": "string", "answer": "string", "rationale": "string"},
    "evidence": {"question": "string", "answer": "string", "rationale": "string"},
    "reading": {"questions": "array", "answers": "array"},
    "preference": {"question": "string", "chosen": "string", "rejected": "string"},
}


# Reply budgets per kind: a batch of a local model runs until its longest member stops, and a weak model
# that rambles always reaches the budget (SmolLM2-135M's replies often ran to the old 512 for all, at
# commit ef79d62).
MAX_TOKENS = {"qa": 192, "mcq": 192, "completion": 160, "summary": 256, "instruction": 320, "rationale": 320,
              "evidence": 320, "preference": 320, "reading": 384}


def json_schema(kind: str) -> dict:
    props = {k: {"type": t} if t != "array" else {"type": "array", "items": {"type": "string"}}
             for k, t in SCHEMAS[kind].items()}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def load_seeds(path: str | None, key: str = "synth.seeds") -> list[dict]:
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}: {p} does not exist")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            rows = yaml.safe_load(p.read_text(encoding="utf-8")) or []
        else:
            rows = read_jsonl(p)
    except (ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{key}: {p} is not valid JSONL/YAML: {e}") from None
    seeds = []
    for i, r in enumerate(rows):
        q = r.get("question") or r.get("instruction")
        a = r.get("answer") or r.get("response")
        if not (isinstance(q, str) and isinstance(a, str)):
            raise UserError(f"{key}: {p} item {i + 1} needs question/answer or instruction/response strings")
        seeds.append({"question": q, "answer": a})
    return seeds


def render_prompt(kind: str, chunk: Chunk, seeds: list[dict], templates: dict[str, str]) -> tuple[str, str]:
    """(prompt, template name) from the kind's Jinja template (`templates[kind]`, else the built-in one)."""
    import jinja2

    if kind in templates:
        path = Path(templates[kind])
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
    if kind == "reading":
        qs, ans = data.get("questions"), data.get("answers")
        ok = isinstance(qs, list) and isinstance(ans, list) and len(qs) == len(ans)
        item["pairs"] = [[str(q), str(a)] for q, a in zip(qs, ans)] if ok else [["", ""]]
        item["question"] = "Read the text and answer the questions about it."
        item["answer"] = "\n".join(a for _, a in item["pairs"])
    if kind in ("mcq", "completion") and isinstance(item.get("options"), list) and \
            isinstance(item.get("answer_index"), int) and 0 <= item["answer_index"] < len(item["options"]):
        item["answer"] = item["options"][item["answer_index"]]
    q, a = item.get("question") or "", item.get("answer") or ""
    item["messages"] = [{"role": "user", "content": q}, {"role": "assistant", "content": str(a)}]
    return item


def generate_items(teacher, shard: list[Chunk], kinds, per_chunk: int, seeds: list[dict],
                   templates: dict[str, str], state: FilterState) -> list[dict]:
    """Items of `kinds` for every chunk of `shard` (`per_chunk` each), every one with its verdicts and
    `kept`; the extractive teacher writes them itself, a model teacher through one request each."""
    rows = []
    if isinstance(teacher, ExtractiveTeacher):
        made = [(c, it) for c in shard for kind in kinds for it in teacher.items(c, kind, per_chunk)]
    else:
        from slmforge.synthetic.teacher import Request

        reqs, meta = [], []
        for c in shard:
            for kind in kinds:
                for k in range(per_chunk):
                    prompt, tname = render_prompt(kind, c, seeds, templates)
                    reqs.append(Request(key=f"{c.id}:{kind}:{k}", messages=[{"role": "user", "content": prompt}],
                                        json_schema=json_schema(kind), max_tokens=MAX_TOKENS[kind]))
                    meta.append((c, kind, tname))
        made = []
        for (c, kind, tname), reply in zip(meta, teacher.generate(reqs)):
            if reply.error or not isinstance(reply.data, dict):
                rows.append({"kind": kind, "chunk_id": c.id, "teacher": teacher.name, "template": tname,
                             "verdicts": {"teacher": reply.error or "not a JSON object"}, "kept": False,
                             "reply": (reply.text or "")[:2000]})  # what the teacher said, to judge it by
                continue
            item = item_from_reply(kind, reply.data)
            item["template"] = tname
            if kind == "reading":
                item["text"] = reading_text(c.text, item["pairs"])
            made.append((c, item))
    for c, item in made:
        item.update(chunk_id=c.id, source_doc=c.doc_id, teacher=teacher.name)
        item["verdicts"] = apply_filters(item, c, state)
        item["kept"] = all(v == "ok" for v in item["verdicts"].values())
        item["id"] = hashlib.sha1(f"{c.id}:{item['kind']}:{prompt_text(item)}".encode()).hexdigest()[:16]
        rows.append(item)
    return rows
