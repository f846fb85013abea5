"""curate: a datatrove pipeline over the ingested documents.

Quality filters (Gopher repetition, Gopher quality, C4's document rules) with thresholds tuned for
technical documentation, PII redaction, exact dedup and MinHash near-dedup (datatrove's blocks,
run by datatrove's local, Ray or Slurm executor: slmforge.curation), then a deterministic
train/val/test split by a hash of each id.
Output: `data/<split>/<source>/*.parquet` (records.DOCUMENT_SCHEMA), `audit/<step>.jsonl` (a sample
of what each step dropped, for review), and per-step drop counts in the manifest.

For corpora too big for one machine, `executor: ray` or `executor: slurm` runs the same blocks on a
cluster, with the same output (README: "Scale-out").
"""

from __future__ import annotations

import contextlib
import gzip
import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmforge import curation
from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.common import write_jsonl
from slmforge.config import RecipePath, StageConfig
from slmforge.console import info
from slmforge.curation import split_of  # noqa: F401 (curate.split_of: the split of one id)
from slmforge.errors import UserError
from slmforge.records import DOCUMENT_SCHEMA, Ingested

NAME = "curate"
INPUTS = ("ingest",)
SPLITS = ("train", "val", "test")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="run this step")

    def kwargs(self) -> dict:
        return self.model_dump(exclude={"enabled"})


# Defaults below were measured on the PostgreSQL manual (1138 pages): datatrove's web-text defaults
# drop 11% (repetition), 27% (quality) and 20% (C4) of it, mostly reference pages with code, option
# tables and SQL synopses. `python benchmarks/curate_filters.py` prints both columns per reason.
class GopherRepetition(_Section):
    """Gopher (Rae et al. 2021) repetition rules. Reference pages repeat option names and table rows, so
    the n-gram limits are looser than for web text; pages that repeat whole lines are still dropped."""

    dup_line_frac: float = Field(0.4, description="max share of lines that are duplicates (web: 0.3)")
    dup_para_frac: float = Field(0.4, description="max share of paragraphs that are duplicates (web: 0.3)")
    dup_line_char_frac: float = Field(0.3, description="max share of characters in duplicate lines (web: 0.2)")
    dup_para_char_frac: float = Field(0.3, description="max share of characters in duplicate paragraphs (web: 0.2)")
    top_n_grams: list[tuple[int, float]] = Field(
        [(2, 0.3), (3, 0.27), (4, 0.24)], description="(n, max share of chars in the most frequent n-gram)")
    dup_n_grams: list[tuple[int, float]] = Field(
        [(5, 0.35), (6, 0.33), (7, 0.31), (8, 0.29), (9, 0.27), (10, 0.25)],
        description="(n, max share of chars in duplicated n-grams) (web: 0.15 .. 0.10)")


class GopherQuality(_Section):
    """Gopher quality rules. Code and tables are full of words without letters ('(', '|', '1'), so the
    share of alphabetic words may be lower than on web text, and short reference pages are kept."""

    min_doc_words: int | None = Field(20, description="fewer words: dropped (web: 50)")
    max_doc_words: int | None = Field(100000, description="more words: dropped")
    min_avg_word_length: int | None = Field(3, description="shorter mean word length: dropped")
    max_avg_word_length: int | None = Field(12, description="longer mean word length: dropped (web: 10)")
    max_symbol_word_ratio: float | None = Field(0.1, description="max '#' or '...' per word")
    max_bullet_lines_ratio: float | None = Field(0.9, description="max share of lines starting with a bullet")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="max share of lines ending in '...'")
    max_non_alpha_words_ratio: float | None = Field(
        0.5, description="min share of words with a letter (datatrove's name for it; web: 0.8)")
    min_stop_words: int | None = Field(2, description="fewer English stop words: dropped")


class C4Rules(_Section):
    """C4's document-level rules (Raffel et al. 2020). C4's line rules (terminal punctuation, words per
    line, citations like [1], lines with '{') would delete code and table lines, so they are off and
    the text is never rewritten: this step only keeps or drops whole documents."""

    min_num_sentences: int = Field(3, description="fewer sentences: dropped (web: 5); -1 disables")
    max_word_length: int = Field(1000, description="documents are kept; used for the sentence count only")
    filter_lorem_ipsum: bool = Field(True, description="drop documents containing 'lorem ipsum'")
    filter_curly_bracket: bool = Field(False, description="drop documents with '{' (web: true; kills code)")


