"""evaluate: every model of the recipe through the same harness: the bench stage's domain benchmarks
via lm-evaluation-harness, bits-per-byte and perplexity on each source's test split (the general
sources show what specialisation costs on general text), greedy samples, and the quality gate.

Models come from the recipe's `models:` list: a stage name (`pretrain`, `sft`, `dpo`: every model
that stage made), a local HF folder, or an OpenAI-compatible endpoint (lm-eval's `local-completions`,
which needs a local tokenizer for log-likelihoods, or `local-chat-completions`, which can only run
the generation tasks). Everything runs offline: tasks from local files, models from local folders.

Checkpoint selection: with `select: mcq/acc` (a choice set and a metric), every snapshot a stage
kept (pretrain.snapshots) is scored on the bench stage's dev set, built from the val split, and the
best one is the model evaluated on the test sets; the table of snapshot scores goes to the report.

Bits per byte = (summed negative log-likelihood of the text's tokens, in bits) / (UTF-8 bytes of the
text). Unlike perplexity it does not depend on the tokenizer, so a specialist with a domain tokenizer
and a generalist with a general one are compared fairly. Each document is scored as BOS + tokens;
the stream is cut into windows of the model's context, and document-boundary tokens (BOS, EOS) are
not scored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.common import cut_at_word
from slmforge.config import DEVICE_PATTERN, BatchSize, RecipePath, StageConfig
from slmforge.console import info, progress
from slmforge.errors import UserError
from slmforge.evaluation.gate import quality_gate
from slmforge.evaluation.results import best_line, flag_empty, gate_lines
from slmforge.evaluation.stats import paired_docs
from slmforge.evaluation.tables import Table, bench_table, bpb_table
from slmforge.hardware import auto_batch, resolve_device
from slmforge.models.lm import float_logits, generate, nll
from slmforge.records import MODEL_STAGES, Benchmarks, Curated, Models
from slmforge.synthetic.judge import JudgeConfig, grade_qa

NAME = "evaluate"
INPUTS = ("curate", "bench")
GENERATION_SETS = ("qa", "summarization")


class ModelRef(BaseModel):
    """A model outside the run: a local HF folder, or an OpenAI-compatible endpoint."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.+-]*$", description="the name shown in the report")
    path: RecipePath | None = Field(None, description="a local HF model folder (safetensors)")
    base: str | None = Field(None, description="a pretrained base by name (`slmforge base list`), e.g. smollm2-135m")
    chat: bool | None = Field(None, description="generation tasks through the model's chat template (default: "
                                                "yes for a base with a chat template, no for a folder)")
    base_url: str | None = Field(None, description="an OpenAI-compatible server, e.g. http://host:8000/v1")
    model: str | None = Field(None, description="the endpoint's model name (default: name)")
    api: Literal["completions", "chat"] = Field(
        "completions", description="completions: every task (needs tokenizer); chat: generation tasks only")
    tokenizer: RecipePath | None = Field(None, description="completions endpoints: a local tokenizer folder")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    concurrency: int = Field(4, ge=1, description="requests in flight to the endpoint")

    @model_validator(mode="after")
    def _one_kind(self):
        if sum(x is not None for x in (self.path, self.base_url, self.base)) != 1:
            raise ValueError(f"model {self.name!r}: give one of `path` (a local folder), `base` (a pretrained base) "
                             "or `base_url` (an endpoint)")
        if self.base_url and self.api == "completions" and not self.tokenizer:
            raise ValueError(f"model {self.name!r}: a completions endpoint needs `tokenizer:` (a local folder) to "
                             "score log-likelihoods; or set api: chat to run the generation tasks only")
        return self


