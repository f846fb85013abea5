"""catalog: validation of model folders, names, the CLI, and concurrent readers during writes."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import pytest

from slmforge.cli import main
from slmforge.deploy.catalog import Catalog
from slmforge.errors import UserError
from tests.conftest import slmforge


def _pretrain_models(workdir: Path) -> dict[str, Path]:
    art = next(p.parent for p in (workdir / "pretrain").glob("*/manifest.json"))
    return {name: art / name for name in ("specialist", "generalist")}


@pytest.fixture(scope="module")
def folders(pretrained, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny run's two models: `plain` (an HF folder with a card, no slmforge.json) and
    `exported` (with a slmforge.json as the export stage writes it)."""
    _, workdir, r = pretrained
    assert r.returncode == 0, r.stderr[-2000:]
    src = _pretrain_models(workdir)
    d = tmp_path_factory.mktemp("catalog-models")
    plain = Path(shutil.copytree(src["generalist"], d / "plain", ignore=shutil.ignore_patterns("snapshots")))
    exported = Path(shutil.copytree(src["specialist"], d / "exported", ignore=shutil.ignore_patterns("snapshots")))
    (exported / "slmforge.json").write_text(json.dumps({
        "format": 1, "name": "t-specialist", "domain": "postgres", "description": "PostgreSQL manual",
        "params": 12345, "context": 64, "chat": False, "tokenizer": {"type": "byte-level BPE", "vocab_size": 600},
        "lineage": {"recipe": "t", "model": "specialist", "stage": "pretrain", "stages": {"pretrain": "abc"}},
        "scores": {"mcq/acc": 0.5, "bpb/pg": 2.5}, "gguf": None, "router": None, "created": "2026-11-22T00:00:00Z"}))
    return {"plain": plain, "exported": exported}


def test_add_list_show_rm(folders, tmp_path, capsys):
    cat = Catalog(tmp_path / "c.db")
    assert cat.list() == [] and not cat.path.exists()  # reading never creates the file
    e = cat.add(folders["exported"])
    assert (e.name, e.domain, e.params, e.scores["mcq/acc"]) == ("t-specialist", "postgres", 12345, 0.5)
    assert e.lineage["stages"] == {"pretrain": "abc"} and e.path == folders["exported"].resolve()
    g = cat.add(folders["plain"], name="general-1", domain="general", description="prose")
    assert g.params > 0 and g.context == 64 and g.chat  # read from config.json, the weights, the tokenizer
    assert [x.name for x in cat.list()] == ["general-1", "t-specialist"]
    assert cat.get("general-1") == g

    assert main(["models", "--catalog", str(cat.path), "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [x["name"] for x in listed] == ["general-1", "t-specialist"]
    assert main(["models", "--catalog", str(cat.path), "show", "t-specialist"]) == 0
    assert json.loads(capsys.readouterr().out)["domain"] == "postgres"

    with pytest.raises(UserError, match="already there"):
        cat.add(folders["plain"], name="t-specialist", domain="general")
    assert cat.get("t-specialist").domain == "postgres"  # the failed add changed nothing
    cat.add(folders["plain"], name="t-specialist", domain="general", replace=True)
    assert cat.get("t-specialist").domain == "general"

    cat.remove("general-1")
    assert folders["plain"].is_dir()  # the folder is kept
    with pytest.raises(UserError, match="no model called 'general-1'; it has t-specialist"):
        cat.get("general-1")
    assert main(["models", "--catalog", str(cat.path), "rm", "nope"]) == 2
    assert "no model called 'nope'" in capsys.readouterr().err


def test_cli_verb(folders, tmp_path):
    db = tmp_path / "c.db"
    r = slmforge("models", "--catalog", str(db), "add", str(folders["exported"]))
    assert r.returncode == 0, r.stderr
    r = slmforge("models", "list", "--catalog", str(db))  # --catalog before or after the action
    assert r.returncode == 0 and "t-specialist" in r.stdout and "postgres" in r.stdout and "12k" in r.stdout
    assert "mcq/acc 0.500" in r.stdout


@pytest.mark.parametrize("name", ["../evil", "a/b", "Upper", "auto", "", "x" * 65, "with space", ".hidden"])
def test_bad_names(folders, tmp_path, name):
    with pytest.raises(UserError, match="model name"):
        Catalog(tmp_path / "c.db").add(folders["exported"], name=name)


def _broken(folders, tmp_path, how: str) -> Path:
    d = Path(shutil.copytree(folders["plain"], tmp_path / how))
    if how == "no-config":
        (d / "config.json").unlink()
    elif how == "pickle-only":
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
    elif how == "remote-code":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    elif how == "wrong-shape":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    elif how == "no-card":
        (d / "README.md").unlink()
    elif how == "card-without-front-matter":
        (d / "README.md").write_text("# a model\n")
    elif how == "damaged-weights":
        (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return d


@pytest.mark.parametrize("how,message", [
    ("missing", "no such folder"),
    ("no-config", "no config.json"),
    ("pickle-only", r"no \.safetensors weights \(found pytorch_model.bin\)"),
    ("remote-code", "auto_map"),
    ("wrong-shape", "do not match config.json"),
    ("no-card", "no model card"),
    ("card-without-front-matter", "no YAML front matter"),
    ("damaged-weights", "not a readable safetensors file"),
])
def test_validation(folders, tmp_path, how, message):
    cat = Catalog(tmp_path / "c.db")
    folder = tmp_path / "does-not-exist" if how == "missing" else _broken(folders, tmp_path, how)
    with pytest.raises(UserError, match=message):
        cat.add(folder, name="m", domain="general")
    assert cat.list() == []


def test_plain_folder_needs_domain(folders, tmp_path):
    with pytest.raises(UserError, match="pass --domain"):
        Catalog(tmp_path / "c.db").add(folders["plain"], name="m")


def _reader(db: str, ready, stop, q) -> None:
    """List the catalog until `stop` is set, while another process writes; report errors, torn rows
    and how many lists it made."""
    bad = lists = 0
    try:
        while not stop.is_set():
            for e in Catalog(db).list():
                bad += e.domain != "postgres" or e.scores.get("mcq/acc") != 0.5 or not e.name.startswith("m")
            lists += 1
            if lists == 1:
                ready.put(1)
        q.put(("ok", bad, lists))
    except Exception as e:  # noqa: BLE001 (reported to the test, which fails with it)
        q.put(("error", repr(e)))


def test_concurrent_readers_during_writes(folders, tmp_path):
    db = tmp_path / "c.db"
    cat = Catalog(db)
    cat.add(folders["exported"], name="m0")
    ctx = mp.get_context("spawn")
    q, ready, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    readers = [ctx.Process(target=_reader, args=(str(db), ready, stop, q)) for _ in range(2)]
    for p in readers:
        p.start()
    for _ in readers:
        ready.get(timeout=120)
    for i in range(1, 13):  # adds and removes while the readers list
        cat.add(folders["exported"], name=f"m{i}")
        if i % 3 == 0:
            cat.remove(f"m{i - 1}")
    stop.set()
    results = [q.get(timeout=120) for _ in readers]
    for p in readers:
        p.join(timeout=60)
    assert [r[:2] for r in results] == [("ok", 0), ("ok", 0)], results
    assert all(r[2] > 10 for r in results)  # they did read while the writes went on
    assert len(cat.list()) == 13 - 4
