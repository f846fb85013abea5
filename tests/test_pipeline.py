"""The whole data side through the CLI: caching, invalidation, status, resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.conftest import slmforge, small_recipe, write_recipe


def rows(run_dir: Path) -> list[dict]:
    out = []
    for shard in sorted(run_dir.glob("data/*/*/*.parquet")):
        out += pq.read_table(shard).to_pylist()
    return sorted(out, key=lambda r: r["id"])


def stage_dirs(workdir: Path, stage: str) -> list[str]:
    """The run folders of a stage (not its `latest` link)."""
    if not (workdir / stage).exists():
        return []
    return sorted(p.name for p in (workdir / stage).iterdir() if p.is_dir() and not p.is_symlink())


def test_run_cache_invalidate_and_status(tmp_path, small_corpus):
    import shutil

    # a private copy of the corpus: this test edits a file, and other tests' recipes read the shared one
    shared = small_corpus["domain"].parent.parent
    shutil.copytree(shared, tmp_path / "corpus")
    corpus = {k: tmp_path / "corpus" / p.relative_to(shared) for k, p in small_corpus.items()}
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path, small_recipe(corpus, work))
    r = slmforge("run", str(recipe), "--until", "curate")
    assert r.returncode == 0, r.stderr
    assert stage_dirs(work, "tokenizer") == []
    st = slmforge("status", str(recipe))
    assert st.returncode == 0
    assert "done" in st.stderr and "not run" in st.stderr

    r = slmforge("run", str(recipe))
    assert r.returncode == 0, r.stderr
    assert "ran tokenizer" in r.stderr and "cached" in r.stderr

    built = {s: stage_dirs(work, s) for s in ("ingest", "curate", "tokenizer")}
    r = slmforge("run", str(recipe))
    assert r.returncode == 0 and "nothing to do" in r.stderr and "done: ran" not in r.stderr, r.stderr
    assert {s: stage_dirs(work, s) for s in built} == built and not list(work.glob("*/*.partial"))

    # changing only the tokenizer section re-runs the tokenizer, not ingest or curate
    before = {s: stage_dirs(work, s) for s in ("ingest", "curate", "tokenizer")}
    r = slmforge("tokenizer", "--recipe", str(recipe), "--set", "vocab_size=700")
    assert r.returncode == 0, r.stderr
    assert "ran tokenizer" in r.stderr
    after = {s: stage_dirs(work, s) for s in ("ingest", "curate", "tokenizer")}
    assert after["ingest"] == before["ingest"] and after["curate"] == before["curate"]
    assert len(after["tokenizer"]) == 2

    # editing an input file re-runs everything after it
    with open(corpus["general2"], "a") as f:
        f.write('{"id": "extra", "text": "An extra general document about ships, whales and the sea, long enough to be kept by the quality filters of the curation stage. It has several sentences. It is plain prose. Nothing more."}\n')
    st = slmforge("status", str(recipe))
    assert st.stderr.count("not run") == 3


def test_kill_at_any_moment_then_resume(tmp_path, small_corpus):
    clean = tmp_path / "clean"
    rc = write_recipe(tmp_path / "c", small_recipe(small_corpus, clean, tokenizer={"vocab_size": 500}))
    assert slmforge("run", str(rc)).returncode == 0

    killed = tmp_path / "killed"
    rk = write_recipe(tmp_path / "k", small_recipe(small_corpus, killed, tokenizer={"vocab_size": 500}))
    for probe in ("curate/*.partial/work/logs/1-filter", "curate/*.partial/work/logs/3-minhash-signatures"):
        proc = subprocess.Popen([sys.executable, "-m", "slmforge.cli", "run", str(rk)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while not list(killed.glob(probe)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not list(killed.glob("curate/*/manifest.json")), "a killed stage must not look done"
    st = slmforge("status", str(rk))
    assert "incomplete" in st.stderr
    r = slmforge("run", str(rk))
    assert r.returncode == 0, r.stderr
    [c] = [p for p in (clean / "curate").iterdir() if p.is_dir() and not p.is_symlink()]
    [k] = [p for p in (killed / "curate").iterdir() if p.is_dir() and not p.is_symlink()]
    assert c.name == k.name
    assert rows(c) == rows(k) and rows(c)
    tok = lambda w: (next((w / "tokenizer").glob("*/tokenizer/tokenizer.json"))).read_text()
    assert tok(clean) == tok(killed)


def test_a_forced_stage_rebuilds_what_reads_it(tmp_path, monkeypatch):
    """`run --force-stage evaluate` keeps evaluate's key, so report's key does not change either: report
    must be rebuilt all the same (it showed the old scores), while a stage that does not read evaluate
    (export, here reading only dpo) stays cached."""
    from types import SimpleNamespace

    from slmforge import pipeline
    from slmforge.artifacts import Artifact
    from slmforge.config import Recipe

    graph = {"dpo": (), "evaluate": ("dpo",), "report": ("evaluate",), "export": ("dpo",)}
    built: list[tuple[str, bool]] = []

    def module(stage):
        def run(cfg, store, inputs, force):
            built.append((stage, force))
            if force:
                store.last_built = (stage, "k")
            return Artifact(stage=stage, key="k", path=tmp_path / stage, manifest={})
        return SimpleNamespace(run=run)

    monkeypatch.setattr(pipeline, "stage_module", module)
    monkeypatch.setattr(pipeline, "stage_inputs", lambda stage, cfg: graph[stage])
    recipe = Recipe(path=tmp_path / "r.yaml", name="r", workdir=tmp_path / "w", stages={s: None for s in graph})
    pipeline.run_recipe(recipe, force=("evaluate",))
    assert built == [("dpo", False), ("evaluate", True), ("report", True), ("export", False)]
