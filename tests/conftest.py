"""Tiny, hermetic fixtures: small slices of the shipped corpus and generated files; no network."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# xdist workers share the machine's cores: each worker (and every process it starts, which inherits the
# variable) gets its share of threads. torch's default, a thread per core in every process, oversubscribes
# the cores: `make test` on 2 AMX cores took 698 s of pytest with 2 threads per worker, 407 s with 1.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    if "torch" in sys.modules:  # imported before this file (a plugin): it has read the variable already
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# `make test-fast` (-m "not full") leaves out what makes the suite long: tests on the shared tiny pipeline
# runs (these fixtures train, post-train and evaluate once per session), on the real SmolLM2, or in several
# processes (DDP, FSDP, a SIGKILL and restart, Ray). `make test` runs everything.
FULL_FIXTURES = {"model_run", "pretrained", "benched", "posttrained", "trained", "one_process", "compressed",
                 "smollm2", "dapt", "work"}
FULL_WORDS = ("two_processes", "fsdp", "kill")  # Ray: its test is marked slow


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FULL_FIXTURES & set(item.fixturenames) or any(w in item.name for w in FULL_WORDS) \
                or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.full)


def slice_jsonl(src: Path, dst: Path, n: int, skip: int = 0) -> Path:
    """The documents skip..skip+n of a shipped .jsonl.gz, written to dst (.jsonl)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= skip + n:
                break
            if i >= skip:
                out.write(line)
    return dst


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def write_recipe(folder: Path, recipe: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def stage_metrics(workdir: Path, stage: str) -> tuple[Path, dict]:
    """The one finished run of `stage` in workdir and its manifest's metrics."""
    [run] = [p for p in (workdir / stage).iterdir()
             if p.is_dir() and not p.is_symlink() and not p.name.endswith(".partial")]  # not the latest link
    return run, json.loads((run / "manifest.json").read_text())["metrics"]


def slmforge(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "slmforge.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """30 PostgreSQL manual pages and 160 general documents (Bierce and a public-domain book)."""
    d = tmp_path_factory.mktemp("corpus")
    return {
        "domain": slice_jsonl(DATA / "postgresql_docs.jsonl.gz", d / "domain" / "pg.jsonl", 30, skip=100),
        "general": slice_jsonl(DATA / "general" / "devils_dictionary.jsonl.gz", d / "general" / "devil.jsonl", 150),
        "general2": slice_jsonl(DATA / "general" / "cfi_book.jsonl.gz", d / "general" / "cfi.jsonl", 10),
    }


def small_recipe(corpus: dict[str, Path], workdir: Path, with_model: bool = False, **sections) -> dict:
    recipe = {
        "name": "t",
        "workdir": str(workdir),
        "ingest": {"sources": [
            {"name": "pg", "role": "domain", "paths": [str(corpus["domain"])]},
            {"name": "general", "role": "general", "paths": [str(corpus["domain"].parent.parent / "general")]},
        ]},
        "curate": {"val_fraction": 0.15, "test_fraction": 0.15, "workers": 1},
        "tokenizer": {"vocab_size": 600},
    }
    if with_model:
        recipe["pretrain"] = {"model": {"depth": 2, "aspect": 16, "head_dim": 16, "context": 64},
                              "tokens": "12k", "batch_tokens": 1024, "micro_batch": 8, "lr": 3e-3,
                              "eval_every": 4, "eval_tokens": 512, "log_every": 2}
        recipe["synth"] = {"max_chunks": 20, "kinds": ["qa"]}
        recipe["pretrain"]["snapshots"] = 2
        recipe["bench"] = {"mcq": 8, "completion": 8, "qa": 8, "summarization": 2, "summary_tokens": 24, "dev": 6}
        recipe["evaluate"] = {"max_bytes": 20000, "samples": 1, "sample_tokens": 8, "select": "mcq/acc"}
        recipe["report"] = {}
    for k, v in sections.items():
        recipe[k] = v
    return recipe


def run_root(tmp_path_factory, name: str) -> Path:
    """A folder shared by every worker of this pytest run (xdist workers' temp folders are siblings)
    and by no other run, so that a run never reuses a pipeline built by older code."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    return root


def _model_pipeline(tmp_path_factory, small_corpus, upto: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The tiny recipe with a model, run once for all test workers (a file lock in the shared temp root):
    `upto` = "all" runs every stage (`slmforge run`); a stage name runs that stage and the stages it
    reads (`slmforge <stage> --recipe`), so that a test needing only them passes while a later stage is
    broken. Every call shares one workdir, so the stages run once whichever fixture comes first.
    (recipe path, workdir, the CLI's result). Tests must treat the workdir as read-only."""
    import fcntl

    root = run_root(tmp_path_factory, "model_run")
    path, full = root / "recipe.yaml", root / "result-all.json"

    def finished(step: str) -> Path | None:
        own = root / f"result-{step}.json"
        if own.is_file():
            return own
        if full.is_file() and json.loads(full.read_text())["returncode"] == 0:  # it made every stage
            return full
        return None

    done = finished(upto)
    if done is None:
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = finished(upto)
            if done is None:
                if not path.is_file():
                    recipe = small_recipe(small_corpus, root / "w", with_model=True)
                    recipe["curate"].update(val_fraction=0.4, test_fraction=0.2)  # enough val text for the dev sets
                    write_recipe(root, recipe)
                r = slmforge("run", str(path)) if upto == "all" else slmforge(upto, "--recipe", str(path))
                done = root / f"result-{upto}.json"
                tmp = done.with_suffix(".tmp")  # read without the lock: written whole, then renamed
                tmp.write_text(json.dumps({"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}))
                tmp.replace(done)
    result = subprocess.CompletedProcess(["slmforge", upto], **json.loads(done.read_text()))
    # a failed shared run fails every test that uses it, here, with its own error
    assert result.returncode == 0, f"slmforge {upto} on the shared tiny recipe failed:\n{result.stderr[-3000:]}"
    return path, root / "w", result


@pytest.fixture(scope="session")
def model_run(tmp_path_factory, small_corpus):
    """The tiny recipe with a model, run through every stage (see _model_pipeline)."""
    return _model_pipeline(tmp_path_factory, small_corpus, "all")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, small_corpus):
    """model_run's recipe up to its pretrained models only (ingest, curate, tokenizer, pretrain)."""
    return _model_pipeline(tmp_path_factory, small_corpus, "pretrain")


@pytest.fixture(scope="session")
def benched(tmp_path_factory, small_corpus):
    """model_run's data stages only, no model: ingest, curate, synth and bench."""
    return _model_pipeline(tmp_path_factory, small_corpus, "bench")


ALL_KINDS = ["qa", "mcq", "completion", "summary", "instruction", "evidence", "preference"]


def post_recipe(small_corpus, workdir, **sft_settings) -> dict:
    """The tiny model recipe with every synth kind, SFT and DPO sized for tests."""
    recipe = small_recipe(small_corpus, workdir, with_model=True)
    recipe["synth"] = {"max_chunks": 20, "kinds": ALL_KINDS}
    recipe["sft"] = {"epochs": 2, "lr": 3e-3, "batch_size": 16, "max_length": 64, "save_steps": 50,
                     "general_share": 0.1, **sft_settings}
    recipe["dpo"] = {"epochs": 2, "lr": 1e-3, "batch_size": 8, "max_length": 64, "on_policy": True,
                     "on_policy_questions": 6, "answer_tokens": 8, "precompute_ref": True}
    recipe["evaluate"].update(models=["pretrain", "sft", "dpo"], samples=1)
    recipe["evaluate"].pop("select")
    return recipe


@pytest.fixture(scope="session")
def posttrained(tmp_path_factory, small_corpus):
    """post_recipe run once through every stage for all test workers (a file lock in the shared temp
    root): (recipe path, workdir). Tests must treat it as read-only."""
    import fcntl

    root = run_root(tmp_path_factory, "posttrained")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").is_file():
            recipe = write_recipe(root, post_recipe(small_corpus, root / "w"))
            r = slmforge("run", str(recipe))
            assert r.returncode == 0, r.stderr[-3000:]
            (root / "done").write_text("ok")
    return root / "recipe.yaml", root / "w"
