"""ingest: files, globs or folders of .txt .md .rst .html .jsonl .parquet .pdf -> Document Parquet shards.

A bad file (binary, undecodable, empty, over the size limit, a broken PDF or Parquet, a corrupt
archive) is skipped, counted by reason in the manifest and listed in `rejects.jsonl`; one bad file
never stops the run. Text formats may be gzip-compressed (`.jsonl.gz`, `.txt.gz`, ...).
Output: `data/<source>/part-NNNNN.parquet` with the columns of `records.DOCUMENT_SCHEMA`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from slmforge.artifacts import Artifact, ArtifactStore, hash_file
from slmforge.common import write_jsonl
from slmforge.config import StageConfig, resolve_path
from slmforge.errors import UserError
from slmforge.records import DOCUMENT_SCHEMA, Document

NAME = "ingest"
INPUTS: tuple[str, ...] = ()

FORMATS = {
    ".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "rst",
    ".html": "html", ".htm": "html", ".xhtml": "html", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pdf": "pdf",
}
_GLOB_CHARS = re.compile(r"[*?\[]")


class Source(BaseModel):
    """One named input: a domain corpus, or general text to mix in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="short name: lowercase letters, digits, '-', '_'")
    role: Literal["domain", "general"] = Field("domain", description="domain text, or general text for mixing")
    paths: list[str] = Field(min_length=1, description="files, folders or globs (** recurses), relative to the recipe")
    text_field: str = Field("text", description="JSONL/Parquet: the column holding the text")
    id_field: str = Field("id", description="JSONL/Parquet: the column holding a unique id (else file:line)")
    title_field: str = Field("title", description="JSONL/Parquet: the column holding a title (optional)")
    limit: int | None = Field(None, gt=0, description="read at most this many documents (a quick trial run)")

    _files: list[tuple[Path, str]] = PrivateAttr(default_factory=list)  # (absolute path, id prefix)

    @field_validator("paths")
    @classmethod
    def _paths_exist(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        problems = _expand(paths, info)[1]
        if problems:
            raise ValueError("; ".join(problems))
        return paths

    @model_validator(mode="after")
    def _files_of(self, info: ValidationInfo):
        self._files = _expand(self.paths, info)[0]
        return self

    @property
    def files(self) -> list[tuple[Path, str]]:
        return self._files


class Config(StageConfig):
    """Where the corpus comes from and how much of a file is too much."""

    sources: list[Source] = Field(min_length=1, description="named inputs; at least one with role: domain")
    max_file_mb: float = Field(256.0, gt=0, description="files larger than this are skipped (reason too_large)")
    shard_mb: float = Field(
        4.0, gt=0, description="text per Parquet shard; curate runs one datatrove task per shard, so smaller "
                               "shards spread a small corpus over more workers")

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[Source]) -> list[Source]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dup)}")
        if not any(s.role == "domain" for s in v):
            raise ValueError("at least one source needs role: domain")
        return v


def _expand(paths: list[str], info: ValidationInfo) -> tuple[list[tuple[Path, str]], list[str]]:
    """(files as (absolute path, path relative to the recipe), problems) for a source's `paths`."""
    base = Path((info.context or {}).get("base_dir", "."))
    files: list[tuple[Path, str]] = []
    problems = []
    for i, raw in enumerate(paths):
        p = resolve_path(raw, info)
        if _GLOB_CHARS.search(raw):
            hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True) if _entry(Path(h)))
            if not hits:
                problems.append(f"paths.{i}: {raw!r} matches no file (looked in {p.parent})")
        elif p.is_dir():
            hits = sorted(f for f in p.rglob("*") if _entry(f) and not _hidden(f.relative_to(p)))
            if not hits:
                problems.append(f"paths.{i}: folder {p} holds no file")
        elif p.is_file() or p.is_symlink():
            hits = [p]
        else:
            hits = []
            problems.append(f"paths.{i}: {p} does not exist; fix the path (relative to the recipe file)")
        files += [(h, _rel(h, base)) for h in hits]
    # A file reached twice (a `**` glob through a symlink loop, a folder linked into itself, two paths
    # naming one file) is read once: the first path by sorted order names it.
    seen: set[str] = set()
    unique = []
    for path, rel in files:
        real = os.path.realpath(path)
        if real not in seen or not path.exists():
            seen.add(real)
            unique.append((path, rel))
    return unique, problems