class PII(BaseModel):
    """What to redact. Replacements are realistic placeholders (example.com addresses, documentation IPs,
    555 phone numbers) so the model still sees well-formed text."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    emails: bool = Field(True, description="e-mail addresses")
    ips: bool = Field(True, description="public IPv4 addresses (private and documentation ranges are kept)")
    phones: bool = Field(True, description="phone numbers in common formats")
    secrets: bool = Field(True, description="API keys and tokens (AWS, GitHub, OpenAI, Slack, Google, JWT, private keys, key=... assignments)")


class MinHash(_Section):
    """Near-duplicate removal (datatrove MinHash LSH). 14 buckets x 8 hashes over 5-grams finds pairs with
    Jaccard similarity 0.8 with probability 0.92 (datatrove's defaults, as in FineWeb)."""

    n_grams: int = Field(5, ge=1)
    num_buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)


class Ray(BaseModel):
    """executor: ray. Every node needs this slmforge installed and the workdir on a shared filesystem."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str | None = Field(None, description="a running cluster (auto, or ray://HOST:10001); none: start a "
                                                  "Ray instance on this machine with `workers` CPUs")
    cpus_per_task: int = Field(1, ge=1, description="CPUs Ray reserves per datatrove task")
    mem_per_cpu_gb: float = Field(2, gt=0, description="memory Ray reserves per CPU of a task")


class Slurm(BaseModel):
    """executor: slurm. Run curate on a login node: it submits one job array per step (each after the one
    before) and waits. The workdir must be on a filesystem the compute nodes share."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    partition: str | None = Field(None, description="sbatch --partition (required)")
    time: str = Field("4:00:00", description="sbatch --time of each job array")
    cpus_per_task: int = Field(1, ge=1, description="sbatch --cpus-per-task")
    mem_per_cpu_gb: float = Field(2, gt=0, description="sbatch --mem-per-cpu, in GB")
    qos: str | None = Field(None, description="sbatch --qos")
    job_name: str = Field("slmforge-curate", description="job names are this, then -<step>")
    logs: RecipePath | None = Field(None, description="folder for Slurm's own job logs, relative to the recipe "
                                                      "(default: the run's work/logs/<step>/slurm_logs)")
    env_command: str | None = Field(None, description="shell line each job runs first (default: activate this "
                                                      "virtual environment)")
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="more sbatch options, e.g. {account: "
                                                                          "proj1}")
    mail_type: str = Field("NONE", description="sbatch --mail-type (with mail_user)")
    mail_user: str | None = Field(None, description="sbatch --mail-user")
    submit: bool = Field(True, description="false: write the job scripts and stop, without submitting (to review)")
    poll_s: float = Field(30, gt=0, description="seconds between squeue checks while waiting")


