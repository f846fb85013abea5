"""compress on the tiny pretrained specialist: every variant, what the manifest records, distillation
brings the student closer to its teacher, the models load, and a SIGKILL + resume ends with the same weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import slmforge

SETTINGS = ["compress.ratio=0.6", "compress.tokens=4k", "compress.batch_tokens=512", "compress.micro_batch=8",
            "compress.calibration=16", "compress.calibration_context=32", "compress.eval_every=4",
            "compress.eval_tokens=512", "compress.log_every=2", "compress.alpha=0.8", "compress.lr=3e-3"]


def _sets(work, *more: str) -> list[str]:
    return [x for s in (f"workdir={work}", *SETTINGS, *more) for x in ("--set", s)]


@pytest.fixture(scope="module")
def compressed(pretrained, tmp_path_factory):
    """The tiny run's specialist compressed into every variant, in a copy of its workdir."""
    recipe, work, r = pretrained
    assert r.returncode == 0, r.stderr[-3000:]
    copy = tmp_path_factory.mktemp("compress") / "w"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("compress"), symlinks=True)
    r = slmforge("compress", "--recipe", str(recipe),
                 *_sets(copy, "compress.variants=[pruned, pruned-kd, pruned-lm, scratch-kd, scratch-lm]"))
    assert r.returncode == 0, r.stderr[-3000:]
    [run] = [p for p in (copy / "compress").iterdir()
             if p.is_dir() and not p.is_symlink() and not p.name.endswith(".partial")]
    return recipe, copy, run


def test_the_variants_are_the_models_records_gives_compress():
    from slmforge.records import MODELS
    from slmforge.stages import compress

    assert list(compress.VARIANTS) == [m for m, stage in MODELS.items() if stage == compress.NAME]
    names = compress.Config.model_json_schema()["properties"]["variants"]["items"]["enum"]
    assert names == list(compress.VARIANTS)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_every_variant_is_a_smaller_llama_with_the_teachers_tokenizer(compressed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmforge.training.distill import mean_kl

    _, work, run = compressed
    m = json.loads((run / "manifest.json").read_text())["metrics"]
    teacher_dir = next(p for p in (work / "pretrain").iterdir() if p.is_dir() and not p.is_symlink()) / "specialist"
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), local_files_only=True).eval()
    t_params = sum(p.numel() for p in teacher.parameters())
    assert m["teacher"]["params"] == t_params and m["teacher"]["model"] == "specialist"
    assert set(m["models"]) == {"pruned", "pruned-kd", "pruned-lm", "scratch-kd", "scratch-lm"}
    pr = m["pruning"]
    assert pr["calibration_tokens"] == 16 * 32 and sorted(pr["layers"]["kept"] + pr["layers"]["removed"]) == \
        list(range(teacher.config.num_hidden_layers))
    imp = json.loads((run / "importance.json").read_text())
    assert len(imp["ffn"]) == teacher.config.num_hidden_layers and len(imp["hidden"]) == teacher.config.hidden_size
    val = np.load(run / "tokens" / "pg.val.npy")
    x = torch.as_tensor(val[: 8 * 32].astype(np.int64)).view(8, 32)
    kl = {}
    for name, meta in m["models"].items():
        model = AutoModelForCausalLM.from_pretrained(str(run / name), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(run / name), local_files_only=True)
        n = sum(p.numel() for p in model.parameters())
        assert n == meta["shape"]["params"] <= 0.6 * t_params and model.config.vocab_size == len(tok)
        assert model.config.hidden_size == pr["shape"]["hidden"] and model.config.num_hidden_layers == pr["shape"]["layers"]
        assert meta["tokens"] == (0 if name == "pruned" else m["models"]["pruned-kd"]["tokens"]) and \
            (name == "pruned" or meta["tokens"] >= 4000)
        kl[name] = mean_kl(teacher, model, x)
        assert meta["pruning"]["removed_layers"] == pr["layers"]["removed"] and meta["pruning"]["shape"] == pr["shape"]
    assert kl["pruned-kd"] < kl["pruned-lm"] and kl["scratch-kd"] < kl["scratch-lm"], kl  # distillation: closer
    assert m["models"]["pruned-kd"]["flops"] > m["models"]["pruned-lm"]["flops"]  # the teacher's forward counts
    assert m["models"]["pruned-kd"]["base"]["model"] == "specialist" and m["models"]["scratch-kd"]["base"] is None


def test_bad_settings_name_the_key(pretrained, tmp_path):
    recipe, _, _ = pretrained
    r = slmforge("compress", "--recipe", str(recipe), "--set", f"workdir={tmp_path}",
                 "--set", "compress.variants=[pruned, distilled]")
    assert r.returncode == 2 and "compress.variants" in r.stderr
    r = slmforge("compress", "--recipe", str(recipe), "--set", f"workdir={tmp_path}", "--set", "compress.params=lots",
                 "--set", "compress.tokens=1k")
    assert r.returncode == 2 and "compress.params" in r.stderr, r.stderr


def test_sigkill_then_resume_gives_the_same_weights(compressed, tmp_path):
    recipe, work, run = compressed
    copy = tmp_path / "w"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("compress"), symlinks=True)
    args = [sys.executable, "-m", "slmforge.cli", "compress", "--recipe", str(recipe),
            *_sets(copy, "compress.variants=[pruned-kd]", "compress.checkpoint_every=2")]
    killed = False
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if list(copy.glob("compress/*.partial/pruned-kd.ckpt.pt")):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step" in r.stderr
    [resumed] = [p for p in (copy / "compress").iterdir() if p.is_dir() and not p.is_symlink()]
    a, b = _weights(run / "pruned-kd"), _weights(resumed / "pruned-kd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_under_fsdp_in_two_processes_saves_the_one_process_student(compressed, tmp_path):
    """compress shares pretrain's loop: under FSDP (2 CPU processes) the pruned student, distilled from
    its whole teacher, is saved whole and matches the 1-process student to float error."""
    from tests.conftest import REPO

    recipe, work, _ = compressed
    runs = {}
    for name in ("one", "two"):
        copy = tmp_path / name
        shutil.copytree(work, copy, ignore=shutil.ignore_patterns("compress"), symlinks=True)
        args = ["-m", "slmforge.cli", "compress", "--recipe", str(recipe),
                *_sets(copy, "compress.variants=[pruned-kd]", "compress.precision=fp32", "compress.parallel=fsdp")]
        if name == "two":
            args = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"),
                    "--main_process_port", "29571", *args]
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        [runs[name]] = [p for p in (copy / "compress").iterdir() if p.is_dir() and not p.is_symlink()]
    m = json.loads((runs["two"] / "manifest.json").read_text())["metrics"]
    assert m["world_size"] == 2
    a, b = _weights(runs["one"] / "pruned-kd"), _weights(runs["two"] / "pruned-kd")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)
