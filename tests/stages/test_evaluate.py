import json
import math

import pytest
import torch

from slmforge.artifacts import ArtifactStore
from slmforge.config import load_recipe
from slmforge.stages import evaluate
from slmforge.stages.evaluate import bits_per_byte
from tests.conftest import slmforge, small_recipe, write_recipe


def _tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_bits_per_byte_matches_a_hand_computation(tmp_path, small_corpus):
    from slmforge.stages.tokenizer import save_hf, train_bpe

    texts = [json.loads(x)["text"] for x in small_corpus["domain"].read_text().splitlines()[:5]]
    save_hf(train_bpe(iter(texts), 400), tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    model = _tiny_model(len(tok))
    with torch.no_grad():  # zero output layer: uniform predictions, log2(V) bits for every token
        model.lm_head.weight.zero_()
    texts = texts[:2]
    r = bits_per_byte(model, tok, texts, context=64, batch_size=3)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r["tokens"] == n_tokens and r["bytes"] == n_bytes
    assert math.isclose(r["bpb"], n_tokens * math.log2(len(tok)) / n_bytes, rel_tol=1e-3)
    assert math.isclose(r["ppl"], len(tok), rel_tol=1e-3)
    assert bits_per_byte(model, tok, texts, context=32, batch_size=1)["bpb"] == r["bpb"]  # windows don't matter here
    # each text's own bits per byte: its tokens at log2(V) bits over its bytes, whichever windows hold them
    for t, got in zip(texts, r["docs"]):
        n = len(tok(t, add_special_tokens=False)["input_ids"])
        assert math.isclose(got, n * math.log2(len(tok)) / len(t.encode()), rel_tol=1e-3)


def test_per_document_bits_add_up_to_the_total(tmp_path, small_corpus):
    """A trained-looking (random) model: the per-document figures, weighted by bytes, give bits per byte."""
    from transformers import AutoTokenizer

    from slmforge.stages.tokenizer import save_hf, train_bpe

    texts = [json.loads(x)["text"][:700] for x in small_corpus["domain"].read_text().splitlines()[:6]]
    save_hf(train_bpe(iter(texts), 400), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    torch.manual_seed(0)
    r = bits_per_byte(_tiny_model(len(tok)), tok, texts, context=48, batch_size=4)
    sizes = [len(t.encode()) for t in texts]
    assert len(r["docs"]) == len(texts) and len(set(r["docs"])) == len(texts)
    assert math.isclose(sum(d * n for d, n in zip(r["docs"], sizes)) / sum(sizes), r["bpb"], rel_tol=1e-3)


def test_the_chunked_head_gives_the_full_logits_loss():
    """lm.nll runs the LM head and the loss on a few tokens at a time: the same sum as the whole batch's
    logits, with -100 targets skipped."""
    import torch.nn.functional as F

    from slmforge.models.lm import nll

    torch.manual_seed(0)
    model = _tiny_model(300).eval()
    x = torch.randint(0, 300, (5, 24))
    y = torch.randint(0, 300, (5, 24))
    y[1, :5] = -100
    with torch.no_grad():
        full = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                               reduction="sum").item()
    for batch, chunk in ((2, 7), (5, 10_000), (1, 1)):
        assert nll(model, x, y, batch, chunk=chunk) == pytest.approx(full, rel=1e-5)


def test_dtype_auto_is_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    from slmforge import hardware
    from slmforge.stages.evaluate import weights_dtype

    monkeypatch.setattr(hardware, "use_bf16", lambda precision: True)
    assert weights_dtype("auto") == "bfloat16" and weights_dtype("float32") == "float32"
    monkeypatch.setattr(hardware, "use_bf16", lambda precision: False)  # AVX2 only: bf16 would be emulated
    assert weights_dtype("auto") == "float32" and weights_dtype("bfloat16") == "bfloat16"


def test_bfloat16_weights_score_with_float32_logits(tmp_path, small_corpus):
    from transformers import AutoTokenizer

    from slmforge.models.lm import float_logits
    from slmforge.models.modeling import load_model
    from slmforge.stages.tokenizer import save_hf, train_bpe

    texts = [json.loads(x)["text"] for x in small_corpus["domain"].read_text().splitlines()[:4]]
    save_hf(train_bpe(iter(texts), 400), tmp_path / "m")
    torch.manual_seed(0)
    _tiny_model(len(AutoTokenizer.from_pretrained(str(tmp_path / "m")))).save_pretrained(str(tmp_path / "m"))
    full = bits_per_byte(*float_logits(load_model(tmp_path / "m")), texts, context=64)
    model, tok = float_logits(load_model(tmp_path / "m", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32
    half = bits_per_byte(model, tok, texts, context=64)
    assert half["tokens"] == full["tokens"] and half["bpb"] == pytest.approx(full["bpb"], rel=5e-3)


def _manifest(workdir, stage):
    [run] = [p for p in (workdir / stage).iterdir() if p.is_dir() and not p.is_symlink()]
    return run, json.loads((run / "manifest.json").read_text())["metrics"]


def test_every_model_is_scored_twice_the_same_and_snapshots_are_picked_on_the_dev_set(model_run, tmp_path):
    recipe, workdir, r = model_run
    assert r.returncode == 0, r.stderr
    assert "bits per byte" in r.stdout and "better than the generalist" in r.stdout
    assert "domain benchmarks (lm-evaluation-harness)" in r.stdout and "quality gate" in r.stdout
    run, m = _manifest(workdir, "evaluate")
    assert set(m["scores"]) == {"specialist", "generalist"} and set(m["scores"]["specialist"]) == {"pg", "general"}
    assert {m["models"][n]["device"] for n in m["scores"]} == {"cpu"}  # device: auto, on a machine without a GPU
    tasks = {"slmforge_mcq", "slmforge_completion", "slmforge_qa", "slmforge_summarization"}
    assert set(m["benchmarks"]["specialist"]) == tasks and set(m["benchmarks"]["generalist"]) == tasks
    assert {"acc", "acc_norm", "acc_mutual_info"} <= set(m["benchmarks"]["specialist"]["slmforge_completion"])
    # the score is the mean of the per-item outcomes kept beside it: every item scored once, right or wrong
    per = json.loads((run / "results.json").read_text())["outcomes"]["specialist"]["slmforge_mcq"]["acc"]
    assert len(per) == m["bench_sizes"]["mcq"] and set(per) <= {0.0, 1.0}
    assert m["benchmarks"]["specialist"]["slmforge_mcq"]["acc"] == round(sum(per) / len(per), 4)
    # two snapshots and the final weights, scored on the dev set built from the val split
    for name in ("specialist", "generalist"):
        sel = m["selection"][name]
        assert len(sel["scores"]) == 3 and "final" in sel["scores"] and sel["chosen"] in sel["scores"]
        order = sorted(k for k in sel["scores"] if k != "final") + ["final"]  # training order
        within = [k for k in order if sel["scores"][k] >= max(sel["scores"].values()) - sel["standard_error"]]
        assert sel["chosen"] == within[-1]  # the latest snapshot the dev set cannot tell from the best
    gate = m["gate"]
    assert [c["set"] for c in gate["checks"]] == ["mcq", "completion"]
    for c in gate["checks"]:  # against the scratch generalist (the only rival here), McNemar on the same items
        assert c["b"] == "generalist" and c["test"].startswith("McNemar") and c["passed"] == (c["verdict"] == "passed")
        assert c["verdict"] == ("not shown" if c["p_value"] >= 0.05 or c["a_score"] <= c["chance"] else
                                "passed" if c["a_score"] > c["b_score"] else "failed")
    # scored again, in a fresh store (the shared run stays read-only): the same numbers
    store = ArtifactStore(workdir)
    cfg = load_recipe(recipe).stages["evaluate"]
    again = evaluate.run(cfg, ArtifactStore(tmp_path / "again"), {s: store.resolve(f"{s}:latest")
                                                                  for s in evaluate.needs(cfg)})
    m2 = again.manifest["metrics"]
    assert m2["scores"] == m["scores"] and m2["benchmarks"] == m["benchmarks"] and m2["selection"] == m["selection"]
    model_dir = next((workdir / "pretrain").glob("*/specialist"))
    out = slmforge("chat", str(model_dir), "--prompt", "SELECT", "--max-new-tokens", "5")
    assert out.returncode == 0 and out.stdout.startswith("> SELECT\n")  # the prompt quoted, the answer below
    out = slmforge("chat", str(model_dir), "--prompt", "Hi", "--chat", "--sample", "--max-new-tokens", "5")
    assert out.returncode == 0 and out.stdout.startswith("> Hi\n")


class OracleServer:
    """An OpenAI-compatible chat endpoint that knows the benchmark's references: lm-eval's requests
    reach it and its answers are scored (exact match 1, ROUGE-L 1)."""

    def __init__(self, tasks_dir):
        from tests.fake_openai import FakeServer

        self.refs = {}
        for line in (tasks_dir / "qa.jsonl").read_text().splitlines():
            it = json.loads(line)
            self.refs[it["question"]] = it["answer"]
        for line in (tasks_dir / "summarization.jsonl").read_text().splitlines():
            it = json.loads(line)
            self.refs[it["document"]] = it["summary"]
        self.fake = FakeServer()
        self.fake.answer = self.answer
        self.url = self.fake.url
        self.seen = []

    def answer(self, path, body, auth):
        prompt = body["messages"][-1]["content"]
        self.seen.append((path, auth))
        reply = next((a for q, a in self.refs.items() if q in prompt), "no idea")
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5}}, {}


def test_an_openai_compatible_endpoint_is_scored_through_lm_eval(benched, monkeypatch, tmp_path):
    _, workdir, r = benched
    assert r.returncode == 0, r.stderr
    store = ArtifactStore(workdir)
    bench = store.resolve("bench:latest")
    server = OracleServer(bench.path / "tasks")
    monkeypatch.setenv("ORACLE_KEY", "sk-test")
    try:
        cfg = evaluate.Config(models=[{"name": "oracle", "base_url": server.url, "api": "chat",
                                       "api_key_env": "ORACLE_KEY"}], samples=1)
        art = evaluate.run(cfg, ArtifactStore(tmp_path / "w"), {"curate": store.resolve("curate:latest"), "bench": bench})
    finally:
        server.fake.close()
    m = art.manifest["metrics"]
    assert set(m["benchmarks"]["oracle"]) == {"slmforge_qa", "slmforge_summarization"}  # no log-likelihoods
    assert m["benchmarks"]["oracle"]["slmforge_qa"]["exact_match"] == 1.0
    assert m["benchmarks"]["oracle"]["slmforge_summarization"]["rougeL"] == pytest.approx(1.0)
    assert "generation tasks" in m["models"]["oracle"]["note"] and m["scores"] == {}
    assert server.seen and all(p == "/v1/chat/completions" and a == "Bearer sk-test" for p, a in server.seen)


def test_model_entries_are_checked_with_the_recipe(tmp_path, small_corpus):
    from slmforge.config import load_recipe
    from slmforge.errors import UserError

    recipe = small_recipe(small_corpus, tmp_path / "w", with_model=True)
    recipe["evaluate"]["models"] = ["pretrian", {"name": "x", "path": "a", "base_url": "http://h/v1"},
                                    {"name": "y", "base_url": "http://h/v1"}]
    with pytest.raises(UserError) as e:
        load_recipe(write_recipe(tmp_path, recipe))
    assert "'pretrian': not a stage that makes models" in str(e.value)
    recipe["evaluate"]["models"] = [{"name": "x", "path": "a", "base_url": "http://h/v1"}]
    with pytest.raises(UserError, match="give one of `path`"):
        load_recipe(write_recipe(tmp_path, recipe))
    recipe["evaluate"]["models"] = [{"name": "y", "base_url": "http://h/v1"}]
    with pytest.raises(UserError, match="needs `tokenizer:`"):
        load_recipe(write_recipe(tmp_path, recipe))
    recipe["evaluate"]["models"] = ["pretrain"]
    del recipe["pretrain"]
    with pytest.raises(UserError, match="evaluate: needs the pretrain stage's output"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_a_judge_grades_qa_answers_next_to_f1(benched, tmp_path):
    """Two chat endpoints (one knows every reference, one answers "no idea") and a judge server: the
    judge's score, its prompt and its agreement with F1 >= 0.5 land in the metrics."""
    import re as _re

    from slmforge.synthetic import judge
    from tests.fake_openai import FakeServer

    _, workdir, r = benched
    assert r.returncode == 0, r.stderr
    store = ArtifactStore(workdir)
    bench = store.resolve("bench:latest")
    oracle, clueless, judged = OracleServer(bench.path / "tasks"), OracleServer(bench.path / "tasks"), []
    clueless.refs = {}  # answers "no idea" to everything

    def verdict(path, body, auth):
        prompt = body["messages"][-1]["content"]
        ref = _re.search(r"Reference answer: (.*)\n", prompt).group(1)
        ans = _re.search(r"Answer to grade: (.*)\n", prompt).group(1)
        judged.append(prompt)
        yes = bool(set(ref.lower().split()) & set(ans.lower().split()) - {"the", "a", "of"})
        return 200, {"id": "j", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                         "role": "assistant", "content": json.dumps({"verdict": "yes" if yes else "no"})}}],
                     "usage": {"prompt_tokens": 50, "completion_tokens": 3}}, {}

    judge_server = FakeServer()
    judge_server.answer = verdict
    try:
        cfg = evaluate.Config(models=[{"name": "oracle", "base_url": oracle.url, "api": "chat"},
                                      {"name": "clueless", "base_url": clueless.url, "api": "chat"}],
                              samples=0, judge={"base_url": judge_server.url, "model": "big-judge", "sample": 5})
        art = evaluate.run(cfg, ArtifactStore(tmp_path / "w"), {"curate": store.resolve("curate:latest"), "bench": bench})
    finally:
        oracle.fake.close()
        clueless.fake.close()
        judge_server.close()
    m = art.manifest["metrics"]
    qa = "slmforge_qa"
    assert m["benchmarks"]["oracle"][qa]["judge"] == 1.0 and m["benchmarks"]["clueless"][qa]["judge"] == 0.0
    assert len(judged) == 10 and all("Question: " in p for p in judged)
    j = m["judge"]
    assert j["model"] == "big-judge" and j["prompt"] == judge.VERDICT_PROMPT
    assert j["per_model"]["oracle"] == {"items": 5, "unparsed": 0, "judge_correct": 1.0, "f1_correct": 1.0,
                                        "agreement": 1.0, "kappa": 1.0}
    assert j["pooled"]["items"] == 10 and j["pooled"]["kappa"] == 1.0
    assert judge.agreement([True, True, False, None], [0.9, 0.1, 0.2, 1.0]) == {
        "items": 3, "unparsed": 1, "judge_correct": 0.6667, "f1_correct": 0.3333, "agreement": 0.6667, "kappa": 0.4}