class Config(StageConfig):
    """Filters, dedup, PII and the split. Each filter section can be turned off with `enabled: false`.
    Where it runs (executor, ray, slurm, workers) is not part of the cache key: the output is the same."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"workers", "executor", "ray", "slurm"})

    gopher_repetition: GopherRepetition = Field(default_factory=GopherRepetition)
    gopher_quality: GopherQuality = Field(default_factory=GopherQuality)
    c4: C4Rules = Field(default_factory=C4Rules)
    pii: PII = Field(default_factory=PII)
    exact_dedup: bool = Field(True, description="drop documents whose text is identical to another's")
    minhash: MinHash = Field(default_factory=MinHash)
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents (by id hash) for validation")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents (by id hash) for test")
    split_salt: str = Field("slmforge", description="changes which documents land in which split")
    audit_sample: int = Field(20, ge=0, description="dropped documents kept per step for review")
    workers: int = Field(2, ge=1, description="datatrove tasks at once: local worker processes, Ray tasks, or the "
                                              "Slurm job arrays' limit")
    executor: Literal["local", "ray", "slurm"] = Field("local", description="where datatrove runs: this machine's "
                                                                             "processes, a Ray cluster, or Slurm")
    ray: Ray = Field(default_factory=Ray)
    slurm: Slurm = Field(default_factory=Slurm)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 so that train is not empty")
        if self.executor == "slurm" and not self.slurm.partition:
            raise ValueError("executor: slurm needs slurm.partition (the sbatch partition to submit to)")
        return self


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {"ingest": store.resolve("ingest:latest")}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs["ingest"], out), resumable=True, force=force)


def _build(cfg: Config, ingest: Artifact, out: Path) -> dict:
    ingested = Ingested.of(ingest)
    work = out / "work"
    with curation.quiet_datatrove():
        _run_jobs(cfg, _jobs(cfg, ingested.path / "data", out), ingested, work)
    metrics = _collect(cfg, work, out)
    if (work / "rejected").exists():  # gone only if a resumed run already sampled it and cleaned up
        _audit(work / "rejected", out / "audit", cfg.audit_sample)
    for sub in ("filtered", "exact_sigs", "exact_dups", "mh_sigs", "mh_buckets", "mh_remove", "rejected"):
        shutil.rmtree(work / sub, ignore_errors=True)
    metrics["splits"] = _split_counts(out / "data")
    metrics["roles"] = ingested.roles
    empty = [s for s in ingested.sources if not metrics["splits"].get(s, {}).get("train", {}).get("docs")]
    if empty:
        raise UserError(
            f"curate: no training documents left for source(s) {', '.join(empty)}. See {out / 'audit'} for what "
            f"was dropped and loosen the curate thresholds in the recipe (drop counts: {metrics['filters']})")
    metrics["warnings"] = [f"source {s}: the {k} split is empty; raise curate.{k}_fraction"
                           for s, per in metrics["splits"].items() for k in ("val", "test") if not per[k]["docs"]]
    for w in metrics["warnings"]:
        info(f"[yellow]warning[/]: {w}")
    _print_summary(metrics)
    return metrics


# ---- the datatrove jobs: each a list of pipeline steps, run over `tasks` ranks -------------------------
def _jobs(cfg: Config, data: Path, out: Path) -> list:
    """curate's jobs in order (slmforge.curation.Job): filter, exact-dedup find, the three MinHash jobs
    and the split, each job a datatrove pipeline. Steps that read documents run one task per ingest shard."""
    tasks = max(1, len(list(data.glob("*/*.parquet"))))
    work = out / "work"
    jobs = [curation.Job("1-filter", _filter_steps(cfg, data, work), tasks)]
    if cfg.exact_dedup:
        jobs.append(curation.Job("2-exact-find", _exact_find_steps(work), 1))
    if cfg.minhash.enabled:
        jobs += _minhash_jobs(cfg, work, tasks)
    jobs.append(curation.Job("6-split", _split_steps(cfg, work, out), tasks))
    return jobs


def _reader(folder: Path):
    from datatrove.pipeline.readers import ParquetReader

    return ParquetReader(str(folder), glob_pattern="**/*.parquet")


def _excluded(work: Path, step: str):
    """Where a filter writes what it dropped (sampled into audit/ at the end)."""
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(work / "rejected" / step), output_filename="${rank}.jsonl.gz")


def _parquet(folder: Path, filename: str):
    from datatrove.pipeline.writers import ParquetWriter

    from slmforge.curation.steps import row_adapter

    return ParquetWriter(str(folder), output_filename=filename, adapter=row_adapter, schema=DOCUMENT_SCHEMA,
                         compression="zstd")


def _exact_config():
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig

    from slmforge.curation.steps import doc_bytes

    return ExactDedupConfig(content_getter=doc_bytes)


def _filter_steps(cfg: Config, data: Path, work: Path) -> list:
    """Job 1: the quality filters and PII redaction, written once to work/filtered; exact-dedup signatures
    computed on the way out."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupSignature

    from slmforge.curation.steps import CountProgress, RedactPII

    # a document counter for the bar on the local executor (a cluster's bar counts tasks)
    steps = [_reader(data)] + ([CountProgress()] if cfg.executor == "local" else [])
    steps += _quality_filters(cfg, work)
    steps += [RedactPII(cfg.pii), _parquet(work / "filtered", "${rank}.parquet")]
    if cfg.exact_dedup:
        steps.append(ExactDedupSignature(str(work / "exact_sigs"), config=_exact_config()))
    return steps


