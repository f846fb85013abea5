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
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.common import read_jsonl, write_jsonl
from slmforge.config import DEVICE_PATTERN
from slmforge.console import info
from slmforge.errors import UserError
from slmforge.hardware import resolve_device
from slmforge.records import Curated, Models, Synthesized
from slmforge.synthetic.synthesis import grounded_share, split_chunks
from slmforge.training.posttrain import (
    PostTrainConfig,
    finish,
    fit,
    held_out,
    params_changed,
    snapshot_params,
    trainer_args,
)

NAME = "dpo"
INPUTS = ("curate", "synth", "sft")


# trl 1.16's DPO losses (DPOConfig.loss_type); a typo is a recipe error, not a failure after the model loaded
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class Config(PostTrainConfig):
    """Which SFT model, which pairs, and the DPO settings."""

    base: str | None = Field(None, description="a model of the sft stage (default: sft-rationale if made, else sft)")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model")
    loss_type: LossType = Field("sigmoid", description="trl's DPO loss: sigmoid (DPO), ipo, hinge, robust, ...")
    precompute_ref: bool = Field(False, description="compute the reference log-probs once and store them")
    on_policy: bool = Field(False, description="add pairs from the SFT model's own ungrounded answers")
    on_policy_questions: int = Field(200, ge=1, description="synthetic questions the SFT model answers")
    min_grounded: float = Field(0.6, ge=0, le=1, description="on-policy: an answer with a smaller share of its "
                                                              "words in the source chunk becomes `rejected`")
    answer_tokens: int = Field(48, ge=4, description="on-policy: tokens per sampled answer")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="on-policy: where the SFT model answers: auto "
                                                                     "(the GPU where one is visible), cpu, cuda[:N]")

    NOT_IN_KEY: ClassVar[frozenset[str]] = PostTrainConfig.NOT_IN_KEY | {"device"}  # device: where the answers are made
    batch_size: int = Field(16, ge=1, description="pairs per step per process")


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
    from slmforge.models.lm import generate

    qa = [it for it in items if it["kind"] in ("qa", "instruction") and it["chunk_id"] in chunks]
    random.Random(cfg.seed).shuffle(qa)
    pairs, grounded = [], 0
    model.eval()
    for it in qa[: cfg.on_policy_questions]:
        prompt = [{"role": "user", "content": it["question"]}]
        answer = generate(model, tok, prompt, cfg.answer_tokens).strip()
        if answer and grounded_share(answer, chunks[it["chunk_id"]]) >= cfg.min_grounded:
            grounded += 1
            continue
        pairs.append({"id": f"onpolicy-{it['id']}", "prompt": prompt,
                      "chosen": [{"role": "assistant", "content": it["answer"]}],
                      "rejected": [{"role": "assistant", "content": answer or "(no answer)"}]})
    asked = min(len(qa), cfg.on_policy_questions)
    return pairs, {"asked": asked, "grounded": grounded, "pairs": len(pairs)}


def _chunks(curated: Curated, synth: Synthesized, ids: set[str]) -> dict[str, str]:
    """The texts of the synth stage's chunks with these ids, cut as synth cut them (its chunk_chars)."""
    return {c.id: c.text for c in split_chunks(curated, "train", curated.domain, synth.chunk_chars) if c.id in ids}


