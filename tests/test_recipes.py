"""The GPU recipes (recipes/gpu-*.yaml) run, shrunk to a tiny size on CPU, so that they cannot rot.

Each recipe goes through `slmforge run RECIPE --until STAGE` (dpo; pretrain for the DAPT recipe) in
a fresh process, as a user would start it, with the `--set` overrides below and nothing else changed:
its own sources (each cut to a few documents), its stage sections, and its synth teacher, `teacher:
openai`, pointed at a local fake OpenAI-compatible server (tests/fake_openai.py's GroundedServer) in
place of vLLM, so that the openai teacher path itself runs. A key a recipe sets that the code no
longer accepts fails the run (and tests/test_config.py, which loads every recipe as it is). Not tested
here: any GPU, bf16, torch.compile, more than one process (gpu-8x's `parallel: fsdp` is a no-op in
one), the Slurm and Ray executors, a real vLLM server, and the stages after dpo (bench, evaluate,
report, export).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

from slmforge.config import load_recipe
from tests.conftest import REPO, slmforge

RECIPES = REPO / "recipes"
GPU_RECIPES = ["gpu-1x.yaml", "gpu-1x-dapt.yaml", "gpu-8x.yaml"]
DOCS = {"domain": 25, "general": 4}  # documents read per source, by role

# What is shrunk, for every recipe. {workdir}, {sources} and {url} are filled in by the test.
SHRINK = [
    "workdir={workdir}",
    "ingest.sources={sources}",              # the recipe's own sources, each with `limit:` DOCS[role]
    "curate.executor=local",
    "curate.workers=1",
    "curate.val_fraction=0.2",               # the recipes' 1% of 29 documents would be an empty split
    "curate.test_fraction=0.2",
    "tokenizer.vocab_size=600",
    "pretrain.precision=fp32",
    "pretrain.compile=false",
    "pretrain.eval_every=4",
    "pretrain.eval_tokens=512",
    "pretrain.log_every=2",
    "synth.openai.base_urls=[{url}]",        # the fake server instead of vLLM
    "synth.openai.concurrency=4",
    "synth.max_chunks=6",
    "sft.max_steps=2",
    "sft.batch_size=4",
    "sft.max_length=64",
    "dpo.max_steps=2",
    "dpo.batch_size=4",
    "dpo.max_length=64",
]
TINY = "pretrain.model={{depth: 2, aspect: 16, head_dim: 16, context: 64}}"
# ... and per recipe: the model, the token budget (steps = tokens / batch_tokens), and the last stage run.
# The DAPT recipe trains the real SmolLM2-135M (134.5M parameters, fp32 on CPU: ~30 s for 2 steps here),
# so it stops after pretrain: its SFT alone took ~3 minutes (sft and sft-rationale, 2 steps each).
PER_RECIPE = {
    "gpu-1x.yaml": ([TINY, "pretrain.tokens=8k", "pretrain.batch_tokens=1024"], 8, "dpo"),
    "gpu-1x-dapt.yaml": (["pretrain.model={{context: 64}}", "pretrain.tokens=256",
                          "pretrain.batch_tokens=128"], 2, "pretrain"),
    "gpu-8x.yaml": ([TINY, "pretrain.tokens=8k", "pretrain.batch_tokens=1024"], 8, "dpo"),
}
# The domain size each recipe's header plans for (`slmforge plan ... --domain-tokens N`).
PLANNED_DOMAIN_TOKENS = {"gpu-1x.yaml": 1e9, "gpu-8x.yaml": 1e10}


def _raw(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text(encoding="utf-8"))


def _overrides(name: str, workdir: Path, url: str) -> list[str]:
    sources = [{**s, "limit": DOCS[s.get("role", "domain")]} for s in _raw(name)["ingest"]["sources"]]
    fill = {"workdir": workdir, "sources": json.dumps(sources), "url": url}
    return [s.format(**fill) for s in SHRINK + PER_RECIPE[name][0]]


def test_every_gpu_recipe_is_tested():
    assert sorted(p.name for p in RECIPES.glob("gpu-*.yaml")) == sorted(GPU_RECIPES)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One workdir for the three runs: after the overrides their ingest, curate and tokenizer sections
    are the same (and gpu-1x-dapt's plan and synth are gpu-1x's, as the recipe intends), so a later run
    finds those stages cached by their keys, exactly as a user's second recipe would."""
    return tmp_path_factory.mktemp("gpu-recipes") / "w"


