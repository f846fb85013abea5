import json

import pytest

from slmforge.artifacts import MANIFEST, ArtifactStore
from slmforge.config import StageConfig
from slmforge.errors import UserError


class Cfg(StageConfig):
    size: int = 1
    workers: int = 1
    NOT_IN_KEY = frozenset({"workers"})


def build_counter(calls: list):
    def builder(out):
        calls.append(out)
        (out / "payload.txt").write_text("x" * 10)
        return {"n": len(calls)}
    return builder


def test_key_depends_on_config_and_inputs_not_on_speed_settings():
    k = ArtifactStore.key
    base = k("s", Cfg().key_dict(), {"a": "1"})
    assert base == k("s", Cfg(workers=8).key_dict(), {"a": "1"})
    assert base != k("s", Cfg(size=2).key_dict(), {"a": "1"})
    assert base != k("s", Cfg().key_dict(), {"a": "2"})
    assert base != k("t", Cfg().key_dict(), {"a": "1"})


def test_cached_after_manifest_and_manifest_written_last(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    art = store.build("s", Cfg(), {}, build_counter(calls))
    m = json.loads((art.path / MANIFEST).read_text())
    assert m["outputs"] == {"payload.txt": 10} and m["metrics"] == {"n": 1} and m["wall_time_s"] >= 0
    assert {"config", "inputs", "versions", "hardware", "started"} <= m.keys()
    again = store.build("s", Cfg(), {}, build_counter(calls))
    assert len(calls) == 1 and again.key == art.key and store.last_built == ("s", art.key)
    assert store.resolve("s:latest").key == art.key
    store.build("s", Cfg(), {}, build_counter(calls), force=True)
    assert len(calls) == 2


def test_a_directory_without_manifest_is_never_taken_as_done(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    key = store.key("s", Cfg().key_dict(), {})
    # as if killed after the rename but before the manifest
    (store.run_dir("s", key)).mkdir(parents=True)
    (store.run_dir("s", key) / "payload.txt").write_text("half")
    assert store.state("s", key) == "incomplete"
    with pytest.raises(UserError, match="not complete"):
        store.load("s", key)
    art = store.build("s", Cfg(), {}, build_counter(calls))
    assert len(calls) == 1 and (art.path / "payload.txt").read_text() == "x" * 10
    assert store.state("s", key) == "done"


def test_a_failing_build_leaves_no_manifest(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(out):
        (out / "part").write_text("1")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.build("s", Cfg(), {}, boom, resumable=True)
    key = store.key("s", Cfg().key_dict(), {})
    assert store.state("s", key) == "incomplete"
    seen = []

    def resume(out):
        seen.append((out / "part").read_text())  # the checkpoint is handed back
        return {}

    store.build("s", Cfg(), {}, resume, resumable=True)
    assert seen == ["1"] and store.state("s", key) == "done"
    with pytest.raises(UserError, match="no completed other run"):
        store.resolve("other:latest")


LOCK_HOLDER = """
import os, signal, sys, time
from pathlib import Path
from slmforge.artifacts import ArtifactStore
from tests.test_artifacts import Cfg

def builder(out):
    if os.fork() == 0:  # a child that outlives its parent, as a multiprocessing manager can
        time.sleep(60)
        os._exit(0)
    Path(sys.argv[2]).write_text("building")
    os.kill(os.getpid(), signal.SIGKILL)

ArtifactStore(Path(sys.argv[1])).build("s", Cfg(), {}, builder)
"""


def test_a_sigkilled_build_leaves_no_lock_even_when_a_forked_child_survives(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "w"), str(flag)], cwd=REPO,
                            start_new_session=True)
    try:
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL and flag.is_file()
        calls: list = []
        store = ArtifactStore(tmp_path / "w")
        for _ in range(50):  # the child is alive (same session); the build must not wait for it
            try:
                art = store.build("s", Cfg(), {}, build_counter(calls), resumable=True)
                break
            except UserError as e:
                assert "another slmforge process" in str(e)
                time.sleep(0.1)
        else:
            raise AssertionError("the stage lock is still held by the dead build's child")
        assert (art.path / MANIFEST).is_file() and len(calls) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_latest_is_a_relative_symlink_and_older_workdirs_still_resolve(tmp_path):
    import os
    import shutil

    store, calls = ArtifactStore(tmp_path / "w"), []
    a = store.build("s", Cfg(), {}, build_counter(calls))
    latest = store.stage_dir("s") / "latest"
    assert latest.is_symlink() and os.readlink(latest) == a.key  # relative: the workdir can move
    assert (latest / "payload.txt").read_text() == "x" * 10 and store.resolve("s:latest") == a
    b = store.build("s", Cfg(size=2), {}, build_counter(calls))
    assert os.readlink(latest) == b.key and store.latest_key("s") == b.key
    assert sorted(p.name for p in store.stage_dir("s").iterdir()) == sorted([a.key, b.key, "latest", f".{a.key}.lock",
                                                                             f".{b.key}.lock"])  # no temp left

    moved = tmp_path / "moved"
    shutil.move(store.workdir, moved)
    assert ArtifactStore(moved).resolve("s:latest").path == moved / "s" / b.key

    old = ArtifactStore(moved)  # a workdir made before the link: `latest` a text file holding the key
    (moved / "s" / "latest").unlink()
    (moved / "s" / "latest").write_text(a.key + "\n")
    assert old.resolve("s:latest").key == a.key and old.latest_key("s") == a.key
    old.build("s", Cfg(size=2), {}, build_counter(calls))  # cached, and the text file becomes a link
    assert (moved / "s" / "latest").is_symlink() and old.resolve("s:latest").key == b.key and len(calls) == 2

    copy = tmp_path / "copy"  # copied by following links: `latest` is a real folder, its manifest names the key
    shutil.copytree(moved, copy)
    assert not (copy / "s" / "latest").is_symlink() and ArtifactStore(copy).resolve("s:latest").key == b.key
    ArtifactStore(copy).build("s", Cfg(), {}, build_counter(calls))
    assert os.readlink(copy / "s" / "latest") == a.key and len(calls) == 2