def _quality_filters(cfg: Config, work: Path) -> list:
    """The enabled quality filters, each writing what it drops; C4's rules with fixed settings that keep
    code and tables (see C4Rules)."""
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    from slmforge.curation.steps import C4DocumentRules

    steps: list = []
    if cfg.gopher_repetition.enabled:
        kw = cfg.gopher_repetition.kwargs()
        kw = {**kw, "top_n_grams": tuple(map(tuple, kw["top_n_grams"])), "dup_n_grams": tuple(map(tuple, kw["dup_n_grams"]))}
        steps.append(GopherRepetitionFilter(**kw, exclusion_writer=_excluded(work, "gopher_repetition")))
    if cfg.gopher_quality.enabled:
        steps.append(GopherQualityFilter(**cfg.gopher_quality.kwargs(),
                                         exclusion_writer=_excluded(work, "gopher_quality")))
    if cfg.c4.enabled:
        steps.append(C4DocumentRules(
            exclusion_writer=_excluded(work, "c4"), split_paragraph=True, remove_citations=False,
            filter_no_terminal_punct=False, min_words_per_line=-1, filter_javascript=False, filter_policy=False,
            **cfg.c4.kwargs()))
    return steps


def _exact_find_steps(work: Path) -> list:
    """Job 2: the exact duplicates, from every task's signatures."""
    from datatrove.pipeline.dedup.exact_dedup import ExactFindDedups

    return [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=_exact_config())]


def _deduped(cfg: Config, work: Path) -> list:
    """The filtered documents, exact duplicates dropped: how jobs 3 and 6 start."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter

    steps = [_reader(work / "filtered")]
    if cfg.exact_dedup:
        steps.append(ExactDedupFilter(str(work / "exact_dups"), config=_exact_config(),
                                      exclusion_writer=_excluded(work, "exact_dedup")))
    return steps


def _minhash_jobs(cfg: Config, work: Path, tasks: int) -> list:
    """Jobs 3-5: near duplicates (MinHash LSH): signatures, then one task per bucket, then the clusters."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )

    mh = MinhashConfig(**cfg.minhash.kwargs())
    signatures = _deduped(cfg, work) + [MinhashDedupSignature(str(work / "mh_sigs"), config=mh)]
    buckets = [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=mh)]
    clusters = [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=mh)]
    return [curation.Job("3-minhash-signatures", signatures, tasks),
            curation.Job("4-minhash-buckets", buckets, mh.num_buckets),
            curation.Job("5-minhash-cluster", clusters, 1)]


def _split_steps(cfg: Config, work: Path, out: Path) -> list:
    """Job 6: the deduplicated documents, near duplicates dropped, split by id and written to data/."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter

    from slmforge.curation.steps import AssignSplit

    steps = _deduped(cfg, work)
    if cfg.minhash.enabled:
        steps.append(MinhashDedupFilter(str(work / "mh_remove"), exclusion_writer=_excluded(work, "minhash")))
    return steps + [AssignSplit(cfg.val_fraction, cfg.test_fraction, cfg.split_salt),
                    _parquet(out / "data", "${split}/${source}/part-${rank}.parquet")]


def _run_jobs(cfg: Config, jobs: list, ingested: Ingested, work: Path) -> None:
    """The jobs one after another on the configured executor; on this machine, the filter job with a
    progress bar of documents."""
    logs = work / "logs"
    if cfg.executor == "local":
        with _progress_bar(ingested.sources, jobs[0].tasks, cfg.workers):
            curation.run_local(jobs[:1], logs, cfg.workers)
        curation.run_local(jobs[1:], logs, cfg.workers)
    elif cfg.executor == "ray":
        curation.run_ray(jobs, logs, cfg.workers, cfg.ray)
    else:
        curation.run_slurm(jobs, logs, cfg.workers, cfg.slurm, work / "slurm_jobs.json")


def _split_counts(data: Path) -> dict[str, dict]:
    """Documents and characters per source and split, read back from what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits: dict[str, dict] = {}
    for shard in sorted(data.glob("*/*/*.parquet")):
        split, source = shard.parent.parent.name, shard.parent.name
        t = pq.read_table(shard, columns=["text"])
        s = splits.setdefault(source, {k: {"docs": 0, "chars": 0} for k in SPLITS})[split]
        s["docs"] += t.num_rows
        s["chars"] += int(pa.compute.sum(pa.compute.utf8_length(t["text"])).as_py() or 0)
    return splits