def _metrics(work: Path, stage: str) -> tuple[Path, dict]:
    """The run of `stage` the last `slmforge run` made or found cached (<workdir>/<stage>/latest)."""
    run = (work / stage / "latest").resolve()
    return run, json.loads((run / "manifest.json").read_text())["metrics"]


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_runs_at_a_tiny_size_on_cpu(name, work):
    from tests.fake_openai import GroundedServer

    recipe = RECIPES / name
    shipped = load_recipe(recipe)  # as it is, before any override
    _, steps, until = PER_RECIPE[name]
    server = GroundedServer()
    try:
        args = [x for s in _overrides(name, work, server.url) for x in ("--set", s)]
        t0 = time.time()
        r = slmforge("run", str(recipe), "--until", until, *args, timeout=240)
        took = time.time() - t0
    finally:
        server.fake.close()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    print(f"{name}: ingest .. {until} in {took:.0f} s (stages an earlier run made: cached)")

    _, synth = _metrics(work, "synth")  # the openai teacher, through a fake server (this one, or an
    assert synth["teacher"] == "openai" and synth["teacher_stats"]["requests"] > 0  # earlier run's)
    assert sum(synth["kept"].values()) > 0
    _, plan = _metrics(work, "plan")  # the recipe's budget, counted on the tiny corpus
    assert plan["budget_flops"] > 0 and plan["params"] > 0

    _, pre = _metrics(work, "pretrain")
    control = ["recovered"] if shipped.stages["pretrain"].init_from else []  # DAPT's control; scratch: baseline false
    assert sorted(pre["models"]) == sorted(["specialist", *control])
    spec = pre["models"]["specialist"]
    assert spec["steps"] == steps and math.isfinite(spec["final_loss"]) and not pre["bf16"]
    if shipped.stages["pretrain"].init_from:
        assert pre["init_from"]["base"] == shipped.stages["pretrain"].init_from
        assert spec["shape"]["context"] == 64 and spec["shape"]["params"] > 100e6  # the real base
    else:
        assert spec["shape"]["depth"] == 2
    for stage in ("sft", "dpo")[: ("pretrain", "sft", "dpo").index(until)]:
        run, _ = _metrics(work, stage)
        assert any((p / "model.safetensors").is_file() for p in run.iterdir() if p.is_dir()), stage


def test_gpu_recipes_keep_their_shipped_settings():
    """What the tiny run overrides is set as the headers say: bf16, compile, the vLLM teacher, FSDP."""
    for name in GPU_RECIPES:
        r = load_recipe(RECIPES / name)
        pre, synth = r.stages["pretrain"], r.stages["synth"]
        assert pre.precision == "bf16" and pre.compile, name
        assert synth.teacher == "openai", name
        assert synth.openai.base_urls[0].startswith("http://localhost:800"), name
        assert r.stages["curate"].executor == "local", name  # the cluster executors are commented examples
    assert load_recipe(RECIPES / "gpu-8x.yaml").stages["pretrain"].parallel == "fsdp"
    assert load_recipe(RECIPES / "gpu-1x-dapt.yaml").stages["pretrain"].init_from == "smollm2-135m"


def test_the_dapt_twin_shares_the_data_stages_of_gpu_1x():
    """gpu-1x-dapt.yaml says it reuses gpu-1x.yaml's cached data stages: same workdir, same sections."""
    one, dapt = _raw("gpu-1x.yaml"), _raw("gpu-1x-dapt.yaml")
    assert one["workdir"] == dapt["workdir"]
    for section in ("ingest", "curate", "tokenizer", "plan", "synth", "bench"):
        assert one[section] == dapt[section], section


@pytest.mark.parametrize("name", sorted(PLANNED_DOMAIN_TOKENS))
def test_the_scratch_size_is_what_plan_recommends(name):
    """model.params and tokens are `plan`'s answer for the recipe's plan section and the domain size its
    header plans for."""
    from slmforge.models.modeling import parse_count
    from slmforge.stages.plan import budget_flops, recommend

    r = load_recipe(RECIPES / name)
    p, pre = r.stages["plan"], r.stages["pretrain"]
    flops, _ = budget_flops(p.flops, p.hours, p.device, p.peak_flops, p.mfu, p.n_devices)
    rec = recommend(flops, PLANNED_DOMAIN_TOKENS[name], p.inference_tokens, p.max_epochs)
    assert parse_count(pre.model.params) == pytest.approx(rec["params"], rel=0.01)
    assert parse_count(pre.tokens) == pytest.approx(rec["tokens"], rel=0.01)
