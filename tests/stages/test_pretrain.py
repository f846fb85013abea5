import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from slmforge.stages.pretrain import Config
from slmforge.training.loop import Mixture, domain_fraction, lr_at
from slmforge.training.packing import Sampler
from tests.conftest import REPO, slmforge, small_recipe, write_recipe


def test_lr_schedules():
    cfg = Config(tokens="1M", lr=1.0, warmup=0.1, decay_part=0.2, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80]) and lrs[-1] == pytest.approx(0.1, abs=0.02)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    cos = [lr_at(cfg.model_copy(update={"schedule": "cosine"}), s, 100) for s in range(100)]
    assert cos[10] > cos[50] > cos[99] >= 0.1


def test_mixture_schedules():
    up = Mixture(schedule="upsample", domain_fraction=0.5, final_domain_fraction=1.0, final_part=0.2)
    assert domain_fraction(up, 10, 100, 0.0) == 0.5 and domain_fraction(up, 85, 100, 0.0) == 1.0
    sp = Mixture(schedule="specialised", domain_fraction=0.7, max_domain_epochs=2)
    assert domain_fraction(sp, 0, 100, 1.9) == 0.7 and domain_fraction(sp, 50, 100, 2.0) == 0.0


def test_sampler_is_deterministic_packs_windows_and_follows_the_fraction():
    streams = {"dom": np.arange(10_000) % 500, "gen": np.arange(20_000) % 700 + 1000}
    a, b = Sampler(streams, ["dom"], 16, seed=3), Sampler(streams, ["dom"], 16, seed=3)
    batches = [a.batch(s, 64, 0.25) for s in range(20)]
    assert all((x == b.batch(s, 64, 0.25)).all() for s, x in enumerate(batches))
    assert batches[0].shape == (64, 17)
    share = np.mean([(x < 1000).all(axis=1).mean() for x in batches])
    assert 0.18 < share < 0.32
    c = Sampler(streams, ["dom"], 16, seed=3)
    c.load(json.loads(json.dumps(a.state())))  # resume from saved cursors
    assert (c.batch(20, 64, 0.25) == a.batch(20, 64, 0.25)).all()


def test_a_source_with_a_fixed_share_gets_that_share_of_its_group():
    streams = {"dom": np.arange(10_000) % 500, "reading": np.arange(2_000) % 300 + 2000,
               "gen": np.arange(20_000) % 700 + 1000}
    s = Sampler(streams, ["dom", "reading"], 16, seed=1, shares={"reading": 0.4})
    rows = np.concatenate([s.batch(i, 64, 1.0) for i in range(40)])
    share = (rows >= 2000).all(axis=1).mean()  # by size alone it would be 2000 / 12000 = 0.17
    assert 0.35 < share < 0.45 and not ((rows >= 1000) & (rows < 2000)).any()
    plain = Sampler(streams, ["dom", "reading"], 16, seed=1)
    by_size = (np.concatenate([plain.batch(i, 64, 1.0) for i in range(40)]) >= 2000).all(axis=1).mean()
    assert 0.11 < by_size < 0.23


def test_reading_comprehension_texts_are_mixed_in_from_synth(trained, tmp_path):
    recipe, run_dir = trained
    work = tmp_path / "w"
    r = slmforge("pretrain", "--recipe", str(recipe), "--set", f"workdir={work}", "--set", "reading=0.3",
                 "--set", "baseline=false")
    assert r.returncode == 2 and "pretrain.reading: the synth stage made no reading-comprehension texts" in r.stderr
    r = slmforge("pretrain", "--recipe", str(recipe), "--set", f"workdir={work}", "--set", "reading=0.3",
                 "--set", "baseline=false", "--set", "synth.kinds=[qa, reading]")
    assert r.returncode == 0, r.stderr
    [d] = [p for p in (work / "pretrain").iterdir()
           if (p / "manifest.json").is_file() and not p.is_symlink()]  # not the failed one, nor the latest link
    m = json.loads((d / "manifest.json").read_text())
    assert m["metrics"]["models"]["specialist"]["sources"][-1] == "reading" and "synth" in m["inputs"]
    syn = work / "synth" / m["inputs"]["synth"]
    docs = [json.loads(x)["text"] for x in (syn / "reading.jsonl").read_text().splitlines()]
    assert docs and all("\n\nQuestions about the text above:\n\nQ: " in t for t in docs)
    assert (d / "tokens" / "specialist" / "reading.train.npy").is_file()


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("pre")
    recipe = write_recipe(tmp, small_recipe(small_corpus, tmp / "w", with_model=True))
    r = slmforge("run", str(recipe), "--until", "pretrain")
    assert r.returncode == 0, r.stderr
    run_dir = next(p for p in (tmp / "w" / "pretrain").iterdir()
                   if p.is_dir() and not p.is_symlink() and not p.name.endswith(".partial"))
    return recipe, run_dir


