import json
import os

import pytest
import yaml

from slmforge.artifacts import ArtifactStore
from slmforge.config import load_recipe
from slmforge.stages import bench, curate, ingest, synth
from slmforge.synthetic.synthesis import ngrams
from tests.conftest import small_recipe, write_recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("bench")
    recipe = small_recipe(small_corpus, tmp / "w")
    recipe["synth"] = {"max_chunks": 30}
    recipe["bench"] = {"mcq": 20, "completion": 20, "qa": 20, "summarization": 5}
    cfg = load_recipe(write_recipe(tmp, recipe)).stages
    store = ArtifactStore(tmp / "w")
    cur = curate.run(cfg["curate"], store, {"ingest": ingest.run(cfg["ingest"], store)})
    syn = synth.run(cfg["synth"], store, {"curate": cur})
    return bench.run(cfg["bench"], store, {"curate": cur, "synth": syn}), cur


def _jsonl(p):
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_sets_come_from_the_test_split_and_share_no_13gram_with_training(built):
    art, cur = built
    from slmforge.records import read_documents

    test_ids = {d["id"] for d in read_documents(cur.path / "data" / "test")}
    train = set()
    for d in read_documents(cur.path / "data" / "train"):
        train |= ngrams(d["text"], 13)
    m = art.manifest["metrics"]
    assert all(m["sizes"][k] > 0 for k in bench.SETS)
    for k in bench.SETS:
        for it in _jsonl(art.path / "tasks" / f"{k}.jsonl"):
            assert it["chunk_id"].rsplit("#", 1)[0] in test_ids
            assert not ngrams(" ".join(v for v in it.values() if isinstance(v, str)), 13) & train
    for it in _jsonl(art.path / "tasks" / "mcq.jsonl"):
        assert len(set(it["options"])) == 4 and "_____" in it["question"]
        assert it["question"].count(it["options"][it["answer_index"]]) == 0  # the answer is not visible
    assert set(m["trivial_baselines"]["mcq"]) == {"items", "chance", "longest_option", "shortest_option", "most_overlap"}


def test_tasks_run_offline_in_lm_eval_and_score_the_same_twice(built, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmforge.stages.tokenizer import save_hf, train_bpe

    art, _ = built
    spec = yaml.safe_load((art.path / "tasks" / "slmforge_mcq.yaml").read_text())
    assert os.path.isfile(spec["dataset_kwargs"]["data_files"]["test"])  # points at the final run dir
    texts = [it["question"] for it in _jsonl(art.path / "tasks" / "mcq.jsonl")]
    save_hf(train_bpe(iter(texts * 3), 400), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=512))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    tm = TaskManager(include_path=str(art.path / "tasks"))
    tasks = ["slmforge_mcq", "slmforge_completion", "slmforge_qa", "slmforge_summarization"]
    runs = [simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=8, log_samples=False,
                            bootstrap_iters=0)["results"] for _ in range(2)]
    assert runs[0] == runs[1]
    assert {"acc,none", "acc_norm,none"} <= set(runs[0]["slmforge_mcq"])
    assert {"exact_match,none", "f1,none"} <= set(runs[0]["slmforge_qa"])
    assert "rougeL,none" in runs[0]["slmforge_summarization"]


def test_a_model_teacher_writes_the_sets_through_the_synth_prompts_and_filters(built, tmp_path):
    from tests.fake_openai import GroundedServer

    art, cur = built
    store = ArtifactStore(art.path.parent.parent)
    server = GroundedServer()
    try:
        cfg = bench.Config(mcq=4, completion=4, qa=4, summarization=2, dev=2, teacher="openai",
                           openai={"base_urls": [server.url], "model": "fake", "concurrency": 4})
        made = bench.run(cfg, store, {"curate": cur, "synth": store.resolve("synth:latest")})
    finally:
        server.fake.close()
    m = made.manifest["metrics"]
    assert m["built_with"].startswith("openai teacher") and len(server.fake.log) > 0
    assert all(m["sizes"][k] > 0 for k in bench.SETS)
    mcq = _jsonl(made.path / "tasks" / "mcq.jsonl")
    assert all(it["options"][1:] == ["alpha", "beta", "gamma"] and it["answer_index"] == 0 for it in mcq)
    summ = _jsonl(made.path / "tasks" / "summarization.jsonl")[0]
    assert summ["summary"] in " ".join(summ["document"].split())
    assert m["independence"]["qa"] == {"generator": "openai:fake", "training_data": "extractive",
                                       "same_generator": False, "same_prompt_shape": False}
    qa = _jsonl(made.path / "tasks" / "qa.jsonl")
    assert qa and all(it["answer"] in it["passage"] and it["question"].endswith("?") for it in qa)
    assert m["teacher_qa"]["asked"] >= m["teacher_qa"]["kept"] >= len(qa)
    spec = yaml.safe_load((made.path / "tasks" / "slmforge_qa.yaml").read_text().replace("!function ", ""))
    assert "Question: {{question}}" in spec["doc_to_text"] and spec["generation_kwargs"]["max_gen_toks"] == 48
    assert [x["metric"] for x in spec["metric_list"]] == ["exact_match", "f1", "rougeL"]


