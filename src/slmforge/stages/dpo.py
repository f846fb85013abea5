"""dpo: preference optimisation of the SFT model with trl's DPOTrainer (called as it is).

Pairs: the synth stage's preference items (a question, its grounded answer as `chosen`, an answer
from another section as `rejected`), plus, with `on_policy: true`, the SFT model's own answers to
synthetic questions that fail the groundedness check (too few of their words in the source chunk),
each paired as `rejected` with the grounded answer. The reference model is the SFT model; with
`precompute_ref: true` its log-probabilities are computed once before training (no second model in
memory during training) and stored in `ref_logps.jsonl`. `beta` and `loss_type` come from the recipe.

The loss for one pair, with the default `loss_type: sigmoid`:
  -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
where log pi(.) sums the completion tokens' log-probabilities; a test checks trl's value against it.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from pydantic import Field

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import StageConfig
from slmforge.console import info
from slmforge.errors import UserError
from slmforge.stages.sft import held_out, save_model

NAME = "dpo"
INPUTS = ("curate", "synth", "sft")


class Config(StageConfig):
    """Which SFT model, which pairs, and the DPO settings."""

    base: str | None = Field(None, description="a model of the sft stage (default: sft-rationale if made, else sft)")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model")
    loss_type: str = Field("sigmoid", description="trl's DPO loss: sigmoid (DPO), ipo, hinge, robust, ...")
    precompute_ref: bool = Field(False, description="compute the reference log-probs once and store them")
    on_policy: bool = Field(False, description="add pairs from the SFT model's own ungrounded answers")
    on_policy_questions: int = Field(200, ge=1, description="synthetic questions the SFT model answers")
    min_grounded: float = Field(0.6, ge=0, le=1, description="on-policy: an answer with a smaller share of its "
                                                              "words in the source chunk becomes `rejected`")
    answer_tokens: int = Field(48, ge=4, description="on-policy: tokens per sampled answer")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5)
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1, description="pairs per step per process")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=16)
    precision: str = Field("auto", pattern="^(auto|bf16|fp32)$")
    save_steps: int = Field(100, ge=1, description="steps between trainer checkpoints (the unit of resume)")
    seed: int = 0


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in INPUTS}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out), resumable=True, force=force,
                       distributed=True)


def synth_pairs(items: list[dict]) -> list[dict]:
    return [{"id": it["id"], "prompt": it["prompt"], "chosen": it["chosen"], "rejected": it["rejected"]}
            for it in items if it["kind"] == "preference"]


def on_policy_pairs(cfg: Config, model, tok, items: list[dict], chunks: dict[str, str]) -> tuple[list[dict], dict]:
    """The SFT model answers synthetic questions (greedy, through its chat template); an answer that
    fails the groundedness check is paired as `rejected` with the item's grounded answer."""
    import torch

    from slmforge.stages.synth import grounded_share

    qa = [it for it in items if it["kind"] in ("qa", "instruction") and it["chunk_id"] in chunks]
    random.Random(cfg.seed).shuffle(qa)
    pairs, grounded = [], 0
    model.eval()
    for it in qa[: cfg.on_policy_questions]:
        prompt = [{"role": "user", "content": it["question"]}]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=cfg.answer_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if answer and grounded_share(answer, chunks[it["chunk_id"]]) >= cfg.min_grounded:
            grounded += 1
            continue
        pairs.append({"id": f"onpolicy-{it['id']}", "prompt": prompt,
                      "chosen": [{"role": "assistant", "content": it["answer"]}],
                      "rejected": [{"role": "assistant", "content": answer or "(no answer)"}]})
    asked = min(len(qa), cfg.on_policy_questions)
    return pairs, {"asked": asked, "grounded": grounded, "pairs": len(pairs)}


def _chunks(curate: Artifact, ids: set[str]) -> dict[str, str]:
    from slmforge.records import read_documents
    from slmforge.stages.synth import chunk_document

    docs = {i.rsplit("#", 1)[0] for i in ids}
    return {c.id: c.text for d in read_documents(curate.path / "data" / "train") if d["id"] in docs
            for c in chunk_document(d, 1500) if c.id in ids}


