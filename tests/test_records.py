"""The typed readers of what one stage hands the next (records.py), on hand-made artifacts."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from slmforge.artifacts import Artifact
from slmforge.records import DOCUMENT_SCHEMA, Benchmarks, Curated, Document, Models, Synthesized, set_of


def _art(stage, path, metrics, config=None) -> Artifact:
    return Artifact(stage, "k1", path, {"metrics": metrics, "config": config or {}})


def test_curated_roles_splits_and_documents(tmp_path):
    for split, source, text in [("train", "pg", "VACUUM reclaims."), ("test", "pg", "ANALYZE counts."),
                                ("train", "books", "Call me Ishmael.")]:
        d = tmp_path / "data" / split / source
        d.mkdir(parents=True)
        rows = [Document(f"{source}-{split}", source, "t", text).to_row()]
        pq.write_table(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), d / "part-00000.parquet")
    c = Curated.of(_art("curate", tmp_path, {"roles": {"pg": "domain", "books": "general"}}))
    assert c.domain == ["pg"] and c.general == ["books"]
    assert [r["text"] for r in c.documents("train", "pg")] == ["VACUUM reclaims."]
    assert sorted(r["id"] for r in c.documents("train", columns=["id"])) == ["books-train", "pg-train"]
    assert list(c.documents("test", "books")) == []


def test_benchmarks_are_keyed_by_set_name_whatever_the_prefix(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "qa.jsonl").write_text(json.dumps({"id": "qa-00000", "answer": "VACUUM"}) + "\n")
    m = {"tasks": ["my_org_mcq", "my_org_qa"], "dev_tasks": {"mcq": "my_org_mcq_dev"}, "sizes": {"mcq": 8, "qa": 1},
         "dev_sizes": {"mcq": 4}, "headline": {"mcq": "acc"}, "trivial_baselines": {"mcq": {"chance": 0.25}}}
    b = Benchmarks.of(_art("bench", tmp_path, m))
    assert b.tasks == {"mcq": "my_org_mcq", "qa": "my_org_qa"} and b.dev_tasks["mcq"] == "my_org_mcq_dev"
    assert set_of("my_org_summarization") == "summarization"
    assert b.items("qa") == [{"id": "qa-00000", "answer": "VACUUM"}] and b.items("mcq") == []
    assert b.task_dir == tmp_path / "tasks" and b.baselines["mcq"]["chance"] == 0.25


def test_synthesized_items_and_models(tmp_path):
    items = [{"id": "a", "kind": "qa"}, {"id": "b", "kind": "mcq"}, {"id": "c", "kind": "qa"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items) + "\n")
    s = Synthesized.of(_art("synth", tmp_path, {}, {"chunk_chars": 900}))
    assert s.chunk_chars == 900 and [i["id"] for i in s.of_kinds({"qa"})] == ["a", "c"] and len(s.items) == 3
    m = Models.of(_art("sft", tmp_path, {"models": {"sft": {"chat": True}}}))
    assert m.folder("sft") == tmp_path / "sft" and m.models["sft"]["chat"] and (m.stage, m.key) == ("sft", "k1")