class Config(StageConfig):
    """Which models, which text to score, and how many samples to show."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"device"})  # where the models run, not what is scored

    models: list[str | ModelRef] = Field(
        default_factory=lambda: ["pretrain"],
        description="stage names (pretrain, sft, dpo), or {name, path} / {name, base_url, ...} entries")
    select: str | None = Field(None, pattern=r"^((mcq|completion)/\w+|headline)$",
                               description="pick each stage model's snapshot on the dev sets by this metric "
                                           "(mcq/acc, ...) or by `headline` (each set's headline metric)")
    max_bytes: int = Field(400_000, ge=1000, description="test-split bytes scored per source (first documents by id)")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto: the GPU where one is visible, else the CPU; cpu; cuda or cuda:N (an error without that GPU)")
    max_context: int = Field(1024, ge=16, description="bits per byte: windows of each model's own context, at most "
                                                      "this many tokens (SmolLM2's 8192 is scored at 1024)")
    batch_size: BatchSize = Field("auto", description="sequences per forward pass: bits per byte and the choice "
                                  "tasks; auto: 8 on the CPU; on a GPU 64 for bits per byte and, for the choice "
                                  "tasks, lm-eval's probe of the largest batch that fits (up to 512)")
    generation_batch: BatchSize = Field("auto", description="answers generated together (qa, summarization); "
                                        "auto: 32 on the CPU (a decode step costs about the same for 8 or 32 "
                                        "sequences there), lm-eval's probe up to 512 on a GPU")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights while scoring (logits are scored in float32 either way); auto: bfloat16 where "
                            "the hardware runs it natively (AVX-512-BF16, AMX, recent GPUs), else float32: emulated "
                            "bf16 on an AVX2-only CPU ran several times slower than float32")
    samples: int = Field(3, ge=0, description="greedy samples per source, and sample answers per generation task")
    sample_tokens: int = Field(40, ge=1, description="tokens generated per sample")
    prompt_chars: int = Field(160, ge=10, description="characters of a test document used as the prompt")
    bench_limit: int | None = Field(None, ge=1, description="benchmark items per task at most (None: all)")
    rivals: list[str] | None = Field(None, description="models the specialist must beat in the quality gate "
                                                       "(default: the scratch generalist and every base)")
    empty_share: float = Field(0.5, gt=0, le=1, description="a generation task whose share of empty answers reaches "
                                                            "this is flagged and not scored")
    judge: JudgeConfig | None = Field(None, description="grade qa answers with a judge model too: {base_url, model, "
                                                        "api_key_env, sample} (any OpenAI-compatible server)")

    @field_validator("models", mode="before")
    @classmethod
    def _known(cls, v, info) -> list:
        """Each entry checked on its own, so that one message names every bad entry and its problem."""
        from pydantic import ValidationError

        if not isinstance(v, list):
            raise ValueError("expected a list of stage names and {name, path} / {name, base_url} entries")
        out, problems = [], []
        for i, m in enumerate(v):
            if isinstance(m, str):
                if m not in MODEL_STAGES:
                    problems.append(f"{m!r}: not a stage that makes models ({', '.join(MODEL_STAGES)}); for a "
                                    "folder or an endpoint write {name: ..., path: ...} or {name: ..., base_url: ...}")
                out.append(m)
            elif isinstance(m, (dict, ModelRef)):
                try:
                    out.append(m if isinstance(m, ModelRef) else ModelRef.model_validate(m, context=info.context))
                except ValidationError as e:
                    problems += [f"entry {i + 1}: " + (f"{'.'.join(map(str, x['loc']))}: " if x["loc"] else "") +
                                 x["msg"].removeprefix("Value error, ") for x in e.errors()]
            else:
                problems.append(f"entry {i + 1}: {m!r} is neither a stage name nor a mapping")
        names = [m if isinstance(m, str) else m.name for m in out]
        if len(set(names)) != len(names):
            problems.append("each model may appear once")
        if problems:
            raise ValueError("; ".join(problems))
        return out


def external(cfg: Config) -> dict:
    """Each named base's identity (bases.fingerprint), each local model and tokenizer folder's files
    (artifacts.fingerprint), so that replacing or editing one re-runs evaluate."""
    from slmforge.artifacts import fingerprint
    from slmforge.models import bases

    out: dict = {}
    for m in cfg.models:
        if not isinstance(m, ModelRef):
            continue
        if m.base:
            out[m.base] = bases.fingerprint(m.base)
        if m.path:
            out[m.name] = fingerprint(m.path)
        if m.tokenizer:
            out[f"{m.name}.tokenizer"] = fingerprint(m.tokenizer)
    return out


def needs(cfg: Config) -> tuple[str, ...]:
    """The stages this run reads: curate, bench and every stage named in `models`."""
    return INPUTS + tuple(m for m in cfg.models if isinstance(m, str))


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in needs(cfg)}
    cache = store.workdir / "teacher-cache"  # the judge's replies, beside the synth teacher's
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out, cache), external=external(cfg),
                       force=force)


@dataclass
class Entry:
    """One model to evaluate, where it came from, and what its stage recorded about its training."""

    name: str
    path: Path | None = None
    ref: ModelRef | None = None
    stage: str | None = None
    key: str | None = None
    meta: dict = field(default_factory=dict)


def weights_dtype(dtype: str) -> str:
    """evaluate.dtype resolved: auto is bfloat16 where hardware.use_bf16 says the hardware has it, else float32."""
    from slmforge.hardware import use_bf16

    return ("bfloat16" if use_bf16("auto") else "float32") if dtype == "auto" else dtype


def bits_per_byte(model, tokenizer, texts: list[str], context: int, batch_size: int = 8) -> dict:
    """Summed NLL over the texts' tokens in bits / their UTF-8 bytes, token-level perplexity, and each
    text's own bits per byte (`docs`, in order: what evaluate's paired test between models compares)."""
    import numpy as np
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    doc_of: list[int] = []  # the text each stream position belongs to
    for i, e in enumerate(tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)):
        stream += [bos, *e.ids, eos]
        doc_of += [i] * (len(e.ids) + 2)
    arr = np.asarray(stream, dtype=np.int64)
    n_win = math.ceil((len(arr) - 1) / context)
    pad = n_win * context + 1 - len(arr)
    arr = np.concatenate([arr, np.full(pad, -100, dtype=np.int64)])
    x = torch.as_tensor(arr[:-1].reshape(n_win, context)).clamp(min=0)
    y = torch.as_tensor(arr[1:].reshape(n_win, context))
    y = torch.where((y == bos) | (y == eos), torch.full_like(y, -100), y)
    n_tok = int((y != -100).sum())
    model.eval()
    losses: list = []
    total = nll(model, x, y, batch_size, model.device, per_token=losses)
    per_target = torch.cat(losses).flatten()[:len(arr) - 1 - pad].double().numpy()  # target i is stream[i + 1]
    doc_bits = np.bincount(np.asarray(doc_of[1:]), weights=per_target, minlength=len(texts)) / math.log(2)
    doc_bytes = [len(t.encode("utf-8")) for t in texts]
    n_bytes = sum(doc_bytes)
    return {"bpb": round(total / math.log(2) / n_bytes, 4), "ppl": round(math.exp(total / max(n_tok, 1)), 3),
            "tokens": n_tok, "bytes": n_bytes,
            "docs": [round(float(b) / max(n, 1), 5) for b, n in zip(doc_bits, doc_bytes)]}


def lm_eval_run(lm, tasks_dir: Path, tasks: list[str], limit: int | None, samples: int = 0,
                chat: bool = False) -> tuple[dict, dict, dict]:
    """({task: {metric: value}}, {task: [sample answers]}, {task: {metric: [per item, by doc id]}}) from
    lm-eval's simple_evaluate; generation tasks also get `empty`, the share of empty answers."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # include_defaults=False: our tasks are all local, and indexing lm-eval's thousands of built-in task
    # YAMLs costs seconds per call (`python -c "from lm_eval.tasks import TaskManager; TaskManager()"`)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                          limit=limit, log_samples=True, bootstrap_iters=0, random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                          apply_chat_template=chat)
    scores = {t: {k.split(",")[0]: round(v, 4) for k, v in r.items()
                  if isinstance(v, (int, float)) and "stderr" not in k and k.split(",")[0] != "sample_len"}
              for t, r in out["results"].items()}
    answers, outcomes = {}, {}
    for t, rows in (out.get("samples") or {}).items():
        rows = sorted(rows, key=lambda r: r["doc_id"])
        if not rows:
            continue
        outcomes[t] = {k: [float(r[k]) for r in rows] for k in rows[0].get("metrics", []) if k in rows[0]}
        if isinstance(rows[0]["filtered_resps"][0], str):  # generation tasks
            outcomes[t]["empty"] = round(sum(not r["filtered_resps"][0].strip() for r in rows) / len(rows), 4)
            outcomes[t]["responses"] = [r["filtered_resps"][0] for r in rows]  # for a judge
            if samples:
                answers[t] = [{"id": r["doc"].get("id"), "target": r["target"], "response": r["filtered_resps"][0]}
                              for r in rows[:samples]]
    return scores, answers, outcomes


