"""The contracts between stages: documents travel as Parquet rows with exactly these columns, and
what a stage hands on is read through the typed readers below, never by digging in a manifest.

A reader takes the producing stage's `Artifact` (its folder and manifest) and returns a frozen
dataclass; the field names are the contract. Stages import these, never each other.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from slmforge.common import read_jsonl

if TYPE_CHECKING:
    from slmforge.artifacts import Artifact

DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # unique within the corpus; the train/val/test split hashes it
        ("source", pa.string()),  # the recipe's source name, e.g. "domain" or "general"
        ("title", pa.string()),
        ("text", pa.string()),
        ("meta", pa.string()),  # JSON object: path, format, role, anything the input carried
    ]
)


@dataclass
class Document:
    id: str
    source: str
    title: str
    text: str
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        row = asdict(self)
        row["meta"] = json.dumps(self.meta, ensure_ascii=False, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict) -> Document:
        meta = row.get("meta") or "{}"
        return cls(row["id"], row["source"], row.get("title") or "", row["text"],
                   json.loads(meta) if isinstance(meta, str) else dict(meta))


# ---- ingest: the sources -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ingested:
    """The ingest stage's output: `data/<source>/*.parquet` and what it counted of each source."""

    path: Path
    sources: dict[str, dict]  # source -> {role, docs, chars, files, ...} (ingest's docstring)

    @classmethod
    def of(cls, art: Artifact) -> Ingested:
        return cls(art.path, dict(art.manifest["metrics"]["sources"]))

    @property
    def roles(self) -> dict[str, str]:
        return {name: s["role"] for name, s in self.sources.items()}


# ---- curate: roles and splits ------------------------------------------------------------------------
@dataclass(frozen=True)
class Curated:
    """The curate stage's output: `data/<split>/<source>/*.parquet`, and each source's role."""

    path: Path
    roles: dict[str, str]  # source -> "domain" | "general": domain sources first, each group by name
    splits: dict[str, dict] = field(default_factory=dict)  # source -> split -> {docs, chars}
    filters: dict = field(default_factory=dict)  # what each filter dropped (curate's docstring)
    docs_in: int = 0  # the documents ingest handed to curate

    @classmethod
    def of(cls, art: Artifact) -> Curated:
        # the same order whether the manifest was just made or read back (written with sorted keys)
        m = art.manifest["metrics"]
        roles = dict(sorted(m["roles"].items(), key=lambda kv: (kv[1] != "domain", kv[0])))
        return cls(art.path, roles, dict(m.get("splits", {})), dict(m.get("filters", {})), int(m.get("docs_in", 0)))

    @property
    def domain(self) -> list[str]:
        return [s for s, r in self.roles.items() if r == "domain"]

    @property
    def general(self) -> list[str]:
        return [s for s, r in self.roles.items() if r == "general"]

    def split(self, split: str) -> Path:
        return self.path / "data" / split

    def documents(self, split: str, source: str | None = None, columns: list[str] | None = None) -> Iterator[dict]:
        return read_documents(self.split(split), source, columns)


# ---- tokenizer: the trained tokenizers ---------------------------------------------------------------
@dataclass(frozen=True)
class Tokenized:
    """The tokenizer stage's output: `tokenizer/` (trained on the domain sources) and, with a baseline,
    `general_tokenizer/`, each an HF tokenizer folder, and how each one tokenizes each kind of text."""

    path: Path
    trained_on: list[str]  # the domain sources the tokenizer was trained on
    vocab_size: int
    eval: dict[str, dict]  # tokenizer -> text ("domain", "general") -> {tokens, words, bytes, fertility, ...}
    domain_token_saving: float | None = None  # 1 - domain tokens (ours) / domain tokens (general tokenizer)

    @classmethod
    def of(cls, art: Artifact) -> Tokenized:
        m = art.manifest["metrics"]
        return cls(art.path, list(m["trained_on"]), int(m["vocab_size"]), dict(m.get("eval", {})),
                   m.get("domain_token_saving"))

    def folder(self, name: str = "tokenizer") -> Path:
        return self.path / name