def test_a_teacher_question_is_kept_only_when_it_is_one():
    s = "The postgres database is also created when a database cluster is initialized."
    assert bench._question("What is the postgres database for?\nIt is ...", s) == ("What is the postgres database for?", None)
    assert bench._question("Question: \"When is the postgres database created?\"", s)[1] is None
    assert bench._question("The postgres database is made at initdb.", s)[1] == "not a question"
    assert bench._question('A user would ask: "When is the postgres database created?"', s) == (
        "When is the postgres database created?", None)
    assert bench._question("What does this sentence say about postgres?", s)[1] == "refers to the sentence"
    assert bench._question("Why?", s)[1] == "length"
    assert bench._question(f"Is it true that {s}?", s)[1].startswith("gives the answer away")
    assert bench._question("How do I bake a good sourdough loaf?", s)[1].startswith("off topic")


def test_a_model_teacher_writes_only_its_sets_with_bench_own_qa_prompt(built, tmp_path):
    from tests.fake_openai import GroundedServer

    art, cur = built
    syn = ArtifactStore(art.path.parent.parent).resolve("synth:latest")
    store = ArtifactStore(tmp_path / "w")  # its own teacher cache: every prompt reaches the server
    server, prompts = GroundedServer(), []
    answer = server.fake.answer
    server.fake.answer = lambda path, body, auth: (prompts.append(body["messages"][-1]["content"]),
                                                   answer(path, body, auth))[1]
    try:
        cfg = bench.Config(mcq=4, completion=4, qa=4, summarization=2, dev=2, teacher="openai", teacher_sets=["qa"],
                           openai={"base_urls": [server.url], "model": "fake", "concurrency": 4})
        made = bench.run(cfg, store, {"curate": cur, "synth": syn})
    finally:
        server.fake.close()
    m = made.manifest["metrics"]
    assert prompts and all("Write the question a user of this software would ask that this sentence answers" in p
                           for p in prompts)
    assert not any("training data" in p for p in prompts)  # synth's prompts say "You write training data"
    assert m["independence"]["qa"]["same_generator"] is False
    assert m["independence"]["mcq"] == {"generator": "extractive", "training_data": "extractive",
                                        "same_generator": True, "same_prompt_shape": False}
    mcq = _jsonl(made.path / "tasks" / "mcq.jsonl")
    assert mcq and all("_____" in it["question"] and "alpha" not in it["options"] for it in mcq)


def _word_tokenizer(folder):
    """One token per word or punctuation mark: token counts are easy to reason about."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer").mkdir(parents=True)
    tok.save(str(folder / "tokenizer" / "tokenizer.json"))
    return type("Art", (), {"path": folder})()


def test_summarization_documents_are_cut_to_fit_the_context_and_keep_their_lead(tmp_path):
    from slmforge.evaluation.prompts import render

    fit = bench.summary_fitter(bench.Config(context=64, summary_tokens=16), _word_tokenizer(tmp_path))
    lead = "VACUUM reclaims storage occupied by dead tuples. It can also analyze a database."
    rest = " ".join(f"Sentence number {i} adds some more words here." for i in range(20))
    cut = fit({"document": f"{lead} {rest}", "summary": lead}, cut=True)
    words = len(render("summarization", document=cut["document"]).replace(".", " . ").split())
    assert words <= 64 - 16 - 1 and cut["document"].startswith(lead) and cut["document"].endswith(".")
    assert len(cut["document"]) >= 2 * len(lead)
    short = {"document": f"{lead} {rest[:120]}", "summary": lead}
    assert fit(short, cut=True) == short  # fits whole: unchanged
    assert fit({"document": f"{lead} {rest}", "summary": lead}, cut=False) is None  # a model's summary of the whole
    long_lead = " ".join(["word"] * 60) + "."
    assert fit({"document": f"{long_lead} {rest}", "summary": long_lead}, cut=True) is None  # the lead cannot fit
    assert dict(fit.stats) == {"too_long": 3, "cut": 1, "whole": 1}


def test_the_task_metrics_score_rouge_l_with_stemming(tmp_path):
    import importlib.util

    from rouge_score import rouge_scorer

    from slmforge.evaluation.prompts import UTILS

    (tmp_path / "utils.py").write_text(UTILS)
    spec = importlib.util.spec_from_file_location("task_utils", tmp_path / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    ref = "Vacuum reclaims the storage occupied by dead tuples."
    pred = "vacuuming reclaimed storage of dead tuple"
    got = utils.process_summary({"summary": ref}, [pred])["rougeL"]
    # Porter stemming matches vacuum/vacuuming, reclaims/reclaimed, tuples/tuple: an LCS of 5 words, of the
    # answer's 6 and the reference's 8
    assert got == pytest.approx(2 * (5 / 6) * (5 / 8) / (5 / 6 + 5 / 8))
    assert got == rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    qa = utils.process_qa({"answer": "the WAL"}, [" The wal. "])
    assert qa == {"exact_match": 1.0, "f1": 1.0, "rougeL": 1.0}