# `auto` batch sizes: on the CPU, the sizes these settings had before `auto`; on a GPU, 64 windows for bits
# per byte, and for lm-eval its own probe, which starts at GPU_PROBE_MAX and halves until a batch fits
CPU_BATCH, CPU_GENERATION_BATCH, GPU_BPB_BATCH, GPU_PROBE_MAX = 8, 32, 64, 512


def hf_lm(model, tokenizer, batch_size: int | str, cpu_batch: int):
    """lm-eval's HFLM on the model's device; `auto` is `cpu_batch` on the CPU and lm-eval's own probe of
    the largest batch that fits on a GPU."""
    from lm_eval.models.huggingface import HFLM

    probe = batch_size == "auto" and model.device.type != "cpu"
    size = "auto" if probe else auto_batch(batch_size, model.device.type, cpu_batch, GPU_PROBE_MAX)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=size, device=str(model.device),
                **({"max_batch_size": GPU_PROBE_MAX} if probe else {}))


def endpoint_lm(ref: ModelRef):
    """lm-eval's local-completions / local-chat-completions model for an OpenAI-compatible server."""
    from lm_eval.api.registry import get_model

    base = ref.base_url.rstrip("/")
    args = {"model": ref.model or ref.name, "num_concurrent": ref.concurrency, "max_retries": 3, "timeout": 120}
    if ref.api_key_env:  # the key goes in the request header; the process environment is left alone
        args["header"] = {"Authorization": f"Bearer {os.environ.get(ref.api_key_env, '')}"}
    if ref.api == "chat":
        return get_model("local-chat-completions")(base_url=f"{base}/chat/completions", **args)
    return get_model("local-completions")(base_url=f"{base}/completions", tokenizer_backend="huggingface",
                                          tokenizer=ref.tokenizer, tokenized_requests=False, **args)