def _entry(path: Path) -> bool:
    """A path ingest reads or rejects: anything but a folder (FIFOs and dangling links get a reject)."""
    return path.is_symlink() or (path.exists() and not path.is_dir())


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _rel(path: Path, base: Path) -> str:
    try:
        return str((path.resolve() if path.exists() else path.absolute()).relative_to(base.resolve()))
    except ValueError:
        return str(path)


def external(cfg: Config) -> dict:
    """Content fingerprints of every input file: edit a file and ingest (and all after it) re-runs. What is
    not a regular file (a FIFO, which would block the hash, or a dangling link) is named, not read."""
    return {src.name: {rel: hash_file(p) if p.is_file() else "not a regular file" for p, rel in src.files}
            for src in cfg.sources}


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    return store.build(NAME, cfg, {}, lambda out: _build(cfg, out), external=external(cfg), force=force)


# ---- readers ------------------------------------------------------------------------------------
class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def file_format(path: Path) -> tuple[str | None, bool]:
    """(format, gzipped) from the file name; format None when unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    return fmt, gz


def _read_bytes(path: Path, gz: bool, limit: int) -> bytes:
    """The file's bytes; a gzipped file is decompressed in a stream and refused as soon as it expands past
    `limit` (max_file_mb), so that a small archive of a huge file (a zip bomb) costs no memory."""
    if not gz:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise Reject("corrupt_archive", str(e)) from None
    if len(data) > limit:
        raise Reject("too_large", f"expands to more than max_file_mb={limit / 2**20:g} MiB")
    return data


def _binary(data: bytes) -> None:
    """A NUL byte anywhere (text never holds one) marks a binary file."""
    at = data.find(b"\x00")
    if at >= 0:
        raise Reject("binary", f"NUL byte at offset {at}")


def _decode(data: bytes) -> str:
    _binary(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Reject("undecodable", f"not UTF-8: {e}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _title_from_text(text: str, fmt: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()]
    if fmt == "markdown":
        for ln in lines:
            if ln.startswith("#"):
                return ln.lstrip("#").strip()
    if fmt == "rst":
        for a, b in zip(lines, lines[1:]):
            if a and b and len(set(b)) == 1 and b[0] in "=-~^*#" and len(b) >= len(a):
                return a
    return next((ln for ln in lines if ln), "")[:200]


def _bad_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_DROP = {"script", "style", "noscript", "nav", "header", "footer", "aside", "form", "svg", "template",
         "iframe", "button", "select", "input", "head"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_BLOCKS = {"p", "div", "section", "article", "main", "body", "html", "blockquote", "dl", "dt", "dd",
           "figure", "figcaption", "address", "details", "summary", "center", "caption"}
_BLOCK_TAGS = set(_HEADINGS) | _BLOCKS | {"pre", "ul", "ol", "table", "br", "li"}  # the rest is inline text


def _norm(s: str) -> str:
    return " ".join(s.split())


def html_to_text(html: bytes | str) -> tuple[str, str]:
    """(title, text) from HTML, keeping headings (as '#'), paragraphs, lists ('- '), tables
    ('a | b' rows) and code (<pre> verbatim); dropping scripts, styles and navigation."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "lxml")
    title = _norm(soup.title.get_text()) if soup.title else ""
    blocks: list[str] = []
    _walk(soup.body or soup, blocks)
    text = "\n\n".join(blocks)
    if not title:
        h1 = soup.find("h1")
        title = _norm(h1.get_text(" ")) if h1 else _title_from_text(text, "text")
    return title, text


