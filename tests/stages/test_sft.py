import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from slmforge.stages import sft
from tests.conftest import stage_metrics


def test_sft_trains_every_parameter_and_the_loss_falls(posttrained):
    from slmforge.models.modeling import load_model

    _, workdir = posttrained
    run, m = stage_metrics(workdir, "sft")
    assert set(m["models"]) == {"sft", "sft-rationale"}
    for name, mm in m["models"].items():
        changed, total = map(int, mm["params_changed"].split("/"))
        assert changed == total, (name, mm["params_changed"])
        assert mm["final_loss"] < mm["first_loss"] and mm["eval_loss"] is not None
        assert mm["data"]["general_examples"] > 0 and mm["chat"] is True
        assert 0 < mm["tokens"] <= mm["steps"] * 16 * 64  # counted by the trainer: batch 16 x 64 tokens a step
        model, tok = load_model(run / name)  # offline, safetensors
    d = m["models"]["sft-rationale"]["data"]
    assert d["rationale_examples"] > 0 and abs(d["alpha_realised"] - 0.5) < 0.1
    tok = load_model(run / "sft-rationale")[1]
    text = tok.apply_chat_template([{"role": "user", "content": "What is VACUUM?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "[label] What is VACUUM?" in text  # inference uses the label task only
    rat = tok.apply_chat_template([{"role": "user", "content": "[rationale] What is VACUUM?"}], tokenize=False)
    assert "[label]" not in rat


def test_no_training_prompt_is_a_bench_prompt(posttrained):
    """SFT must not train the benchmarks' prompt shapes: a gain would then be format learning."""
    from slmforge.artifacts import ArtifactStore
    from slmforge.evaluation import prompts
    from slmforge.records import Curated, Synthesized

    _, workdir = posttrained
    store = ArtifactStore(workdir)
    items = Synthesized.of(store.resolve("synth:latest")).items
    cfg = sft.Config(eval_fraction=0.0)
    general = sft.general_examples(cfg, Curated.of(store.resolve("curate:latest")), 50)
    data = sft.build_data(cfg, items, general, lambda t, add_special_tokens=False: {"input_ids": t.split()}, True)
    users = {m[0]["content"].removeprefix(sft.RATIONALE) for m in data["train"]}
    assert len(users) > 100 and {it["kind"] for it in items} >= {"mcq", "completion", "summary", "qa", "evidence"}
    assert not [u for u in users if prompts.template_of(u)]  # no training prompt has a bench template's shape
    rendered = set()  # and no item's own bench prompt, rendered as the harness renders it, is trained on
    for it in items:
        if it["kind"] in ("mcq", "completion"):
            rendered.add(prompts.render(it["kind"], question=it["question"]))
        if it["kind"] == "mcq":
            term = it["options"][it["answer_index"]]
            rendered.add(prompts.render("qa", passage=it["question"].replace("_____", term), question=it["question"]))
        if it["kind"] == "summary":
            rendered.add(prompts.render("summarization", document=it["question"].split("\n\n", 1)[-1]))
    assert len(rendered) > 20 and not users & rendered
    assert prompts.template_of(prompts.render("qa", passage="p", question="q _____"))  # the check can fail


def test_rationale_items_become_two_weighted_tasks():
    class Words:  # counts words as tokens
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    items = [{"id": f"r{i}", "kind": "rationale", "question": f"Q{i}?", "answer": "short answer",
              "rationale": "a much longer rationale " * 6, "messages": []} for i in range(40)]
    items += [{"id": f"q{i}", "kind": "qa", "question": f"What {i}?", "answer": "one two three four five six",
               "messages": [{"role": "user", "content": f"What {i}?"},
                            {"role": "assistant", "content": "one two three four five six"}]} for i in range(200)]
    cfg = sft.Config(alpha=0.7, eval_fraction=0.0)
    plain = sft.build_data(cfg, items, [], Words(), distill=False)
    both = sft.build_data(cfg, items, [], Words(), distill=True)
    assert not any(m[0]["content"].startswith("[rationale]") for m in plain["train"])
    rat = [m for m in both["train"] if m[0]["content"].startswith(sft.RATIONALE)]
    assert rat and all(m[1]["content"].startswith("a much longer") for m in rat)
    s = both["stats"]
    assert s["alpha_realised"] == pytest.approx(0.7, abs=0.02)
    assert s["label_tokens"] / (s["label_tokens"] + s["rationale_tokens"]) == pytest.approx(s["alpha_realised"], abs=1e-4)


def test_lora_trains_adapters_and_merges_them_into_full_weights(posttrained, tmp_path):
    from safetensors.torch import load_file

    from slmforge.artifacts import ArtifactStore
    from slmforge.config import load_recipe

    recipe, workdir = posttrained
    store = ArtifactStore(workdir)
    cfg = load_recipe(recipe).stages["sft"].model_copy(update={"distill": False, "lora": sft.Lora(r=4, alpha=8)})
    art = sft.run(cfg, ArtifactStore(tmp_path / "w"), {s: store.resolve(f"{s}:latest") for s in sft.INPUTS})
    m = art.manifest["metrics"]["models"]["sft"]
    assert (art.path / "sft" / "adapter" / "adapter_config.json").is_file()
    merged = load_file(art.path / "sft" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    base = load_file(store.resolve("pretrain:latest").path / "specialist" / "model.safetensors")
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not a LoRA target
    assert m["final_loss"] < m["first_loss"]


# largest weight difference allowed between sft resumed after a SIGKILL and sft uninterrupted: trl resumes
# from its last checkpoint with the optimizer, scheduler, RNG states and data order (0.0 measured on 2 AMX cores)
SFT_RESUME_TOLERANCE = 1e-5


def test_sft_resumes_after_sigkill(posttrained, tmp_path):
    import shutil

    from safetensors.torch import load_file

    recipe, work = posttrained  # its data stages and pretrained models, copied; sft itself runs anew
    for w in ("w", "whole"):
        shutil.copytree(work, tmp_path / w, symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in ("sft", "dpo", "evaluate", "report", "export")])

    def cli(w: str) -> list[str]:
        sets = [f"workdir={tmp_path / w}", "sft.distill=false", "sft.epochs=3", "sft.save_steps=2"]
        return [sys.executable, "-m", "slmforge.cli", "sft", "--recipe", str(recipe),
                *(x for s in sets for x in ("--set", s))]

    r = subprocess.run(cli("whole"), capture_output=True, text=True, timeout=300)  # the run that never stops
    assert r.returncode == 0, r.stderr[-2000:]
    args = cli("w")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not list((tmp_path / "w").glob("sft/*.partial/trainer-sft/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "sft ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "w").glob("sft/*/manifest.json"))
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from checkpoint-" in r.stderr
    # the restart's weights are the uninterrupted run's, to SFT_RESUME_TOLERANCE
    [a], [b] = ([p for p in (tmp_path / w / "sft").iterdir() if p.is_dir() and not p.is_symlink()] for w in ("whole", "w"))
    assert a.name == b.name  # the same key: the workdir is not part of it
    wa, wb = load_file(a / "sft" / "model.safetensors"), load_file(b / "sft" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= SFT_RESUME_TOLERANCE, worst


def test_the_report_shows_each_post_training_stage_on_the_same_items(posttrained):
    _, workdir = posttrained
    _, m = stage_metrics(workdir, "evaluate")
    assert set(m["benchmarks"]) == {"specialist", "generalist", "sft", "sft-rationale", "dpo"}
    assert all(set(b) == set(m["benchmarks"]["specialist"]) for b in m["benchmarks"].values())
    assert "generation tasks through its chat template" in m["models"]["sft"]["note"]
    assert m["gate"]["rivals"] == ["generalist"]  # the specialist's own post-trained models are not its rivals
    run, _ = stage_metrics(workdir, "report")
    page = (run / "report.html").read_text()
    gains = page[page.index("Post-training: each stage's gain"):]
    assert all(f"<td>{n}</td>" in gains for n in ("specialist", "sft", "sft-rationale", "dpo"))