def _texts(curated: Curated, source: str, max_bytes: int) -> list[str]:
    out, used = [], 0
    for row in curated.documents("test", source, columns=["text"]):
        out.append(row["text"])
        used += len(row["text"].encode("utf-8"))
        if used >= max_bytes:
            break
    return out


def _entries(cfg: Config, inputs: dict[str, Artifact]) -> list[Entry]:
    entries: list[Entry] = []
    refs = list(cfg.models)
    named = {m.base for m in refs if isinstance(m, ModelRef) and m.base}
    for ref in refs:  # grows when a DAPT run brings its base
        if isinstance(ref, str):
            made = Models.of(inputs[ref])
            for name, meta in made.models.items():
                entries.append(Entry(name, path=made.folder(name), stage=ref, key=made.key, meta=meta))
            base = (made.init_from or {}).get("base")
            if base and base not in named:  # a DAPT run's generalist baseline is its base: scored, never skipped
                refs.append(ModelRef(name=base, base=base))
                named.add(base)
        elif ref.base:
            from slmforge.models import bases

            b = bases.get(ref.base)  # a built-in base is converted on first use
            entries.append(Entry(ref.name, path=b.path, ref=ref, meta={
                "base": b.name, "shape": {"params": b.params}, "context": b.context, "license": b.license,
                "pretrain_tokens": b.pretrain_tokens, "pretrain_flops": b.pretrain_flops, "quantized": b.quantized,
                "chat": b.chat_template if ref.chat is None else ref.chat}))
        else:
            entries.append(Entry(ref.name, path=Path(ref.path) if ref.path else None, ref=ref,
                                 meta={"chat": bool(ref.chat)} if ref.path else {}))
    names = [e.name for e in entries]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UserError(f"evaluate.models: more than one model is called {', '.join(clash)}; rename the entries")
    for e in entries:
        if e.path is not None and not (e.path / "config.json").is_file():
            raise UserError(f"evaluate.models: {e.name}: {e.path} is not a HF model folder (no config.json)")
    return entries