def _walk(node, out: list[str]) -> None:
    """Appends the text blocks under `node` to `out`: inline text runs joined into one paragraph, each
    block element its own block. One call per level of nesting, so HTML nested deeper than Python's
    recursion limit raises RecursionError (read_file's too_deep)."""
    from bs4 import Comment, NavigableString, Tag

    buf: list[str] = []

    def flush():
        t = _norm("".join(buf))
        if t:
            out.append(t)
        buf.clear()

    for child in node.children:
        if isinstance(child, Comment):
            continue
        if isinstance(child, NavigableString):
            buf.append(str(child))
            continue
        if not isinstance(child, Tag) or child.name in _DROP:
            continue
        name = child.name
        if name not in _BLOCK_TAGS:
            buf.append(child.get_text())
            continue
        flush()
        if name in _BLOCKS or name == "li":
            _walk(child, out)
            continue
        if name in ("ul", "ol"):
            items = []
            for n, li in enumerate(child.find_all("li", recursive=False), 1):
                sub: list[str] = []
                _walk(li, sub)
                if sub:
                    bullet = f"{n}. " if name == "ol" else "- "
                    items.append(bullet + "\n".join(sub).replace("\n", "\n  "))
            block = "\n".join(items)
        else:
            block = _leaf_block(child)
        if block:
            out.append(block)
    flush()


def _leaf_block(tag) -> str:
    """A heading as '# title', <pre> verbatim, a table as 'a | b' rows ('' for <br> or an empty one)."""
    if tag.name in _HEADINGS:
        t = _norm(tag.get_text(" "))
        return "#" * _HEADINGS[tag.name] + " " + t if t else ""
    if tag.name == "pre":
        code = tag.get_text().strip("\n")
        return code if code.strip() else ""
    if tag.name == "table":
        rows = []
        for tr in tag.find_all("tr"):
            cells = [_norm(td.get_text(" ")) for td in tr.find_all(["td", "th"], recursive=False)]
            if any(cells):
                rows.append(" | ".join(cells))
        return "\n".join(rows)
    return ""


def _pdf_text(data: bytes) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError) as e:
        raise Reject("broken_pdf", f"{type(e).__name__}: {e}") from None
    text = "\n\n".join(p for p in pages if p)
    if not text.strip():
        raise Reject("empty", "no text layer (a scanned PDF needs OCR first)")
    return str(meta_title).strip() or _title_from_text(text, "text"), text


def _records(rows: Iterator[tuple[int, dict]], src: Source, rel: str, fmt: str, counts: Counter, rejects: list):
    for n, rec in rows:
        text = rec.get(src.text_field)
        problem = None if isinstance(text, str) else \
            f"no string field {src.text_field!r} (set text_field in the recipe)"
        if problem is None and ("\x00" in text or _bad_unicode(text)):
            problem = "a NUL character or a lone surrogate in the text"
        if problem:
            counts["bad_record"] += 1
            if len(rejects) < 10000:
                rejects.append({"source": src.name, "path": f"{rel}:{n}", "reason": "bad_record", "detail": problem})
            continue
        if not text.strip():
            counts["empty_record"] += 1
            continue
        rid = rec.get(src.id_field)
        title = rec.get(src.title_field)
        meta = {k: v for k, v in rec.items() if k not in (src.text_field, src.id_field, src.title_field)}
        if "source" in meta:
            meta["origin"] = meta.pop("source")
        meta.update(path=rel, format=fmt, role=src.role)
        yield Document(str(rid) if rid is not None else f"{rel}:{n}", src.name,
                       str(title) if title is not None else "", text, meta)