def make_trainer(cfg: Config, model, tok, train: list[dict], held: list[dict], work: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    max_length = min(cfg.max_length, model.config.max_position_embeddings)
    args = DPOConfig(
        **trainer_args(cfg, work, bool(held), 0.05), beta=cfg.beta, loss_type=[cfg.loss_type],
        precompute_ref_log_probs=cfg.precompute_ref, max_length=max_length, logging_steps=1,
    )
    fields = ("prompt", "chosen", "rejected")
    return DPOTrainer(model=model, ref_model=None, args=args, processing_class=tok,
                      train_dataset=Dataset.from_list([{k: p[k] for k in fields} for p in train]),
                      eval_dataset=Dataset.from_list([{k: p[k] for k in fields} for p in held]) if held else None)


def _keep_on_policy(out: Path, pairs: list[dict], stats: dict) -> None:
    """The on-policy pairs and their counts, so a restarted run does not generate them again."""
    write_jsonl(out / "on_policy.jsonl", pairs)
    (out / "on_policy.json").write_text(json.dumps(stats))


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    from slmforge import dist
    from slmforge.models.modeling import load_model

    dist.init()
    sft = Models.of(inputs["sft"])
    made = sft.models
    name = cfg.base or ("sft-rationale" if "sft-rationale" in made else "sft")
    if name not in made:
        raise UserError(f"dpo.base: the sft stage made {', '.join(made)}, not {name!r}")
    base = sft.folder(name)
    lineage = {"init_from": sft.init_from} if sft.init_from else {}  # a DAPT run's base, handed on
    if (out / "dpo" / "metrics.json").is_file():  # finished before a restart
        return {"models": {"dpo": json.loads((out / "dpo" / "metrics.json").read_text())}, "base": name, **lineage}
    synth = Synthesized.of(inputs["synth"])
    items = synth.items
    pairs = synth_pairs(items)
    # trl moves the model to the accelerator for training itself; the on-policy answers come first
    model, tok = load_model(base, device=resolve_device(cfg.device, "dpo.device") if cfg.on_policy else None)
    stats: dict = {"synth_pairs": len(pairs)}
    if cfg.on_policy:
        cached = out / "on_policy.jsonl"
        if cached.is_file():
            extra = read_jsonl(cached)
            stats["on_policy"] = json.loads((out / "on_policy.json").read_text())
        else:
            wanted = {it["chunk_id"] for it in items if it["kind"] in ("qa", "instruction")}
            info(f"  dpo · the {name} model answers up to {cfg.on_policy_questions} synthetic questions")
            extra, stats["on_policy"] = on_policy_pairs(cfg, model, tok, items, _chunks(Curated.of(inputs["curate"]), synth, wanted))
            dist.on_main(_keep_on_policy, out, extra, stats["on_policy"])
        pairs += extra
    if not pairs:
        raise UserError("dpo: no preference pairs; add `preference` to synth.kinds (or set dpo.on_policy: true)")
    train = [p for p in pairs if not held_out(p["id"], cfg.eval_fraction)]
    held = [p for p in pairs if held_out(p["id"], cfg.eval_fraction)]
    stats.update(train_pairs=len(train), eval_pairs=len(held), domain_examples=len(train), general_examples=0)
    info(f"  dpo · {name} → dpo: {len(train)} pairs ({stats.get('on_policy', {}).get('pairs', 0)} on-policy), "
         f"{len(held)} held out; beta {cfg.beta}, loss {cfg.loss_type}")
    before = snapshot_params(model)
    work = out / "trainer-dpo"
    trainer = make_trainer(cfg, model, tok, train, held, work)
    run = fit(trainer, work, "dpo", bool(held))
    if cfg.precompute_ref and "ref_chosen_logps" in trainer.train_dataset.column_names:
        ds = trainer.train_dataset
        dist.on_main(write_jsonl, out / "ref_logps.jsonl", [{"ref_chosen_logps": c, "ref_rejected_logps": r}
                                                            for c, r in zip(ds["ref_chosen_logps"], ds["ref_rejected_logps"])])
    evals = run["evals"]
    acc_key = next((k for k in evals if k.endswith("rewards/accuracies")), None)
    tokens = int(trainer.state.num_input_tokens_seen or 0)  # prompt + chosen and rejected, without padding
    metrics = {**run["metrics"], "eval_reward_accuracy": round(evals[acc_key], 4) if acc_key else None,
               "tokens_per_s": round(tokens / run["wall"], 1) if run["wall"] and tokens else None,
               "params_changed": params_changed(before, trainer.model), "beta": cfg.beta, "loss_type": cfg.loss_type}
    result = {"model": trainer.model, "tokenizer": tok, "log": run["log"], "wall": run["wall"], "tokens": tokens,
              "metrics": metrics}
    entry = dist.on_main(finish, result, out, "dpo", base, stats, NAME, work) or {}
    _print(entry)
    return {"models": {"dpo": entry}, "base": name, **lineage}


def _print(m: dict) -> None:
    from slmforge.console import console

    if m:
        console.print(f"dpo: {m['steps']} steps, loss {_f(m['first_loss'])} → {_f(m['final_loss'])}, eval loss "
                      f"{_f(m['eval_loss'])}, eval reward accuracy {m['eval_reward_accuracy']}, "
                      f"params changed {m['params_changed']}, {m['train_time_s']:.0f}s")


def _f(x) -> str:
    """A loss for the summary: 3 decimals, or - when there is none."""
    return "-" if x is None else f"{x:.3f}"
