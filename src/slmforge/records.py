"""The contracts between stages. Documents travel as Parquet rows with exactly these columns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

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


def read_documents(root: Path, source: str | None = None, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of the Parquet shards under `root/<source>/` (every source when None), in a stable order.

    Ingest writes `data/<source>/`; curate writes `data/<split>/<source>/`, so a split is
    `read_documents(curate.path / "data" / "train", "postgres")`.
    """
    import pyarrow.parquet as pq

    shards = sorted((root / source).glob("*.parquet")) if source else sorted(root.glob("*/*.parquet"))
    for shard in shards:
        yield from pq.read_table(shard, columns=columns).to_pylist()