def read_file(path: Path, rel: str, src: Source, counts: Counter, rejects: list,
              limit: int = 2**62) -> Iterator[Document]:
    """Documents from one file; raises Reject for a file that yields nothing usable."""
    fmt, gz = file_format(path)
    if fmt is None:
        raise Reject("unsupported_type", f"extension {''.join(path.suffixes) or '(none)'} is not one of "
                     f"{', '.join(sorted(FORMATS))}")
    if fmt == "parquet":
        yield from _parquet_documents(path, rel, src, counts, rejects)
        return
    data = _read_bytes(path, gz, limit)
    if not data.strip():
        raise Reject("empty", "the file is empty")
    if fmt == "jsonl":  # line by line: one bad line is one bad record, not a bad file
        yield from _records(_jsonl_rows(data, src, rel, counts, rejects), src, rel, fmt, counts, rejects)
        return
    title, text = _title_and_text(data, fmt)
    if not text.strip():
        raise Reject("empty", "no text after extraction")
    yield Document(f"{src.name}:{rel}", src.name, title, text, {"path": rel, "format": fmt, "role": src.role})


def _title_and_text(data: bytes, fmt: str) -> tuple[str, str]:
    """(title, text) of a whole-file document: PDF, HTML or plain text (text, Markdown, reST)."""
    if fmt == "pdf":
        return _pdf_text(data)
    if fmt == "html":
        _binary(data)
        try:
            return html_to_text(data)
        except RecursionError:
            raise Reject("too_deep", "HTML nested deeper than the parser's recursion limit") from None
    text = _decode(data)
    return _title_from_text(text, fmt), text


def _parquet_documents(path: Path, rel: str, src: Source, counts: Counter, rejects: list) -> Iterator[Document]:
    """A Parquet file's rows as documents, read in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise Reject("corrupt_parquet", str(e)) from None
    if src.text_field not in pf.schema_arrow.names:
        raise Reject("missing_field", f"no column {src.text_field!r} (columns: {pf.schema_arrow.names}); "
                     f"set text_field for source {src.name}")
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            rows = [(n + i, r) for i, r in enumerate(batch.to_pylist())]
            n += len(rows)
            yield from _records(iter(rows), src, rel, "parquet", counts, rejects)
    except (pa.ArrowException, OSError) as e:
        raise Reject("corrupt_parquet", str(e)) from None


def _jsonl_rows(data: bytes, src: Source, rel: str, counts: Counter, rejects: list) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line of a JSON Lines file that holds a JSON object; any other
    non-blank line is a counted bad_record."""
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        rec, detail = None, "not a JSON object"
        try:
            rec = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
        except UnicodeDecodeError:
            detail = "not UTF-8"
        except (json.JSONDecodeError, RecursionError):
            pass
        if not isinstance(rec, dict):
            counts["bad_record"] += 1
            if len(rejects) < 10000:
                rejects.append({"source": src.name, "path": f"{rel}:{n}", "reason": "bad_record", "detail": detail})
            continue
        yield n, rec


# ---- the stage ------------------------------------------------------------------------------------
class _ShardWriter:
    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.rows: list[dict] = []
        self.size = 0
        self.shards = 0

    def add(self, doc: Document) -> None:
        self.rows.append(doc.to_row())
        self.size += len(doc.text)
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.rows, schema=DOCUMENT_SCHEMA)
        pq.write_table(table, self.folder / f"part-{self.shards:05d}.parquet", compression="zstd")
        self.shards += 1
        self.rows, self.size = [], 0


@dataclass
class _Tally:
    """What ingest has counted so far, over every source."""

    max_file_mb: float
    rejects: list[dict] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    seen_ids: set[str] = field(default_factory=set)
    files: int = 0  # files done
    docs: int = 0  # documents written

    @property
    def limit(self) -> int:
        """max_file_mb, in bytes."""
        return int(self.max_file_mb * 2**20)