# ---- synth: the kept items ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Synthesized:
    """The synth stage's output: every kept item (`items.jsonl`) and how its chunks were cut."""

    path: Path
    chunk_chars: int

    @classmethod
    def of(cls, art: Artifact) -> Synthesized:
        return cls(art.path, int(art.manifest["config"]["chunk_chars"]))

    @functools.cached_property
    def items(self) -> list[dict]:
        """Kept items: `id`, `kind`, `chunk_id`, `question`, `answer`, `messages`, ... (synth's docstring)."""
        return read_jsonl(self.path / "items.jsonl")

    def of_kinds(self, kinds) -> list[dict]:
        return [it for it in self.items if it["kind"] in kinds]


# ---- bench: sets keyed by set name --------------------------------------------------------------------
def set_of(task: str) -> str:
    """The set name of a bench task name: `<prefix>_<set>` (set names have no underscore)."""
    return task.rsplit("_", 1)[-1]


@dataclass(frozen=True)
class Benchmarks:
    """The bench stage's output: lm-eval task folders, keyed by set name (mcq, completion, qa, summarization)."""

    path: Path
    tasks: dict[str, str]  # set -> task name, test split
    dev_tasks: dict[str, str]  # choice set -> task name, val split
    sizes: dict[str, int]
    dev_sizes: dict[str, int]
    headline: dict[str, str]  # choice set -> the metric it is judged by
    baselines: dict[str, dict]  # choice set -> {chance, longest_option, ...}
    independence: dict = field(default_factory=dict)  # how far the items are from the training data (bench)

    @classmethod
    def of(cls, art: Artifact) -> Benchmarks:
        m = art.manifest["metrics"]
        return cls(art.path, {set_of(t): t for t in m["tasks"]}, dict(m.get("dev_tasks", {})), dict(m["sizes"]),
                   dict(m.get("dev_sizes", {})), dict(m.get("headline", {})), dict(m["trivial_baselines"]),
                   dict(m.get("independence", {})))

    @property
    def task_dir(self) -> Path:
        return self.path / "tasks"

    def items(self, set_name: str) -> list[dict]:
        p = self.task_dir / f"{set_name}.jsonl"
        return read_jsonl(p) if p.is_file() else []


# ---- model stages: the models they made ---------------------------------------------------------------
@dataclass(frozen=True)
class Models:
    """A model stage's output (pretrain, sft, dpo): `<run>/<name>/` HF folders and each one's record."""

    stage: str
    key: str
    path: Path
    models: dict[str, dict]  # name -> what the stage recorded (shape, tokens, chat, base, ...)
    init_from: dict | None = None  # the base (or folder) a DAPT specialist continued from (pretrain; sft and dpo
    #                                 of that specialist hand it on)

    @classmethod
    def of(cls, art: Artifact) -> Models:
        m = art.manifest["metrics"]
        # the trained models first, then the controls (`recovered`, `generalist`), each group by name: the
        # same order whether the manifest was just made or read back (written with sorted keys)
        models = dict(sorted(m.get("models", {}).items(), key=lambda kv: (bool(kv[1].get("control")), kv[0])))
        return cls(art.stage, art.key, art.path, models, m.get("init_from"))

    def folder(self, name: str) -> Path:
        return self.path / name


# ---- evaluate: the scores ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """The evaluate stage's output: `results.json` (every model's scores, samples and answers)."""

    path: Path
    config: dict  # evaluate's resolved config
    bench_key: str | None  # the bench run it scored with
    metrics: dict  # the manifest's summary of results.json

    @classmethod
    def of(cls, art: Artifact) -> Evaluation:
        return cls(art.path, dict(art.manifest.get("config") or {}), (art.manifest.get("inputs") or {}).get("bench"),
                   dict(art.manifest["metrics"]))

    @functools.cached_property
    def results(self) -> dict:
        """results.json; a run made before it existed has its scores in the manifest's metrics only."""
        p = self.path / "results.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else self.metrics


# ---- export: the exported folders ----------------------------------------------------------------------
@dataclass(frozen=True)
class Exports:
    """The export stage's output: one self-contained folder per exported model, keyed by export name."""

    path: Path
    exports: dict[str, dict]  # export name -> what export recorded (model, formats, files, ...)

    @classmethod
    def of(cls, art: Artifact) -> Exports:
        return cls(art.path, dict(art.manifest["metrics"].get("exports", {})))

    def folder(self, name: str) -> Path:
        return self.path / name


