"""What each curate quality filter drops: datatrove's web-text defaults versus slmforge's tuned defaults.

Every document is read with slmforge's ingest reader (the PostgreSQL manual by default, or --data:
any file, folder or glob ingest accepts) and given, independently (not chained), to each of:

  gopher_repetition  GopherRepetitionFilter()   vs  GopherRepetitionFilter(**curate defaults)
  gopher_quality     GopherQualityFilter()      vs  GopherQualityFilter(**curate defaults)
  c4                 C4QualityFilter()          vs  curate's C4 document-rules wrapper, with the
                                                    fixed settings curate._build passes it

through `.filter(Document)`, and drops are counted by reason. It also counts how many documents with
a code-like block (a line starting with an SQL verb, or a ' | ' table row) pass all three filters under
each setting. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/curate_filters.py                   # the full manual
    .venv/bin/python benchmarks/curate_filters.py --limit-docs 60   # a quick check
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "postgresql_docs.jsonl.gz"
FILTERS = ("gopher_repetition", "gopher_quality", "c4")
SETTINGS = ("datatrove", "slmforge")
CODE_LIKE = re.compile(r"^\s*(SELECT|CREATE|INSERT|UPDATE|DELETE|ALTER|DROP)\b|^.* \| .*$", re.MULTILINE)


def load_docs(paths: list[str], text_field: str, limit: int | None) -> list[tuple[str, str]]:
    """(id, text) of each document, read as ingest reads it; unreadable files are skipped."""
    from slmforge.stages.ingest import Reject, Source, read_file

    src = Source.model_validate({"name": "bench", "paths": paths, "text_field": text_field})
    docs: list[tuple[str, str]] = []
    for path, rel in src.files:
        try:
            for doc in read_file(path, rel, src, Counter(), []):
                docs.append((doc.id, doc.text))
                if limit and len(docs) >= limit:
                    return docs
        except Reject as r:
            print(f"skipped {rel}: {r.reason} ({r.detail})", file=sys.stderr)
    return docs


def build_filters() -> dict[str, dict]:
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from slmforge.curation.steps import C4DocumentRules
    from slmforge.stages import curate

    cfg = curate.Config()
    rep = cfg.gopher_repetition.kwargs()
    rep = {**rep, "top_n_grams": tuple(map(tuple, rep["top_n_grams"])),
           "dup_n_grams": tuple(map(tuple, rep["dup_n_grams"]))}
    return {
        "datatrove": {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
                      "c4": C4QualityFilter()},
        "slmforge": {
            "gopher_repetition": GopherRepetitionFilter(**rep),
            "gopher_quality": GopherQualityFilter(**cfg.gopher_quality.kwargs()),
            # the same fixed settings as in curate._build
            "c4": C4DocumentRules(split_paragraph=True, remove_citations=False,
                                  filter_no_terminal_punct=False, min_words_per_line=-1,
                                  filter_javascript=False, filter_policy=False, **cfg.c4.kwargs()),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=[str(DEFAULT_DATA)], metavar="PATH",
                    help="files, folders or globs, as in a recipe (default: the PostgreSQL manual)")
    ap.add_argument("--text-field", default="text", help="JSONL/Parquet: the column holding the text")
    ap.add_argument("--limit-docs", type=int, default=None, metavar="N",
                    help="use only the first N documents")
    args = ap.parse_args()

    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import get_filter_result

    from slmforge.curation import quiet_logger

    t0 = time.perf_counter()
    quiet_logger()  # datatrove logs at INFO through loguru
    docs = load_docs([str(Path(p).resolve()) for p in args.data], args.text_field, args.limit_docs)
    filters = build_filters()
    drops = {s: {f: Counter() for f in FILTERS} for s in SETTINGS}
    survive_all, code_survive = Counter(), Counter()
    code_docs = 0
    for doc_id, text in docs:
        code = bool(CODE_LIKE.search(text))
        code_docs += code
        for s in SETTINGS:
            kept_all = True
            for f in FILTERS:  # a fresh Document each time: C4QualityFilter rewrites doc.text
                keep, reason = get_filter_result(filters[s][f].filter(Document(text=text, id=doc_id)))
                if not keep:
                    drops[s][f][reason or "(no reason)"] += 1
                    kept_all = False
            survive_all[s] += kept_all
            code_survive[s] += kept_all and code

    n = len(docs)
    pct = lambda k, of=n: f"{k:5d} {k / max(of, 1):6.1%}"  # noqa: E731
    rows = [("filter", "reason", "datatrove default", "slmforge", "of N docs")]
    for f in FILTERS:
        dt, sf = drops["datatrove"][f], drops["slmforge"][f]
        for reason in sorted(set(dt) | set(sf)):
            rows.append((f, reason, pct(dt[reason]), pct(sf[reason]), str(n)))
        rows.append((f, "(all reasons)", pct(sum(dt.values())), pct(sum(sf.values())), str(n)))
    rows.append(("all three", "kept", pct(survive_all["datatrove"]), pct(survive_all["slmforge"]), str(n)))
    rows.append(("all three", "code-like docs kept", pct(code_survive["datatrove"], code_docs),
                 pct(code_survive["slmforge"], code_docs), str(code_docs)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    print(json.dumps({
        "data": args.data, "docs": n, "code_like_docs": code_docs,
        "dropped": {s: {f: {"total": sum(drops[s][f].values()), "by_reason": dict(drops[s][f])}
                        for f in FILTERS} for s in SETTINGS},
        "kept_by_all": dict(survive_all), "code_like_kept_by_all": dict(code_survive),
        "time_s": round(time.perf_counter() - t0, 2), "command": shlex.join([sys.executable, *sys.argv]),
    }))


if __name__ == "__main__":
    main()