def _build(cfg: Config, out: Path) -> dict:
    from slmforge.console import progress

    tally = _Tally(cfg.max_file_mb)
    per_source: dict[str, dict] = {}
    total_bytes = sum(p.stat().st_size for src in cfg.sources for p, _ in src.files if p.is_file())
    nfiles = sum(len(src.files) for src in cfg.sources)
    with progress("ingest", total_bytes, "bytes") as bar:
        bar.update(items=f"0/{nfiles} files")
        for src in cfg.sources:
            writer = _ShardWriter(out / "data" / src.name, int(cfg.shard_mb * 2**20))
            stats = Counter()
            for path, rel in src.files:
                if src.limit and stats["docs"] >= src.limit:
                    break
                size = _ingest_file(path, rel, src, writer, stats, tally)
                bar.update(advance=size, items=f"{tally.files}/{nfiles} files, {tally.docs} docs")
            writer.flush()
            per_source[src.name] = {"role": src.role, "shards": writer.shards, **dict(stats)}
    write_jsonl(out / "rejects.jsonl", tally.rejects)
    empty = [name for name, s in per_source.items() if not s.get("docs")]
    if empty:
        examples = "\n    ".join(f"{r['path']}: {r['reason']} ({r['detail']})" for r in tally.rejects[:5])
        raise UserError(
            f"ingest: source(s) {', '.join(empty)} gave no documents. "
            f"Check ingest.sources paths and formats.\n    {examples}"
        )
    return {
        "sources": per_source,
        "docs": sum(s["docs"] for s in per_source.values()),
        "chars": sum(s.get("chars", 0) for s in per_source.values()),
        "files_rejected": sum(s.get("files_rejected", 0) for s in per_source.values()),
        "rejects_by_reason": dict(tally.reasons),
    }


def _ingest_file(path: Path, rel: str, src: Source, writer: _ShardWriter, stats: Counter, tally: _Tally) -> int:
    """One file's documents into `writer`, counted in `stats` (its source's) and `tally`; a file that gives
    no document, or fails in any way, is a counted reject. Returns the file's size in bytes."""
    size = path.stat().st_size if path.is_file() else 0
    counts: Counter = Counter()
    ndocs = 0
    try:
        _check_file(path, size, tally)
        for doc in read_file(path, rel, src, counts, tally.rejects, tally.limit):
            if src.limit and stats["docs"] + ndocs >= src.limit:
                break
            doc.id = _unique_id(doc.id, tally.seen_ids, counts)
            writer.add(doc)
            ndocs += 1
            stats["chars"] += len(doc.text)
        if ndocs == 0 and not counts:
            raise Reject("empty", "no documents in the file")
        if ndocs == 0:
            raise Reject("no_usable_records", ", ".join(f"{v} {k}" for k, v in counts.items()))
    except Exception as e:  # noqa: BLE001 (one hostile file never stops the corpus: a reader's own
        r = e if isinstance(e, Reject) else Reject(  # failure is a counted reject too)
            "unreadable", f"{type(e).__name__}: {str(e)[:200]}")
        tally.reasons[r.reason] += 1
        stats["files_rejected"] += 1
        tally.rejects.append({"source": src.name, "path": rel, "reason": r.reason, "detail": r.detail})
    else:
        stats["files"] += 1
    tally.reasons.update({f"record:{k}": v for k, v in counts.items()})
    stats["docs"] += ndocs
    stats["bytes_in"] += size
    tally.files += 1
    tally.docs += ndocs
    return size


def _check_file(path: Path, size: int, tally: _Tally) -> None:
    """Reject what is not a regular file, is over max_file_mb, or is empty, before reading it."""
    if not path.is_file():
        raise Reject("not_a_file", "a dangling symbolic link" if path.is_symlink() and not
                     path.exists() else "not a regular file (a FIFO, socket or device)")
    if size > tally.limit:
        raise Reject("too_large", f"{size / 2**20:.1f} MiB > max_file_mb={tally.max_file_mb}")
    if size == 0:
        raise Reject("empty", "the file is empty")


def _unique_id(doc_id: str, seen: set[str], counts: Counter) -> str:
    """`doc_id`, or `doc_id#2`, `#3`, ... when an earlier document has it (counted as renamed_duplicate_id)."""
    if doc_id in seen:
        counts["renamed_duplicate_id"] += 1
        n = 2
        while f"{doc_id}#{n}" in seen:
            n += 1
        doc_id = f"{doc_id}#{n}"
    seen.add(doc_id)
    return doc_id