@contextlib.contextmanager
def _progress_bar(sources: dict[str, dict], tasks: int, workers: int):
    """Documents, MB/s and ETA of the filter step, polled from the counters the workers update (set
    here, before datatrove forks them). `sources`: what ingest counted of each source."""
    import multiprocessing as mp

    from slmforge.console import progress
    from slmforge.curation.steps import SHARED

    SHARED.update(docs=mp.Value("q", 0), chars=mp.Value("q", 0))

    total_docs = sum(s["docs"] for s in sources.values())
    total_chars = sum(s.get("chars", 0) for s in sources.values())
    with progress(f"curate · filter ({tasks} tasks, {workers} workers)", total_chars, "chars") as bar:
        bar.update(items=f"0/{total_docs} docs")
        with curation.polling(lambda: bar.update(completed=SHARED["chars"].value,
                                                 items=f"{SHARED['docs'].value}/{total_docs} docs"), 0.5):
            yield


def _collect(cfg: Config, work: Path, out: Path) -> dict:
    """Per-step counts from datatrove's stats.json files."""
    filters: dict[str, dict] = {}
    pii: Counter = Counter()
    docs_in = None
    step_names = {"GopherRepetitionFilter": "gopher_repetition", "GopherQualityFilter": "gopher_quality",
                  "C4DocumentRules": "c4", "ExactDedupFilter": "exact_dedup", "MinhashDedupFilter": "minhash"}
    for stats_file in sorted((work / "logs").glob("*/stats.json")):
        for step in json.loads(stats_file.read_text()):
            name, stats = step.get("name", ""), step.get("stats", {})
            val = {k: (v.get("total", 0) if isinstance(v, dict) else v) for k, v in stats.items()}
            if stats_file.parent.name == "1-filter" and "documents" in val and docs_in is None and "READER" in name.upper():
                docs_in = val["documents"]
            if "PII" in name:
                pii.update({k.removeprefix("redacted_"): v for k, v in val.items() if k.startswith("redacted_")})
            for cls, short in step_names.items():
                if _matches(name, cls) and (short not in filters or stats_file.parent.name in ("1-filter", "6-split")):
                    dropped = {k.removeprefix("dropped_"): v for k, v in val.items() if k.startswith("dropped_")}
                    filters[short] = {"seen": val.get("total", 0), "dropped": val.get("dropped", 0), "by_reason": dropped}
    return {"docs_in": docs_in, "filters": filters, "pii_redacted": dict(pii)}


_DISPLAY = {"GopherRepetitionFilter": "repetition", "GopherQualityFilter": "gopher qual",
            "C4DocumentRules": "C4 document", "ExactDedupFilter": "exact-deduplication stage 3",
            "MinhashDedupFilter": "minhash stage 4"}


def _matches(step_name: str, cls: str) -> bool:
    return _DISPLAY[cls].lower() in step_name.lower()


def _audit(rejected: Path, audit: Path, per_step: int) -> None:
    """Keep a reproducible random sample of each step's dropped documents."""
    audit.mkdir(parents=True, exist_ok=True)
    for step_dir in sorted(p for p in rejected.glob("*") if p.is_dir()):
        docs = []
        for f in sorted(step_dir.glob("*.jsonl.gz")):
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                docs += [json.loads(line) for line in fh]
        random.Random(0).shuffle(docs)
        write_jsonl(audit / f"{step_dir.name}.jsonl", (_audit_row(d) for d in docs[:per_step]))


def _audit_row(d: dict) -> dict:
    md = d.get("metadata", {})
    return {"id": d.get("id"), "source": md.get("source"), "title": md.get("title"),
            "reason": md.get("filter_reason"), "text": d.get("text", "")[:4000]}


def _print_summary(m: dict) -> None:
    from rich.table import Table

    from slmforge.console import console

    t = Table(title="curate: what each step dropped")
    for col in ("step", "seen", "dropped", "top reasons"):
        t.add_column(col)
    for step, s in m["filters"].items():
        top = ", ".join(f"{k} {v}" for k, v in sorted(s["by_reason"].items(), key=lambda kv: -kv[1])[:3])
        t.add_row(step, str(s["seen"]), str(s["dropped"]), top)
    console.print(t)
    if m["pii_redacted"]:
        console.print("PII redacted: " + ", ".join(f"{k} {v}" for k, v in m["pii_redacted"].items()))