def read_documents(root: Path, source: str | None = None, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of the Parquet shards under `root/<source>/` (every source when None), in a stable order.

    Ingest writes `data/<source>/`; curate writes `data/<split>/<source>/`, so a split is
    `read_documents(curate.path / "data" / "train", "postgres")`.
    """
    import pyarrow.parquet as pq

    shards = sorted((root / source).glob("*.parquet")) if source else sorted(root.glob("*/*.parquet"))
    for shard in shards:
        yield from pq.read_table(shard, columns=columns).to_pylist()


# ---- model lineage -------------------------------------------------------------------------------------
# Every model the stages make, and the stage that makes it (export, evaluate and the report use these names).
MODELS = {"specialist": "pretrain", "generalist": "pretrain",
          "pruned": "compress", "pruned-kd": "compress", "pruned-lm": "compress", "scratch-kd": "compress",
          "scratch-lm": "compress", "sft": "sft", "sft-rationale": "sft", "dpo": "dpo", "recovered": "pretrain"}
# What a model stage records for each model it makes, in its manifest's metrics.models.<model>: `tokens` it
# trained on and, for a fine-tuned model, the `base` it started from.
MODEL_STAGES = tuple(dict.fromkeys(MODELS.values()))


@dataclass(frozen=True)
class ModelBase:
    """The model another model was trained from: the folder `model` of the artifact `stage:key`."""

    stage: str
    key: str
    model: str

    @classmethod
    def read(cls, value: dict | str | None) -> ModelBase | None:
        """A recorded `base`: {stage, key, model}, or the base model's folder as sft and dpo record it,
        <workdir>/<stage>/<key>/<model> (the store's layout; this is the one place that parses it). None
        when there is no base or it is not a model stage's (sft.base may name any local HF folder)."""
        if isinstance(value, dict):
            return cls(value["stage"], value["key"], value["model"]) if value.get("stage") in MODEL_STAGES else None
        parts = Path(value).parts if value else ()
        if len(parts) < 3 or parts[-3] not in MODEL_STAGES:
            return None
        return cls(parts[-3], parts[-2], parts[-1])


@dataclass(frozen=True)
class TrainedModel:
    """One model of a lineage: where it is, the tokens it was trained on, and its manifest entry."""

    stage: str
    key: str
    model: str
    tokens: int
    meta: dict = field(default_factory=dict)  # the stage's metrics.models.<model>

    @property
    def base(self) -> ModelBase | None:
        return ModelBase.read(self.meta.get("base"))


def model_lineage(store, stage: str, key: str, model: str) -> list[TrainedModel]:
    """The model `stage:key/model` and the models it was trained from, base first, following each recorded
    `base` through the ArtifactStore `store`; the chain stops at a base that is not in the store."""
    from slmforge.errors import UserError

    out: list[TrainedModel] = []
    at: ModelBase | None = ModelBase(stage, key, model)
    seen: set[ModelBase] = set()
    while at is not None and at not in seen:
        seen.add(at)
        try:
            art = store.load(at.stage, at.key)
        except UserError:
            break
        meta = Models.of(art).models.get(at.model)
        if meta is None:
            break
        out.append(TrainedModel(at.stage, at.key, at.model, int(meta.get("tokens") or 0), meta))
        at = out[-1].base
    return out[::-1]


def made_from(store, start: dict[str, str]) -> dict[str, str]:
    """Every stage:key the artifacts `start` ({stage: key}) were made from, themselves included, following the
    manifests' inputs through the ArtifactStore `store`; in pipeline order."""
    from slmforge.errors import UserError
    from slmforge.stages import STAGES  # the stage names only (stages/__init__.py imports nothing)

    found: dict[str, str] = {}
    todo = list(start.items())
    while todo:
        stage, key = todo.pop()
        if stage in found:
            continue
        found[stage] = key
        try:
            todo += list(store.load(stage, key).manifest.get("inputs", {}).items())
        except UserError:
            pass
    return {s: found[s] for s in sorted(found, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))}