def test_loss_falls_and_the_model_loads_offline(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = trained
    m = json.loads((run_dir / "manifest.json").read_text())["metrics"]
    for name in ("specialist", "generalist"):
        log = [json.loads(x) for x in (run_dir / name / "train_log.jsonl").read_text().splitlines()]
        assert log[-1]["loss"] < log[0]["loss"] - 0.3
        assert m["models"][name]["tokens"] == m["models"]["specialist"]["tokens"]  # same budget
        val = [json.loads(x) for x in (run_dir / name / "val_log.jsonl").read_text().splitlines()]
        assert val and set(m["models"][name]["sources"]) <= set(val[-1])
        model = AutoModelForCausalLM.from_pretrained(str(run_dir / name), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(run_dir / name), local_files_only=True)
        assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
        assert len(tok) == model.config.vocab_size
        assert "## Results" in (run_dir / name / "README.md").read_text()
    assert m["models"]["specialist"]["domain_epochs"] > 0 and m["models"]["generalist"]["domain_epochs"] == 0


def test_sigkill_then_resume_gives_the_same_weights(trained, tmp_path):
    recipe, run_dir = trained
    work = tmp_path / "w"
    r = slmforge("run", str(recipe), "--until", "tokenizer", "--set", f"workdir={work}")
    assert r.returncode == 0, r.stderr
    args = [sys.executable, "-m", "slmforge.cli", "pretrain", "--recipe", str(recipe), "--set", f"workdir={work}",
            "--set", "checkpoint_every=3"]
    killed_at = []
    for _ in range(2):  # kill twice, each time after a fresh checkpoint
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        ckpts = list(work.glob("pretrain/*.partial/*.ckpt.pt"))
        before = max((c.stat().st_mtime_ns for c in ckpts), default=0)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            ckpts = list(work.glob("pretrain/*.partial/*.ckpt.pt"))
            if ckpts and max(c.stat().st_mtime_ns for c in ckpts) > before:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at.append([c.name for c in ckpts])
    assert any(killed_at), "the run finished before it could be killed"
    assert not list(work.glob("pretrain/*/manifest.json"))
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    [resumed] = [p for p in (work / "pretrain").iterdir() if p.is_dir() and not p.is_symlink()]
    for name in ("specialist", "generalist"):
        a, b = _weights(run_dir / name), _weights(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FP32 = ["--set", "pretrain.precision=fp32", "--set", "pretrain.baseline=false"]


def _launch(recipe, work, port: int, *sets, popen: bool = False):
    """`slmforge pretrain` in 2 CPU processes (accelerate launch, gloo), one thread each."""
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"),
            "--main_process_port", str(port), "-m", "slmforge.cli", "pretrain", "--recipe", str(recipe),
            "--set", f"workdir={work}", *FP32, *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def _run_dir(work):
    [d] = [p for p in (work / "pretrain").iterdir() if p.is_dir() and not p.is_symlink()]
    return d


def _losses(work) -> list[float]:
    return [json.loads(x)["loss"] for x in (_run_dir(work) / "specialist" / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(trained, tmp_path_factory):
    """The specialist in fp32 in one process: the curve that 2 processes must follow."""
    recipe, _ = trained
    one = tmp_path_factory.mktemp("one")
    r = slmforge("run", str(recipe), "--until", "pretrain", "--set", f"workdir={one}", *FP32)
    assert r.returncode == 0, r.stderr
    return one


def test_two_processes_follow_the_one_process_loss_curve(trained, one_process, tmp_path):
    recipe, _ = trained
    two = tmp_path / "two"
    r = slmforge("run", str(recipe), "--until", "tokenizer", "--set", f"workdir={two}", *FP32)
    assert r.returncode == 0, r.stderr
    r = _launch(recipe, two, 29531)
    assert r.returncode == 0, r.stderr[-3000:]
    for w, world in ((one_process, 1), (two, 2)):
        assert json.loads((_run_dir(w) / "manifest.json").read_text())["metrics"]["world_size"] == world
    one_log, two_log = _losses(one_process), _losses(two)
    assert len(one_log) == len(two_log)
    assert np.allclose(one_log, two_log, atol=2e-3), (one_log, two_log)


def test_fsdp_in_two_processes_follows_one_process_saves_whole_weights_and_resumes_exactly(
        trained, one_process, tmp_path):
    """FSDP2 over gloo: the loss curve of 1 process; a saved model that from_pretrained loads, whole (the
    shards gathered: the 1-process model's shapes and, to float error, its weights); sharded checkpoints
    (one file per process); and a SIGKILL of both processes, then a plain restart, ends with the
    weights of the run that never stopped."""
    from transformers import AutoModelForCausalLM

    recipe, _ = trained
    fsdp = ["--set", "pretrain.parallel=fsdp", "--set", "pretrain.checkpoint_every=3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for w in (whole, killed):
        r = slmforge("run", str(recipe), "--until", "tokenizer", "--set", f"workdir={w}", *FP32)
        assert r.returncode == 0, r.stderr
    r = _launch(recipe, whole, 29541, *fsdp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((_run_dir(whole) / "manifest.json").read_text())["metrics"]["world_size"] == 2
    assert np.allclose(_losses(one_process), _losses(whole), atol=2e-3), (_losses(one_process), _losses(whole))
    model = AutoModelForCausalLM.from_pretrained(str(_run_dir(whole) / "specialist"), local_files_only=True)
    a, b = _weights(_run_dir(one_process) / "specialist"), _weights(_run_dir(whole) / "specialist")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in a.items() if k != "lm_head.weight")

    seen = set()
    proc = _launch(recipe, killed, 29551, *fsdp, popen=True)
    deadline = time.time() + 200
    while proc.poll() is None and time.time() < deadline and not seen:
        for meta in killed.glob("pretrain/*.partial/specialist.ckpt.dcp/.metadata"):
            seen = {p.name for p in meta.parent.iterdir()}
        time.sleep(0.02)
    # the launcher starts each worker in a session of its own: kill the whole tree, as a dying machine would
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    assert {"__0_0.distcp", "__1_0.distcp", "loop.pt"} <= seen, f"no sharded checkpoint before the run ended: {seen}"
    assert not list(killed.glob("pretrain/*/manifest.json"))
    r = _launch(recipe, killed, 29561, *fsdp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step" in r.stderr
    a, b = _weights(_run_dir(whole) / "specialist"), _weights(_run_dir(killed) / "specialist")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(killed.glob("pretrain/*/specialist.ckpt*"))  # the checkpoint goes with the finished model


def test_continued_pretraining_from_a_local_checkpoint(trained, tmp_path):
    recipe, run_dir = trained
    work = tmp_path / "w"
    r = slmforge("pretrain", "--recipe", str(recipe), "--set", f"workdir={work}",
                 "--set", f"init_from={run_dir / 'specialist'}", "--set", "tokens=3k")
    assert r.returncode == 0, r.stderr
    [d] = [p for p in (work / "pretrain").iterdir() if p.is_dir() and not p.is_symlink()]
    m = json.loads((d / "manifest.json").read_text())["metrics"]
    assert sorted(m["models"]) == ["recovered", "specialist"]  # the control: the same start on general text
    start, after = _weights(run_dir / "specialist"), _weights(d / "specialist")
    assert any(not torch.equal(start[k], after[k]) for k in start)
    log = [json.loads(x) for x in (d / "specialist" / "train_log.jsonl").read_text().splitlines()]
    first = [json.loads(x) for x in (run_dir / "specialist" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] < first[0]["loss"] - 0.3  # it starts from the trained weights, not from scratch


def test_dapt_from_a_base_by_name_lowers_its_domain_loss_beside_a_general_text_control(trained, tmp_path, monkeypatch):
    from slmforge.models import bases

    recipe, run_dir = trained
    monkeypatch.setenv("SLMFORGE_BASES", str(tmp_path / "bases"))  # the CLI below inherits it
    bases.add("tinybase", run_dir / "generalist", tokens=1e6)  # a "generalist" that never saw the domain
    work = tmp_path / "w"
    r = slmforge("pretrain", "--recipe", str(recipe), "--set", f"workdir={work}", "--set", "init_from=tinybase",
                 "--set", "tokens=6k", "--set", "eval_every=2")
    assert r.returncode == 0, r.stderr
    [d] = [p for p in (work / "pretrain").iterdir() if p.is_dir() and not p.is_symlink()]
    m = json.loads((d / "manifest.json").read_text())["metrics"]
    assert m["init_from"]["base"] == "tinybase" and m["init_from"]["pretrain_tokens"] == 1e6
    assert sorted(m["models"]) == ["recovered", "specialist"]
    assert m["models"]["specialist"]["shape"]["context"] == 64  # model.context, within the base's context
    val = [json.loads(x) for x in (d / "specialist" / "val_log.jsonl").read_text().splitlines()]
    domain = next(s for s in val[0] if s not in ("step", "tokens", "general"))
    assert val[-1][domain] < val[0][domain]

    # the control `recovered`: the same base, tokens, steps and learning rates, general text only
    spec, rec = m["models"]["specialist"], m["models"]["recovered"]
    assert rec["control"] == {"of": "specialist", "text": "general", "tokens": spec["tokens"], "steps": spec["steps"],
                              "base": "tinybase", "quantized": None}
    assert rec["tokens"] == spec["tokens"] and rec["steps"] == spec["steps"]
    assert set(rec["sources"]) == {"general"} and rec["domain_epochs"] == 0
    logs = {n: [json.loads(x) for x in (d / n / "train_log.jsonl").read_text().splitlines()] for n in ("specialist", "recovered")}
    assert [r["lr"] for r in logs["recovered"]] == [r["lr"] for r in logs["specialist"]]
    assert [r["tokens"] for r in logs["recovered"]] == [r["tokens"] for r in logs["specialist"]]
    assert {r["domain_fraction"] for r in logs["recovered"]} == {0.0}
    assert max(r["domain_fraction"] for r in logs["specialist"]) > 0.5
    start = _weights(tmp_path / "bases" / "tinybase")
    after = _weights(d / "recovered")
    assert after.keys() == start.keys()  # continued from the base, its own tokenizer
    assert any(not torch.equal(start[k], after[k]) for k in start)  # and trained


def test_init_from_is_a_folder_relative_to_the_recipe_or_a_base_name(trained, tmp_path):
    import shutil

    from slmforge.config import load_recipe

    recipe, run_dir = trained
    shutil.copytree(run_dir / "specialist", recipe.parent / "mybase", dirs_exist_ok=True)
    cfg = load_recipe(recipe, ["pretrain.init_from=mybase"]).stages["pretrain"]
    assert cfg.init_from == str(recipe.parent / "mybase")
    assert load_recipe(recipe, ["pretrain.init_from=smollm2-135m"]).stages["pretrain"].init_from == "smollm2-135m"


def test_dapt_with_vocabulary_expansion_records_bytes_per_token(trained, tmp_path, monkeypatch):
    from slmforge.models import bases
    from slmforge.models.modeling import load_model

    recipe, run_dir = trained
    monkeypatch.setenv("SLMFORGE_BASES", str(tmp_path / "bases"))
    base = bases.add("tinybase", run_dir / "generalist")
    work = tmp_path / "w"
    r = slmforge("pretrain", "--recipe", str(recipe), "--set", f"workdir={work}", "--set", "init_from=tinybase",
                 "--set", "tokens=3k", "--set", "expand_vocab=30")
    assert r.returncode == 0, r.stderr
    [d] = [p for p in (work / "pretrain").iterdir() if p.is_dir() and not p.is_symlink()]
    ev = json.loads((d / "manifest.json").read_text())["metrics"]["expand_vocab"]
    assert ev["chosen"] == 30 and ev["added"] >= 30
    assert ev["bytes_per_token"]["expanded"] > ev["bytes_per_token"]["base"]  # fewer tokens per domain byte
    model, tok = load_model(d / "specialist")
    assert len(tok) == base.vocab_size + ev["added"] == model.get_input_embeddings().weight.shape[0]
    r = slmforge("pretrain", "--recipe", str(recipe), "--set", "expand_vocab=30")
    assert r.returncode == 2 and "expand_vocab: needs init_from" in r.stderr
