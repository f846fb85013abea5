"""Small rules every layer shares: JSON Lines files, the name rule for exported models, cutting text at a word."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

# An exported model's, a catalog entry's and a base's name: what a URL path, a file name and llama.cpp accept.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
NAME_RULE = "1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSON Lines file (blank lines skipped)."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def jsonl_line(row: dict) -> str:
    """One row as a JSON Lines line (UTF-8 kept as it is), for files appended to row by row."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """All rows, written to a temporary file and renamed into place: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(jsonl_line(r) for r in rows)
    os.replace(tmp, path)


def cut_at_word(text: str, chars: int) -> str:
    """`text` at most `chars` long, cut at the last space when one falls in the second half, else at `chars`."""
    if len(text) <= chars:
        return text
    cut = text[:chars]
    space = cut.rfind(" ")
    return cut[:space] if space >= chars // 2 else cut
