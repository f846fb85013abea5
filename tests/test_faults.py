"""The fault suite's kill-and-restart part for the long stages not covered beside their own tests (curate:
test_pipeline and test_curate; pretrain and compress: bit-identical weights; sft: its resume test): a
SIGKILL at a seeded random moment while the stage runs, then a plain restart, which must finish with no
manual step and give the uninterrupted run's outputs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from slmforge.config import load_recipe
from slmforge.pipeline import stage_states
from tests.conftest import stage_metrics

# largest weight difference allowed between dpo after a kill and restart and dpo uninterrupted: a restart
# resumes from trl's last checkpoint (or starts over) with the same seed, data order and RNG states
DPO_TOLERANCE = 1e-6


def _kill_then_restart(recipe, work, stage: str, seed: int, wall: float, sets: tuple[str, ...] = (),
                       ready: str | None = None) -> tuple[bool, subprocess.CompletedProcess]:
    """Start `slmforge <stage>` on `work`, SIGKILL it at a random moment of its run (a share of the
    uninterrupted run's wall time `wall`, drawn from `seed`; after a file matching `ready` exists, when
    given), then run it again. (killed, the restart)."""
    args = [sys.executable, "-m", "slmforge.cli", stage, "--recipe", str(recipe), "--set", f"workdir={work}",
            *(x for s in sets for x in ("--set", s))]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    pattern = ready or f"{stage}/*.partial"
    while proc.poll() is None and time.time() < deadline and not list(work.glob(pattern)):
        time.sleep(0.01)
    low, high = (0.0, 0.1) if ready else (0.1, 0.6)
    time.sleep(random.Random(seed).uniform(low, high) * wall)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed, subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("stage,seed", [("synth", 0), ("dpo", 1), ("evaluate", 2)])
def test_sigkill_at_a_random_moment_then_a_plain_restart(posttrained, tmp_path, stage, seed):
    recipe, work = posttrained
    orig_run, orig = stage_metrics(work, stage)
    wall = json.loads((orig_run / "manifest.json").read_text())["wall_time_s"]
    copy = tmp_path / "w"
    shutil.copytree(work, copy, ignore=lambda d, names: [stage] if os.path.samefile(d, work) else [],
                    symlinks=True)
    # evaluate scores the two pretrained models only (each model is scored on its own, so their scores must
    # equal the full run's): the same check at 2/5 of the cost
    sets = ("evaluate.models=[pretrain]",) if stage == "evaluate" else ()
    # dpo: a checkpoint every step (save_steps is not in the key: it changes no weight), and the kill comes
    # after the first one, so the restart resumes from trl's checkpoint rather than starting over
    ready = None
    if stage == "dpo":
        sets, ready = ("dpo.save_steps=1",), "dpo/*.partial/**/checkpoint-*/trainer_state.json"
    killed, r = _kill_then_restart(recipe, copy, stage, seed, wall * (0.4 if stage == "evaluate" else 1.0), sets,
                                   ready)
    assert killed, f"{stage} finished before the kill"
    assert r.returncode == 0, r.stderr[-3000:]
    if stage == "dpo":
        assert "resuming from checkpoint-" in r.stderr, r.stderr[-2000:]
    run, got = stage_metrics(copy, stage)
    # the key the same config and inputs give without a kill (pipeline.stage_states computes it from the recipe)
    want = {p.stage: p.key for p in stage_states(load_recipe(recipe, [f"workdir={copy}", *sets]))}[stage]
    assert run.name == want and (want == orig_run.name) == (stage != "evaluate")
    if stage == "synth":
        assert (run / "items.jsonl").read_text() == (orig_run / "items.jsonl").read_text()
    elif stage == "dpo":  # the uninterrupted run's weights, to float rounding (DPO_TOLERANCE)
        from safetensors.torch import load_file

        assert set(got["models"]) == set(orig["models"])
        for name in got["models"]:
            a, b = load_file(orig_run / name / "model.safetensors"), load_file(run / name / "model.safetensors")
            assert a.keys() == b.keys()
            worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            assert worst <= DPO_TOLERANCE, (name, worst)
    else:
        assert set(got["scores"]) == {"specialist", "generalist"}
        assert all(got[k][n] == orig[k][n] for k in ("benchmarks", "scores") for n in got["scores"])