def select_snapshot(e: Entry, cfg: Config, bench: Benchmarks) -> dict | None:
    """Score each snapshot of a stage model (and its final weights) on the dev sets; the winner is the
    latest one within one standard error of the best score. A 100-item dev set has a standard error
    near 0.05, so "the best" alone would often pick an early snapshot by luck (on the demo at commit 8a5b23f,
    an early snapshot whose samples were all "The The The"); among scores the dev set cannot tell apart, the
    longer-trained weights win."""
    from slmforge.models.modeling import load_model

    snaps = sorted((e.path / "snapshots").glob("step-*")) if (e.path / "snapshots").is_dir() else []
    dev = bench.dev_tasks
    wanted = dict(bench.headline) if cfg.select == "headline" else dict([cfg.select.split("/")])
    wanted = {s: m for s, m in wanted.items() if s in dev}
    if not snaps or not wanted:
        return None
    n = sum(bench.dev_sizes[s] for s in wanted)
    scores = {}
    for p in [*snaps, e.path]:
        label = "final" if p == e.path else p.name
        model, tok = float_logits(load_model(p, dtype=weights_dtype(cfg.dtype),
                                             device=resolve_device(cfg.device, "evaluate.device")))
        r, _, _ = lm_eval_run(hf_lm(model, tok, cfg.batch_size, CPU_BATCH), bench.task_dir, [dev[s] for s in wanted], None)
        vals = []
        for s, metric in wanted.items():
            if metric not in r[dev[s]]:
                raise UserError(f"evaluate.select: the {s} dev task has no metric {metric!r} "
                                f"(it has {', '.join(r[dev[s]])})")
            vals.append(r[dev[s]][metric] * bench.dev_sizes[s])
        scores[label] = round(sum(vals) / n, 4)
        info(f"  evaluate · {e.name} {label}: dev {cfg.select} {scores[label]:.3f}")
    best = max(scores.values())
    se = math.sqrt(max(best * (1 - best), 1e-9) / n)
    chosen = [k for k in scores if scores[k] >= best - se][-1]  # in training order, final last
    return {"metric": cfg.select, "dev_items": n, "scores": scores, "best": best, "standard_error": round(se, 4),
            "chosen": chosen, "path": str(e.path if chosen == "final" else e.path / "snapshots" / chosen)}


@dataclass
class ModelEval:
    """One model through evaluate: its entry, its record in the results (`models.<name>`), and what was
    measured on it: bits per byte per source (None for an endpoint, which has no weights to score), the
    benchmark scores, sample answers and per-item outcomes (lm_eval_run's three), the snapshot chosen on
    the dev sets, and its greedy samples."""

    entry: Entry
    record: dict
    scores: dict[str, dict] | None = None
    benchmarks: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)
    selection: dict | None = None
    samples: list[tuple[str, dict]] = field(default_factory=list)  # ("<source>: <prompt>", {model, completion})

    @property
    def name(self) -> str:
        return self.entry.name

    def add(self, run: tuple[dict, dict, dict]) -> None:
        """lm_eval_run's (scores, sample answers, outcomes) of some tasks, next to those of the others."""
        for mine, got in zip((self.benchmarks, self.answers, self.outcomes), run):
            mine.update(got)


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path, cache: Path) -> dict:
    curated, bench = Curated.of(inputs["curate"]), Benchmarks.of(inputs["bench"])
    entries = _entries(cfg, inputs)
    texts = {s: _texts(curated, s, cfg.max_bytes) for s in curated.roles}
    empty = [s for s, t in texts.items() if not t]
    if empty:
        raise UserError(f"evaluate: the test split of {', '.join(empty)} is empty; raise curate.test_fraction")
    evals: list[ModelEval] = []
    with progress("evaluate", len(entries), "models") as bar:  # one line per model scored, off a terminal
        for i, e in enumerate(entries):
            bar.update(completed=i, model=f"now: {e.name}")
            evals.append(evaluate_model(cfg, e, texts, bench))
        bar.update(completed=len(entries), model="")
    samples: dict[str, list] = {}
    for ev in evals:
        for key, sample in ev.samples:
            samples.setdefault(key, []).append(sample)
    metrics = _metrics(cfg, evals, curated, bench, cache)
    outcomes = {ev.name: ev.outcomes for ev in evals}
    answers = {ev.name: ev.answers for ev in evals}
    (out / "results.json").write_text(json.dumps(metrics | {"samples": samples, "answers": answers,
                                                            "outcomes": outcomes}, indent=2, ensure_ascii=False),
                                      encoding="utf-8")
    print_results(metrics, samples)
    return metrics


