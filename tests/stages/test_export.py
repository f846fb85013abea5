import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from slmforge.records import read_documents


@pytest.fixture(scope="module")
def exported(posttrained, tmp_path_factory):
    """The post-trained run copied (the fixture is read-only), then `specialist` and `dpo` exported:
    (store, export artifact, workdir copy)."""
    from slmforge.artifacts import ArtifactStore
    from slmforge.stages import export

    _, workdir = posttrained
    work = tmp_path_factory.mktemp("export") / "w"
    shutil.copytree(workdir, work, symlinks=True)
    store = ArtifactStore(work)
    cfg = export.Config.model_validate({"models": ["specialist", "dpo"], "gguf": "f16", "router_docs": 5},
                                       context={"recipe_name": "t"})
    return store, export.run(cfg, store), work


def _greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=2)[0].tolist()


def test_the_hf_folder_loads_with_transformers_and_generates_like_the_source(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmforge.models.modeling import load_model

    store, art, _ = exported
    folder = art.path / "t-dpo"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "slmforge.json", "Modelfile"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    source, stok = load_model(store.resolve("dpo:latest").path / "dpo")
    for prompt in ("The VACUUM command", "SELECT * FROM"):
        assert tok(prompt)["input_ids"] == stok(prompt)["input_ids"]
        assert _greedy(model, tok(prompt, return_tensors="pt")) == _greedy(source, stok(prompt, return_tensors="pt"))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        stok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_the_tokenizer_files_are_what_transformers_4_and_minijinja_servers_read(exported):
    """tokenizer_config.json against what transformers 4.x requires (4.57 loads these files: README), the
    plain template rendered by MiniJinja (TGI's engine) to one BOS the way slmforge.models.chat says; a base
    model gets no template."""
    from minijinja import Environment
    from transformers import AutoTokenizer

    _, art, _ = exported
    folder = art.path / "t-dpo"
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in cfg  # 4.x: a dict
    assert cfg["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert type(cfg["model_max_length"]) is int and cfg["model_max_length"] == 64  # the model's context
    assert not {"is_local", "local_files_only"} & set(cfg)
    template = (folder / "chat_template.jinja").read_text()
    assert cfg["chat_template"] == template and "generation %}" not in template and "[label] " in template
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    chat = [{"role": "user", "content": "What does VACUUM do?"}]
    text = Environment().render_str(template, messages=chat, bos_token=cfg["bos_token"], add_generation_prompt=True)
    assert text == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids == list(tok.apply_chat_template(
        chat, add_generation_prompt=True, return_dict=True)["input_ids"])
    base = json.loads((art.path / "t-specialist" / "tokenizer_config.json").read_text())
    assert "chat_template" not in base and not (art.path / "t-specialist" / "chat_template.jinja").exists()
    assert base["model_max_length"] == 64


def test_the_folder_has_what_vllm_serve_loads(exported):
    """`vllm serve FOLDER` reads what transformers reads, plus: config.json's `architectures` (its model
    registry key; LlamaForCausalLM is supported), a dtype, the safetensors weights, generation_config.json's
    EOS ids (its default stop tokens), and, for /v1/chat/completions, the tokenizer's chat template."""
    from safetensors import safe_open

    _, art, _ = exported
    folder = art.path / "t-dpo"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg.get("dtype") or cfg.get("torch_dtype")) in ("float32", "bfloat16", "float16")
    assert cfg["max_position_embeddings"] == 64 and cfg["vocab_size"] >= len(json.loads(
        (folder / "tokenizer.json").read_text())["model"]["vocab"])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and all(n.startswith(("model.", "lm_head.")) for n in names)
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert ids["<|im_end|>"] in eos and tok["chat_template"]


def test_the_card_gives_lm_eval_commands_that_load_from_the_folder(exported, monkeypatch):
    """The card's commands name the bench's test tasks and `eval/` holds them, their data named relative
    to the folder: lm-eval's TaskManager loads each from there with every item."""
    from lm_eval.tasks import TaskManager, get_task_dict

    store, art, _ = exported
    bench = store.resolve("bench:latest").manifest["metrics"]
    for name, chat in (("t-dpo", True), ("t-specialist", False)):
        folder = art.path / name
        ev = json.loads((folder / "slmforge.json").read_text())["eval"]
        card = (folder / "README.md").read_text()
        assert ev["include_path"] == "eval" and sorted(ev["tasks"]) == sorted(bench["tasks"])
        named = set()
        for cmd in ev["commands"]:
            assert cmd in card and cmd.startswith("lm-eval run --model hf --model_args pretrained=.,dtype=")
            assert "--include_path eval " in cmd and "--device cpu" in cmd and "--seed 0,0,0,0" in cmd
            named |= set(cmd.split("--tasks ")[1].split(" --")[0].split())
        assert named == set(bench["tasks"])
        assert ("--apply_chat_template" in card) is chat and bool(ev["chat_template"]) is chat
        assert ("through the chat template" in card) is chat and "## Reproducing the scores" in card
        monkeypatch.chdir(folder)
        tasks = get_task_dict(list(ev["tasks"]), TaskManager(include_path=ev["include_path"], include_defaults=False))
        assert {t: len(list(tasks[t].test_docs())) for t in tasks} == \
            {t: bench["sizes"][t.removeprefix("slmforge_")] for t in bench["tasks"]}


def test_the_card_has_front_matter_and_scores_the_hub_reads(exported):
    from huggingface_hub import ModelCard

    store, art, _ = exported
    text = (art.path / "t-dpo" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert "license" not in front  # not known unless export.license says it
    doc = json.loads((art.path / "t-dpo" / "slmforge.json").read_text())
    assert (front["domain"], front["parameters"], front["training_tokens"]) == \
        ("pg", doc["params"], doc["training_tokens"]) and doc["training_tokens"] > 0
    assert front["training_data"] == {"sources": ["pg", "general"], "stages": ["pretrain", "sft", "dpo"]}
    results = json.loads((store.resolve("evaluate:latest").path / "results.json").read_text())
    card = ModelCard.load(art.path / "t-dpo" / "README.md")
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    mcq = results["benchmarks"]["dpo"]["slmforge_mcq"]["acc"]
    assert got[("slmforge_mcq", "acc")] == mcq
    assert got[("slmforge_pg", "bpb")] == results["scores"]["dpo"]["pg"]["bpb"]
    assert f"| mcq · acc (headline) | {mcq:.3f} | {results['benchmarks']['generalist']['slmforge_mcq']['acc']:.3f} |" \
        in text
    assert "ollama create t-dpo -f Modelfile" in text


def test_slmforge_json_describes_the_export(exported):
    from slmforge.deploy.gguf import llama_cpp_available

    store, art, _ = exported
    results = json.loads((store.resolve("evaluate:latest").path / "results.json").read_text())
    for name, model, chat in (("t-dpo", "dpo", True), ("t-specialist", "specialist", False)):
        doc = json.loads((art.path / name / "slmforge.json").read_text())
        assert doc["format"] == 1 and doc["name"] == name and doc["domain"] == "pg" and doc["chat"] is chat
        assert doc["context"] == 64 and doc["tokenizer"] == {"type": "byte-level BPE", "vocab_size": 600}
        assert doc["params"] == results["models"][model]["shape"]["params"]
        assert doc["scores"]["mcq/acc"] == results["benchmarks"][model]["slmforge_mcq"]["acc"]
        assert doc["scores"]["bpb/general"] == results["scores"][model]["general"]["bpb"]
        assert doc["gguf"] == f"{name}.f16.gguf" and (art.path / name / doc["gguf"]).is_file()
        assert llama_cpp_available() and doc["gguf_verified"] is True  # xllamacpp comes with make setup
        assert doc["gguf_check"]["engine"].startswith("xllamacpp ") and doc["gguf_check"]["exact"]
        assert doc["router"] == {"train": "domain/train.jsonl", "test": "domain/test.jsonl"}
        assert doc["lineage"]["model"] == model and doc["lineage"]["recipe"] == "t"
        assert set(doc["lineage"]["stages"]) >= {"ingest", "curate", "tokenizer", "pretrain", "evaluate"}
    dpo = json.loads((art.path / "t-dpo" / "slmforge.json").read_text())
    assert dpo["lineage"]["stages"]["dpo"] == store.resolve("dpo:latest").key
    assert dpo["lineage"]["stages"]["sft"] == store.resolve("sft:latest").key
    pre = store.resolve("pretrain:latest").manifest["metrics"]["models"]["specialist"]["tokens"]
    sft = store.resolve("sft:latest").manifest["metrics"]["models"]["sft-rationale"]["tokens"]
    own = store.resolve("dpo:latest").manifest["metrics"]["models"]["dpo"]["tokens"]
    assert own > 0 and dpo["training_tokens"] == pre + sft + own  # the lineage's tokens, dpo's pairs included


def test_domain_samples_come_from_the_train_and_test_splits(exported):
    store, art, _ = exported
    curate = store.resolve("curate:latest")
    split = {s: {r["text"] for r in read_documents(curate.path / "data" / s, "pg", columns=["text"])}
             for s in ("train", "test")}
    general = {r["text"] for r in read_documents(curate.path / "data" / "train", "general", columns=["text"])}
    for part in ("train", "test"):
        rows = [json.loads(x) for x in (art.path / "t-dpo" / "domain" / f"{part}.jsonl").read_text().splitlines()]
        assert len(rows) == min(5, len(split[part]))
        for r in rows:  # each row is a document of the right split (cut at 4000 chars), never a general one
            assert any(t.startswith(r["text"]) for t in split[part])
            assert not any(t.startswith(r["text"]) for t in general)
    test = (art.path / "t-dpo" / "domain" / "test.jsonl").read_text()
    train = (art.path / "t-dpo" / "domain" / "train.jsonl").read_text()
    assert not set(test.splitlines()) & set(train.splitlines())


def test_the_gguf_reads_back_with_the_weights_and_tokenizer(exported):
    import gguf
    from safetensors.numpy import load_file

    _, art, _ = exported
    folder = art.path / "t-dpo"
    cfg = json.loads((folder / "config.json").read_text())
    r = gguf.GGUFReader(folder / "t-dpo.f16.gguf")
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == cfg["num_hidden_layers"]
    assert meta["llama.embedding_length"] == cfg["hidden_size"] and meta["llama.context_length"] == 64
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["tokenizer.ggml.add_bos_token"] is True
    assert "{% generation %}" not in meta["tokenizer.chat_template"] and "[label] " in meta["tokenizer.chat_template"]
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tj["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"][:6] == [3, 3, 3, 3, 3, 1]  # specials are CONTROL
    assert len(meta["tokenizer.ggml.merges"]) == len(tj["model"]["merges"])
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 + 9 * cfg["num_hidden_layers"]  # embeddings, final norm; tied output omitted
    hf = load_file(folder / "model.safetensors")
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16 and list(q.shape[::-1]) == list(hf[
        "model.layers.1.self_attn.q_proj.weight"].shape)
    # RoPE pairs: llama.cpp rotates adjacent rows (2i, 2i+1) of each head, HF rows (i, i + d/2): GGUF row
    # h*d + j is HF row h*d + j//2 + (j%2)*d/2 (stated here by index, not with slmforge's own _permute)
    n_head = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // n_head
    rows = [h * d + j // 2 + (j % 2) * (d // 2) for h in range(n_head) for j in range(d)]
    want = hf["model.layers.1.self_attn.q_proj.weight"][rows].astype(np.float16)
    np.testing.assert_array_equal(np.asarray(q.data).reshape(want.shape), want)
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(norm.data, hf["model.layers.0.input_layernorm.weight"])


def test_the_modelfile_uses_the_chat_format(exported):
    _, art, _ = exported
    chat = (art.path / "t-dpo" / "Modelfile").read_text()
    assert chat.startswith("FROM ./t-dpo.f16.gguf") and "<|im_start|>{{ .Role }}" in chat
    assert '[label] ' in chat and 'PARAMETER stop "<|im_end|>"' in chat and "PARAMETER num_ctx 64" in chat
    base = (art.path / "t-specialist" / "Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in base and "<|im_start|>" not in base


def test_bad_settings_give_one_clear_error():
    from pydantic import ValidationError

    from slmforge.config import format_errors
    from slmforge.stages import export

    with pytest.raises(ValidationError) as e:
        export.Config.model_validate({"models": ["specialst", "dpo"]})
    (msg,) = format_errors("export", e.value)
    assert msg.startswith("export.models: ") and "'specialst'" in msg and "specialist, generalist, pruned, pruned-kd" in msg
    with pytest.raises(ValidationError) as e:
        export.Config.model_validate({"models": ["dpo"], "names": {"dpo": "Bad Name"}})
    assert "'Bad Name' must be" in format_errors("export", e.value)[0]
    assert export.Config.model_validate({}, context={"recipe_name": "Demo"}).export_name("specialist") == \
        "demo-specialist"
    assert export.Config().export_name("dpo") == "dpo"
    assert export.needs(export.Config(models=["dpo", "specialist"])) == ("curate", "evaluate", "dpo", "pretrain")


def test_a_recorded_base_reads_as_stage_key_and_model(tmp_path):
    """The lineage export puts on the card: a model stage's `base` (a path today, {stage, key, model} too),
    followed through the store; a base outside the store ends the chain."""
    from slmforge.artifacts import ArtifactStore
    from slmforge.records import ModelBase, model_lineage

    assert ModelBase.read(str(tmp_path / "sft" / "k1" / "sft-rationale")) == ModelBase("sft", "k1", "sft-rationale")
    assert ModelBase.read({"stage": "pretrain", "key": "k0", "model": "specialist"}) == \
        ModelBase("pretrain", "k0", "specialist")
    assert ModelBase.read(str(tmp_path / "my-hf-model")) is None and ModelBase.read(None) is None
    store = ArtifactStore(tmp_path)
    for stage, key, models in (("pretrain", "k0", {"specialist": {"tokens": 100}}),
                               ("sft", "k1", {"sft": {"tokens": 7, "base": str(tmp_path / "pretrain/k0/specialist")}}),
                               ("dpo", "k2", {"dpo": {"tokens": 0, "base": str(tmp_path / "sft/k1/sft")}})):
        (tmp_path / stage / key).mkdir(parents=True)
        (tmp_path / stage / key / "manifest.json").write_text(json.dumps({"metrics": {"models": models}}))
    chain = model_lineage(store, "dpo", "k2", "dpo")
    assert [(c.stage, c.key, c.model, c.tokens) for c in chain] == \
        [("pretrain", "k0", "specialist", 100), ("sft", "k1", "sft", 7), ("dpo", "k2", "dpo", 0)]
    assert [c.stage for c in model_lineage(store, "sft", "k9", "sft")] == []  # not in the store


def test_llama_cpp_decodes_the_gguf_like_transformers(exported, tmp_path):
    """llama.cpp (xllamacpp): f32 and f16 files give transformers' greedy tokens and llama.cpp renders the
    chat template to transformers' tokens (one BOS); q8_0 is reported."""
    from transformers import AutoTokenizer

    from slmforge.deploy.gguf import verify_gguf, verify_prompts, write_gguf

    store, art, _ = exported
    folder = art.path / "t-dpo"
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    curate = store.resolve("curate:latest")
    texts = [r["text"] for r in read_documents(curate.path / "data" / "test", "pg", columns=["text"])][:3]
    prompts = verify_prompts(tok, texts, chat=True)
    assert len(prompts) == 4 and "<|im_start|>" in prompts[-1]
    report = {}
    for outtype in ("f32", "f16", "q8_0"):
        path = write_gguf(folder, tmp_path / f"m.{outtype}.gguf", outtype, "t")
        v = verify_gguf(tmp_path / path["file"], folder, outtype, prompts, context=64, chat=True)
        assert v["tokenization_equal"] and v["chat_template_equal"], v
        assert v["chat"]["llama_cpp"].count(tok.bos_token_id) == 1, v["chat"]
        if outtype != "q8_0":
            assert v["passed"] and v["exact"], v
            assert all(r["matching_prefix"] == 16 for r in v["prompts"]), v  # no near ties on these prompts
        report[outtype] = v["agreement"]
    print("llama.cpp greedy agreement with transformers:", report)


def test_the_gguf_pre_tokenizer_is_the_tokenizer_jsons(exported, tmp_path):
    """A GPT-2 ByteLevel pre-tokenizer (SmolLM2's, as transformers reads its GGUF) is written as llama.cpp's
    "gpt-2": llama.cpp then splits like transformers where "llama-bpe" would not ("_foreign", "\\n\\nThe");
    an unknown pre-tokenizer is refused instead of written wrong."""
    from tokenizers import Tokenizer

    from slmforge.deploy.gguf import LlamaCpp, pre_tokenizer, write_gguf
    from slmforge.errors import UserError

    _, art, _ = exported
    folder = tmp_path / "gpt2-pre"
    shutil.copytree(art.path / "t-dpo", folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    assert pre_tokenizer(tj, folder) == "llama-bpe"
    llama3 = Tokenizer.from_str(json.dumps(tj))
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    gpt2 = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "53.25. pg_foreign_table\n\nThe catalog's  rows:\t1234 dn't"
    assert gpt2.encode(text).ids != llama3.encode(text).ids  # the two pre-tokenizers differ on this text
    path = tmp_path / "m.gguf"
    write_gguf(folder, path, "f32", "t")
    cpp = LlamaCpp(path, context=64)
    try:
        assert cpp.tokenize(text) == gpt2.encode(text).ids
    finally:
        cpp.close()
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(UserError, match="tokenizer.json: GGUF export knows the pre-tokenizers"):
        pre_tokenizer(tj, folder / "tokenizer.json")


def test_slmforge_export_from_a_recipe(posttrained, tmp_path):
    """The CLI verb on a copy of the post-trained run: names from the recipe, q8_0, one error for a bad model."""
    from tests.conftest import slmforge

    recipe_path, workdir = posttrained
    shutil.copytree(workdir, tmp_path / "w", symlinks=True)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["workdir"] = str(tmp_path / "w")
    recipe["export"] = {"models": ["sft"], "gguf": "q8_0", "verify": False, "router_docs": 3,
                        "catalog": str(tmp_path / "catalog.db")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    r = slmforge("export", "--recipe", str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    folder = tmp_path / "w" / "export" / "latest" / "t-sft"
    doc = json.loads((folder / "slmforge.json").read_text())
    assert doc["gguf"] == "t-sft.q8_0.gguf" and doc["gguf_verified"] is None and doc["lineage"]["recipe"] == "t"
    assert (folder / "t-sft.q8_0.gguf").stat().st_size < 0.5 * (folder / "model.safetensors").stat().st_size
    from slmforge.deploy.catalog import Catalog

    entry = Catalog(tmp_path / "catalog.db").get("t-sft")  # export added it, validated, to the catalog
    assert entry.path == folder.resolve() and entry.domain == doc["domain"] and entry.scores == doc["scores"]
    assert entry.router == doc["router"] and entry.gguf == "t-sft.q8_0.gguf"
    bad = slmforge("export", "--recipe", str(path), "--set", "export.models=[specialst]")
    assert bad.returncode == 2
    assert bad.stderr.count("export.models: ") == 1 and "'specialst'" in bad.stderr, bad.stderr


def test_slmforge_llama_server_serves_the_gguf_over_the_openai_api(exported, tmp_path):
    """`slmforge llama-server FILE`: llama.cpp's server (xllamacpp) answers the official client under the
    file's model name, as serve.fallback would call it; a missing file exits 2 naming it."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import openai

    _, art, _ = exported
    gguf_file = art.path / "t-dpo" / "t-dpo.f16.gguf"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "slmforge.cli", "llama-server", str(gguf_file), "--port",
                             str(port), "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["t-dpo"]
        msgs = [{"role": "user", "content": "What does VACUUM do?"}]
        r = c.chat.completions.create(model="t-dpo", messages=msgs, max_tokens=8, temperature=0)
        from slmforge.models.lm import generate
        from slmforge.models.modeling import load_model

        model, tok = load_model(art.path / "t-dpo")  # transformers' greedy answer on the same chat prompt
        assert 1 <= r.usage.completion_tokens <= 8
        assert r.choices[0].message.content == generate(model, tok, msgs, 8), r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "slmforge.cli", "llama-server", str(tmp_path / "nope.gguf")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "nope.gguf: no such GGUF file" in bad.stderr