def make_trainer(cfg: Config, model, tok, train: list[dict], held: list[dict], work: Path):
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from slmforge.stages.pretrain import use_bf16

    max_length = min(cfg.max_length, model.config.max_position_embeddings)
    args = DPOConfig(
        output_dir=str(work), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=0.05, beta=cfg.beta,
        loss_type=[cfg.loss_type], precompute_ref_log_probs=cfg.precompute_ref, max_length=max_length,
        eval_strategy="epoch" if held else "no", save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=1, logging_steps=1, report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        bf16=use_bf16(cfg.precision), use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    fields = ("prompt", "chosen", "rejected")
    return DPOTrainer(model=model, ref_model=None, args=args, processing_class=tok,
                      train_dataset=Dataset.from_list([{k: p[k] for k in fields} for p in train]),
                      eval_dataset=Dataset.from_list([{k: p[k] for k in fields} for p in held]) if held else None)


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    import torch

    from slmforge import dist
    from slmforge.modeling import load_model

    dist.init()
    sft = inputs["sft"]
    made = sft.manifest["metrics"]["models"]
    name = cfg.base or ("sft-rationale" if "sft-rationale" in made else "sft")
    if name not in made:
        raise UserError(f"dpo.base: the sft stage made {', '.join(made)}, not {name!r}")
    base = sft.path / name
    if (out / "dpo" / "metrics.json").is_file():  # finished before a restart
        return {"models": {"dpo": json.loads((out / "dpo" / "metrics.json").read_text())}, "base": name}
    items = [json.loads(x) for x in (inputs["synth"].path / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = synth_pairs(items)
    model, tok = load_model(base)
    stats: dict = {"synth_pairs": len(pairs)}
    if cfg.on_policy:
        cached = out / "on_policy.jsonl"
        if cached.is_file():
            extra = [json.loads(x) for x in cached.read_text(encoding="utf-8").splitlines()]
            stats["on_policy"] = json.loads((out / "on_policy.json").read_text())
        else:
            wanted = {it["chunk_id"] for it in items if it["kind"] in ("qa", "instruction")}
            info(f"  dpo · the {name} model answers up to {cfg.on_policy_questions} synthetic questions")
            extra, stats["on_policy"] = on_policy_pairs(cfg, model, tok, items, _chunks(inputs["curate"], wanted))
            if dist.is_main():
                cached.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in extra), encoding="utf-8")
                (out / "on_policy.json").write_text(json.dumps(stats["on_policy"]))
        pairs += extra
    if not pairs:
        raise UserError("dpo: no preference pairs; add `preference` to synth.kinds (or set dpo.on_policy: true)")
    train = [p for p in pairs if not held_out(p["id"], cfg.eval_fraction)]
    held = [p for p in pairs if held_out(p["id"], cfg.eval_fraction)]
    stats.update(train_pairs=len(train), eval_pairs=len(held), domain_examples=len(train), general_examples=0)
    info(f"  dpo · {name} → dpo: {len(train)} pairs ({stats.get('on_policy', {}).get('pairs', 0)} on-policy), "
         f"{len(held)} held out; beta {cfg.beta}, loss {cfg.loss_type}")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    work = out / "trainer-dpo"
    trainer = make_trainer(cfg, model, tok, train, held, work)
    resume = any(work.glob("checkpoint-*"))
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    wall = time.time() - t0
    evals = trainer.evaluate() if held else {}
    if cfg.precompute_ref and dist.is_main() and "ref_chosen_logps" in trainer.train_dataset.column_names:
        ds = trainer.train_dataset
        with open(out / "ref_logps.jsonl", "w", encoding="utf-8") as f:
            for c, r in zip(ds["ref_chosen_logps"], ds["ref_rejected_logps"]):
                f.write(json.dumps({"ref_chosen_logps": c, "ref_rejected_logps": r}) + "\n")
    log = [r for r in trainer.state.log_history if "loss" in r]
    changed = sum(not torch.equal(before[k], v.detach().cpu()) for k, v in trainer.model.named_parameters())
    acc_key = next((k for k in evals if k.endswith("rewards/accuracies")), None)
    metrics = {"steps": trainer.state.global_step, "train_loss": round(result.training_loss, 4),
               "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
               "eval_loss": round(evals["eval_loss"], 4) if "eval_loss" in evals else None,
               "eval_reward_accuracy": round(evals[acc_key], 4) if acc_key else None,
               "train_time_s": round(wall, 1), "tokens_per_s": None, "params_changed": f"{changed}/{len(before)}",
               "beta": cfg.beta, "loss_type": cfg.loss_type}
    entry = {}
    if dist.is_main():
        entry = save_model({"model": trainer.model, "tokenizer": tok, "log": log, "wall": wall, "tokens": 0,
                            "metrics": metrics}, out, "dpo", base, stats, NAME)
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    _print(entry)
    return {"models": {"dpo": entry}, "base": name}


def _print(m: dict) -> None:
    from slmforge.console import console

    if m:
        console.print(f"dpo: {m['steps']} steps, loss {m['first_loss']} → {m['final_loss']}, eval loss "
                      f"{m['eval_loss']}, eval reward accuracy {m['eval_reward_accuracy']}, "
                      f"params changed {m['params_changed']}, {m['train_time_s']:.0f}s")