def evaluate_model(cfg: Config, e: Entry, texts: dict[str, list[str]], bench: Benchmarks) -> ModelEval:
    """One model: an endpoint on the benchmarks it can run; weights on bits per byte, the benchmarks and
    greedy samples (after checkpoint selection, with `select`)."""
    ev = ModelEval(e, {"stage": e.stage, "key": e.key, "path": str(e.path) if e.path else None,
                       "endpoint": e.ref.base_url if e.ref and e.ref.base_url else None, **e.meta})
    if e.path is None:  # an endpoint: the benchmarks only (bits per byte needs the weights)
        ref = e.ref
        tasks = list(bench.tasks.values()) if ref.api == "completions" else _generation_tasks(bench)
        info(f"  evaluate · {e.name} ({ref.api} endpoint {ref.base_url}) on {', '.join(tasks)}")
        ev.add(lm_eval_run(endpoint_lm(ref), bench.task_dir, tasks, cfg.bench_limit, cfg.samples,
                           chat=ref.api == "chat"))
        if ref.api == "chat":
            ev.record["note"] = "chat endpoint: no log-likelihoods, so only the generation tasks ran"
        return ev
    from slmforge.models.modeling import load_model

    path = e.path
    if cfg.select and e.stage:
        ev.selection = select_snapshot(e, cfg, bench)
        if ev.selection:
            path = Path(ev.selection["path"])
    model, tok = float_logits(load_model(path, dtype=weights_dtype(cfg.dtype),
                                         device=resolve_device(cfg.device, "evaluate.device")))
    context = min(model.config.max_position_embeddings, cfg.max_context)
    ev.record.update(context=context, device=str(model.device))
    ev.scores = {}
    for source, t in texts.items():
        info(f"  evaluate · {e.name} on {source} test ({sum(len(x) for x in t) / 1e3:.0f} kB)")
        ev.scores[source] = bits_per_byte(model, tok, t, context,
                                          auto_batch(cfg.batch_size, model.device.type, CPU_BATCH, GPU_BPB_BATCH))
    _benchmark_weights(cfg, ev, model, tok, bench)
    for source, t in texts.items():
        for doc in t[: cfg.samples]:
            prompt = cut_at_word(doc, cfg.prompt_chars)
            ev.samples.append((f"{source}: {prompt}", {"model": e.name,
                                                       "completion": generate(model, tok, prompt, cfg.sample_tokens)}))
    return ev


def _generation_tasks(bench: Benchmarks) -> list[str]:
    return [bench.tasks[s] for s in GENERATION_SETS if s in bench.tasks]


def _benchmark_weights(cfg: Config, ev: ModelEval, model, tok, bench: Benchmarks) -> None:
    """The benchmark suite on a loaded model. Choice tasks compare log-likelihoods of continuations of the
    raw text, for every model alike; post-trained models (their stage says `chat`) get the generation
    tasks through their chat template, the way they are used. (Choice tasks through a chat template change
    what is compared: acc_mutual_info fell to chance for the same SFT model on the demo, at commit d59ac30.)"""
    tasks, gen_tasks = list(bench.tasks.values()), _generation_tasks(bench)
    info(f"  evaluate · {ev.name} on the benchmark suite ({', '.join(tasks)})")
    chat = bool(ev.entry.meta.get("chat"))
    parts = [([t for t in tasks if t not in gen_tasks], False, cfg.batch_size, CPU_BATCH),
             (gen_tasks, chat, cfg.generation_batch, CPU_GENERATION_BATCH)]
    for part, as_chat, batch, cpu_batch in parts:
        if part:
            ev.add(lm_eval_run(hf_lm(model, tok, batch, cpu_batch), bench.task_dir, part, cfg.bench_limit,
                               cfg.samples, chat=as_chat))
    if chat:
        ev.record["note"] = "chat model: generation tasks through its chat template, choice tasks on raw text"


def _metrics(cfg: Config, evals: list[ModelEval], curated: Curated, bench: Benchmarks, cache: Path) -> dict:
    """The manifest's metrics: every model's record and scores, the specialist's bits-per-byte margins,
    the judge's grades, the empty-answer flags and the quality gate."""
    benchmarks = {ev.name: ev.benchmarks for ev in evals}
    outcomes = {ev.name: ev.outcomes for ev in evals}
    scores = {ev.name: ev.scores for ev in evals if ev.scores is not None}
    judged = grade_qa(cfg.judge, bench, benchmarks, outcomes, cache) if cfg.judge and "qa" in bench.tasks else None
    models = {ev.name: ev.record for ev in evals}
    for name, lines in flag_empty(benchmarks, outcomes, cfg.empty_share).items():
        models[name]["flags"] = lines
    controls = [ev.name for ev in evals if ev.entry.meta.get("control") or ev.name == "generalist"]
    rivals = cfg.rivals if cfg.rivals is not None else \
        controls + [ev.name for ev in evals if ev.entry.ref is not None and ev.entry.ref.base]
    domain, general = curated.domain, curated.general
    return {"models": models, "scores": scores,
            "margins": _margins(scores, controls, domain + general), "domain_sources": domain,
            "general_sources": general, "benchmarks": benchmarks, "headline": bench.headline,
            "gate": quality_gate(benchmarks, outcomes, bench, "specialist", rivals),
            "selection": {ev.name: ev.selection for ev in evals if ev.selection}, "baselines": bench.baselines,
            "bench_sizes": bench.sizes, "dtype": weights_dtype(cfg.dtype), **({"judge": judged} if judged else {})}


def _margins(scores: dict, controls: list[str], sources: list[str]) -> dict:
    """The domain effect: the specialist's bits per byte against its general-text twin (the first control
    scored) on each source, with a paired test where both scored the same documents."""
    margins = {}
    control = next((c for c in controls if c in scores), None)
    if "specialist" not in scores or not control:
        return margins
    for s in sources:
        sp, ge = scores["specialist"][s]["bpb"], scores[control][s]["bpb"]
        margins[s] = {"specialist_bpb": sp, "generalist_bpb": ge, "control": control,
                      "relative": round(1 - sp / ge, 4)}
        a, b = scores["specialist"][s].get("docs"), scores[control][s].get("docs")
        if a and b and len(a) == len(b):  # the same documents, so a paired test
            margins[s]["test"] = paired_docs(a, b)
    return margins


# ---- presentation ------------------------------------------------------------------------------------
def print_results(m: dict, samples: dict) -> None:
    from slmforge.console import results as console  # results go to stdout

    if m["scores"]:
        console.print(_rich(bpb_table(m, roles=True), "bits per byte on each test split (lower is better)"))
    for s, g in m["margins"].items():
        better = "better" if g["relative"] > 0 else "worse"
        rival = g.get("control", "generalist")
        rival = "the generalist" if rival == "generalist" else f"the control {rival}"
        t = g.get("test")
        test = f"; lower on {t['a_lower']} of {t['items']} documents, Wilcoxon p = {t['p_value']:.2g}: " \
               f"{t['verdict']}" if t else ""
        console.print(f"  {s}: the specialist is {abs(g['relative']):.1%} {better} than {rival} "
                      f"({g['specialist_bpb']:.3f} vs {g['generalist_bpb']:.3f} bits/byte{test})")
    if m["benchmarks"]:
        console.print(_rich(bench_table(m, flag=False, sets=True, reference_head="chance / trivial rules"),
                            "domain benchmarks (lm-evaluation-harness)"))
    for line in gate_lines(m["gate"]):
        console.print(line)
    for name, mm in m["models"].items():
        for flag in mm.get("flags", []):
            console.print(f"[yellow]flag[/] {name}: {flag}")
    if line := best_line(m):
        console.print(line[0].upper() + line[1:])
    for prompt, outs in list(samples.items())[:4]:
        console.print(f"\n[bold]{prompt[:100]}[/]")
        for o in outs:
            console.print(f"  [cyan]{o['model']}[/]: {o['completion'][:160]!r}")


def _rich(table: Table, title: str):
    """A table for the console: the first column as it is, the others right-aligned."""
    from rich.table import Table as RichTable

    t = RichTable(title=title)
    for i, h in enumerate(table.head):
        t.add_column(h, **({"justify": "right"} if i else {}))
    for row in table.rows:
        t.add_row(*row)
    return t
