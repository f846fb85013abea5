"""export: each chosen model as a folder others can use without slmforge: a Hugging Face folder
(safetensors, tokenizer, chat template, generation config, a model card the Hub reads), a GGUF file for
llama.cpp and Ollama with a Modelfile beside it, samples of the model's domain for a router, and
`slmforge.json` (what the catalog and `serve` read).

The weights exported are the ones evaluate scored: when evaluate picked a snapshot (evaluate.select),
that snapshot; so the card's scores describe the exported weights.

The tokenizer files load in transformers 4 and 5 (slmforge.models.chat.portable_tokenizer_config): a chat model
carries its plain inference template (no {% generation %} marks) in chat_template.jinja and in
tokenizer_config.json, a base model none; model_max_length is the model's context. `eval/` holds the
bench stage's test tasks (YAML, JSONL, utils.py) with paths relative to the folder, so the lm-eval
commands on the card reproduce its scores from there.

The GGUF writer and its llama.cpp check live in slmforge.deploy.gguf; the model card and the Modelfile in
slmforge.deploy.cards; the lineage (the models a model was trained from) is read by slmforge.records.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from slmforge.artifacts import Artifact, ArtifactStore, write_json_atomic
from slmforge.common import NAME_RE, cut_at_word, write_jsonl
from slmforge.config import RecipePath, StageConfig
from slmforge.console import info
from slmforge.deploy.cards import eval_commands, flat_scores, model_card, modelfile
from slmforge.deploy.gguf import (
    LLAMA_CPP_PACKAGE,
    VERIFY_TOKENS,
    llama_cpp_available,
    verification_error,
    verify_gguf,
    verify_prompts,
    write_gguf,
)
from slmforge.errors import UserError
from slmforge.models.chat import portable_tokenizer_config, strip_generation_marks
from slmforge.records import (
    MODELS,
    Benchmarks,
    Curated,
    Evaluation,
    Exports,
    Models,
    made_from,
    model_lineage,
)

NAME = "export"
INPUTS = ("curate", "evaluate")
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja")
ROUTER_CHARS = 4000


class Config(StageConfig):
    """Which models to export, under which names, and in which GGUF type."""

    models: list[str] = Field(default_factory=lambda: ["specialist"],
                              description=f"models to export: {', '.join(MODELS)}")
    name_prefix: str | None = Field(
        None, description="export names are <prefix>-<model> (default: the recipe's name; none: the model name)")
    names: dict[str, str] = Field(default_factory=dict, description="an export name per model, e.g. {dpo: pg-chat}")
    description: str | None = Field(None, description="one line for the model card and the catalog")
    license: str | None = Field(None, description="license id for the model card (e.g. apache-2.0); omitted if unset")
    gguf: Literal["f32", "f16", "bf16", "q8_0", "none"] = Field(
        "f16", description="GGUF weight type for llama.cpp / Ollama (q8_0: 8-bit), or none")
    verify: bool = Field(True, description=f"check the GGUF with llama.cpp ({LLAMA_CPP_PACKAGE}, installed by make "
                                           "setup); without it the check is skipped and gguf_verified is null")
    router_docs: int = Field(200, ge=0, description="documents per split in domain/train.jsonl and domain/test.jsonl")
    catalog: RecipePath | None = Field(None, description="a catalog file to add the exports to (replacing entries of the "
                                                  "same name), e.g. ../runs/catalog.db; none: do not add them")

    # Adding to a catalog changes nothing in the export folders, so it does not change the cache key; it
    # runs every time, cached or not, so that the catalog points at the latest exports.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"catalog"})

    @field_validator("models")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in MODELS]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not a model the stages make; choose from "
                             f"{', '.join(MODELS)}")
        if not v:
            raise ValueError(f"name at least one model ({', '.join(MODELS)})")
        if len(set(v)) != len(v):
            raise ValueError("each model may appear once")
        return v

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, v: str | None, info) -> str | None:
        if v is None:  # the recipe's name, when load_recipe passes it
            v = (info.context or {}).get("recipe_name")
            v = v.lower() if isinstance(v, str) else None
        if v is not None and not NAME_RE.match(f"{v}-x"):
            raise ValueError(f"{v!r} (default: the recipe's name) gives export names that are not 1-64 lower-case "
                             "letters, digits, '.', '_' or '-'; set export.name_prefix or export.names")
        return v

    @model_validator(mode="after")
    def _names(self):
        problems = [f"names.{m}: {m!r} is not in models ({', '.join(self.models)})" for m in self.names
                    if m not in self.models]
        exported = [self.export_name(m) for m in self.models]
        problems += [f"names: {n!r} must be 1-64 lower-case letters, digits, '.', '_' or '-', starting with a "
                     "letter or digit" for n in exported if not NAME_RE.match(n)]
        if len(set(exported)) != len(exported):
            problems.append("names: two models would get the same export name")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def export_name(self, model: str) -> str:
        if model in self.names:
            return self.names[model]
        return f"{self.name_prefix}-{model}" if self.name_prefix else model


def needs(cfg: Config) -> tuple[str, ...]:
    """curate, evaluate, and the stages that made the models to export."""
    return INPUTS + tuple(dict.fromkeys(MODELS[m] for m in cfg.models))


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in needs(cfg)}
    art = store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out, store), force=force)
    if cfg.catalog:
        from slmforge.deploy.catalog import Catalog

        cat, made = Catalog(cfg.catalog), Exports.of(art)
        for name in made.exports:
            cat.add(made.folder(name), replace=True)
        info(f"  export · added {', '.join(made.exports)} to the catalog {cat.path} "
             f"(`slmforge models list --catalog {cfg.catalog}`)")
    return art


# ---- the folder --------------------------------------------------------------------------------------
def _sample_docs(curated: Curated, split: str, sources: list[str], n: int) -> list[dict]:
    """n documents of the split, picked by a hash of their id (a fixed, order-free sample across sources),
    text cut to ROUTER_CHARS at a word boundary."""
    if n == 0:
        return []
    heap: list[tuple[int, str, str]] = []  # (-hash, id, text): the n smallest hashes
    for s in sources:
        for row in curated.documents(split, s, columns=["id", "text"]):
            h = int.from_bytes(hashlib.blake2b(row["id"].encode(), digest_size=8).digest(), "big")
            item = (-h, row["id"], row["text"])
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return [{"id": doc_id, "text": cut_at_word(text, ROUTER_CHARS)} for _, doc_id, text in sorted(heap, reverse=True)]


def _router_files(curated: Curated, sources: list[str], dst: Path, n: int) -> tuple[dict | None, dict]:
    """domain/train.jsonl and domain/test.jsonl: n documents of each split of the model's domain, for a
    router. Returns (their paths in the folder, or None when a split has none; documents per file)."""
    (dst / "domain").mkdir(exist_ok=True)
    train = _sample_docs(curated, "train", sources, n)
    test = _sample_docs(curated, "test", sources, n)
    counts = {"train": len(train), "test": len(test)}
    if not (train and test):
        return None, counts
    write_jsonl(dst / "domain" / "train.jsonl", [{"text": d["text"]} for d in train])
    write_jsonl(dst / "domain" / "test.jsonl", [{"text": d["text"]} for d in test])
    return {"train": "domain/train.jsonl", "test": "domain/test.jsonl"}, counts


def _hf_folder(src: Path, dst: Path, chat: bool, context: int) -> None:
    """The HF files of `src`, unchanged except: tokenizer_config.json as transformers 4 and 5 both read it,
    with the model's context as model_max_length and, for a chat model, the inference template (also in
    chat_template.jinja; a base model gets none, so no server offers it a chat route); config.json turns
    the KV cache on."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in HF_FILES:
        if f != "chat_template.jinja" and (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    missing = [f for f in HF_FILES[:5] if not (dst / f).is_file()]
    if missing:
        raise UserError(f"{src}: missing {', '.join(missing)}; re-run the stage that made this model")
    tc = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    own = (src / "chat_template.jinja").read_text(encoding="utf-8") if (src / "chat_template.jinja").is_file() \
        else tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None
    template = strip_generation_marks(own) if chat and own else None
    if template:
        (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
    write_json_atomic(dst / "tokenizer_config.json", portable_tokenizer_config(tc, template, context))
    c = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    c["use_cache"] = True
    write_json_atomic(dst / "config.json", c)


def _eval_folder(bench: Benchmarks, dst: Path) -> dict[str, str]:
    """The bench stage's test tasks in dst/eval/: each YAML with its data file named relative to `dst`
    (lm-eval reads it from the working directory: the card says to run from the folder), the JSONL, and
    utils.py (the generation tasks' metrics). Returns {task: its lm-eval output_type}."""
    ev = dst / "eval"
    ev.mkdir(exist_ok=True)
    shutil.copy2(bench.task_dir / "utils.py", ev / "utils.py")
    types = {}
    for set_name, task in bench.tasks.items():
        data = json.dumps(f"eval/{set_name}.jsonl")
        text, n = re.subn(r"(?m)^(    test: ).*$", lambda m, data=data: m.group(1) + data,
                          (bench.task_dir / f"{task}.yaml").read_text(encoding="utf-8"))
        if n != 1:
            raise UserError(f"{bench.task_dir / f'{task}.yaml'}: no `data_files: test:` line; re-run `slmforge bench`")
        (ev / f"{task}.yaml").write_text(text, encoding="utf-8")
        shutil.copy2(bench.task_dir / f"{set_name}.jsonl", ev / f"{set_name}.jsonl")
        kind = re.search(r"(?m)^output_type: (\w+)", text)
        types[task] = kind.group(1) if kind else "multiple_choice"
    return types


def _bench_of(store: ArtifactStore, evaluate: Evaluation) -> Benchmarks | None:
    """The bench run evaluate scored with (its manifest's input), or None when it is gone."""
    key = evaluate.bench_key
    try:
        return Benchmarks.of(store.resolve(f"bench:{key}")) if key else None
    except UserError:
        info(f"  export · the bench run bench:{key} that evaluate used is gone: no eval/ tasks in the exports")
        return None


# ---- the stage ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Inputs:
    """What every model's export reads: the run's inputs, evaluate's results and the bench it scored with."""

    cfg: Config
    inputs: dict[str, Artifact]
    store: ArtifactStore
    curated: Curated
    results: dict  # evaluate's results.json
    bench: Benchmarks | None
    eval_cfg: dict  # evaluate's resolved config
    can_verify: bool  # the GGUF check runs (export.verify, a GGUF type, llama.cpp installed)


@dataclass(frozen=True)
class _Model:
    """One model to export: the weights it comes from and what its folder says about them."""

    model: str
    name: str  # the export name
    stage: str  # the model stage that made it, and that run's key
    key: str
    src: Path  # the weights exported: the model's folder, or the snapshot evaluate selected
    scored: bool  # evaluate scored these weights
    meta: dict  # what the model stage recorded of the model
    sources: list[str]  # the curated sources of its domain: router samples and the check's prompts
    general: bool  # a control trained on the general text only (generalist, recovered), as its stage recorded
    dst: Path
    context: int

    @property
    def chat(self) -> bool:
        return bool(self.meta.get("chat"))


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path, store: ArtifactStore) -> dict:
    evaluate = Evaluation.of(inputs["evaluate"])
    run = _Inputs(cfg, inputs, store, Curated.of(inputs["curate"]), evaluate.results, _bench_of(store, evaluate),
                  evaluate.config, _can_verify(cfg))
    exports = {}
    for model in cfg.models:
        name, entry = _export(run, _model(run, model, out))
        exports[name] = entry
    return {"exports": exports}


def _can_verify(cfg: Config) -> bool:
    """Whether the GGUF files are checked with llama.cpp; says how to check them when it is not installed."""
    want_verify = cfg.verify and cfg.gguf != "none"
    can_verify = want_verify and llama_cpp_available()
    if want_verify and not can_verify:
        info(f"  export · {LLAMA_CPP_PACKAGE} (llama.cpp) is not installed, so the GGUF files are not checked "
             f"(gguf_verified: null). To check them: `pip install {LLAMA_CPP_PACKAGE}` (a prebuilt wheel; `make "
             "setup` installs it), then `slmforge export --recipe RECIPE --force`")
    return can_verify


def _model(run: _Inputs, model: str, out: Path) -> _Model:
    """The model as its stage made it, with the weights to export: the snapshot evaluate selected when it
    scored this very run of the model, else the stage's folder (and the card will have no scores)."""
    stage = MODELS[model]
    art = run.inputs[stage]
    made = Models.of(art)
    if model not in made.models:
        raise UserError(f"export.models: the {stage} stage ({art.path}) made "
                        f"{', '.join(made.models) or 'no models'}, not {model!r}")
    name = run.cfg.export_name(model)
    evaluated = run.results.get("models", {}).get(model, {})
    scored = evaluated.get("stage") == stage and evaluated.get("key") == art.key
    src = made.folder(model)
    if scored and (sel := run.results.get("selection", {}).get(model)):
        src = Path(sel["path"])
    if not scored:
        why = (f"evaluate scored {stage}:{evaluated.get('key')}, not {art.ref}" if evaluated else
               f"evaluate did not score {model!r}")
        info(f"  export · {name}: {why}; the card will have no scores (run `slmforge evaluate` first)")
    meta = made.models[model]
    # a pretrain run from before controls were recorded: its generalist is one all the same
    general = (meta.get("control") or {}).get("text") == "general" or model == "generalist"
    sources = run.curated.general if general else run.curated.domain
    context = json.loads((src / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]
    return _Model(model, name, stage, art.key, src, scored, meta, sources, general, out / name, context)


def _export(run: _Inputs, m: _Model) -> tuple[str, dict]:
    """The model's folder: HF files, eval tasks, router samples, GGUF and Modelfile, card, slmforge.json.
    Returns (its name, its entry in the manifest's exports)."""
    info(f"  export · {m.model} → {m.name} (from {m.src})")
    _hf_folder(m.src, m.dst, m.chat, m.context)
    chain = model_lineage(run.store, m.stage, m.key, m.model)
    evaluation = None
    if m.scored and run.bench:
        evaluation = eval_commands(_eval_folder(run.bench, m.dst), run.eval_cfg, m.chat)
    router, router_docs = _router_files(run.curated, m.sources, m.dst, run.cfg.router_docs)
    gguf_file, verified, verification = _gguf(run, m)
    res = run.results if m.scored else {}
    doc = _slmforge_json(run, m, chain, res) | {
        "gguf": gguf_file, "gguf_verified": verified,
        "gguf_check": {k: verification["verification"][k] for k in ("engine", "outtype", "exact", "agreement",
                                                                    "tokens_per_prompt")}
        if verification and verification["verification"] else None,
        "router": router, "eval": evaluation,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card = model_card({**doc, "shape": m.meta.get("shape") or {}}, res, m.model, chain, run.cfg.license)
    (m.dst / "README.md").write_text(card, encoding="utf-8")
    write_json_atomic(m.dst / "slmforge.json", doc)
    return m.name, {"model": m.model, "source": str(m.src), "scored": m.scored, "gguf": verification,
                    "gguf_verified": verified, "router_docs": router_docs}


def _slmforge_json(run: _Inputs, m: _Model, chain: list, res: dict) -> dict:
    """slmforge.json up to its GGUF, router and eval keys: the model, its tokenizer, lineage and scores."""
    hf_cfg = json.loads((m.dst / "config.json").read_text(encoding="utf-8"))
    lineage_start = {c.stage: c.key for c in chain} | {"curate": run.inputs["curate"].key,
                                                       "evaluate": run.inputs["evaluate"].key}
    domain = "general" if m.general else "-".join(m.sources) or "general"
    return {
        "format": 1, "name": m.name, "domain": domain,
        "description": run.cfg.description or f"{domain} {'chat' if m.chat else 'base'} model ({m.model}), made by "
                                              "slmforge",
        "params": _params(m), "context": m.context, "chat": m.chat,
        "tokenizer": {"type": "byte-level BPE", "vocab_size": hf_cfg["vocab_size"]},
        "lineage": {"recipe": run.cfg.name_prefix, "model": m.model, "stage": m.stage,
                    "stages": made_from(run.store, lineage_start)},
        "scores": flat_scores(res, m.model),
        "training_tokens": sum(c.tokens for c in chain),
    }


def _params(m: _Model) -> int:
    """The model's parameters, as its stage recorded them, else counted in the exported weights."""
    params = int((m.meta.get("shape") or {}).get("params") or 0)
    if not params:  # a stage that did not record its shape: count the stored tensors
        from safetensors import safe_open

        with safe_open(str(m.dst / "model.safetensors"), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
    return params


def _gguf(run: _Inputs, m: _Model) -> tuple[str | None, bool | None, dict | None]:
    """The GGUF file and its Modelfile, checked with llama.cpp when it can be: (file name, verified, what
    write_gguf reported with the check's report under `verification`); Nones with export.gguf: none."""
    cfg = run.cfg
    if cfg.gguf == "none":
        return None, None, None
    gguf_file = f"{m.name}.{cfg.gguf}.gguf"
    info(f"  export · {m.name}: writing {gguf_file}")
    g = write_gguf(m.dst, m.dst / gguf_file, cfg.gguf, m.name, cfg.description)
    template = (m.dst / "chat_template.jinja").read_text(encoding="utf-8") \
        if (m.dst / "chat_template.jinja").is_file() else None
    (m.dst / "Modelfile").write_text(modelfile(gguf_file, m.chat, m.context, template), encoding="utf-8")
    verification = _verify(run, m, gguf_file) if run.can_verify else None
    return gguf_file, verification["passed"] if verification else None, {**g, "verification": verification}


def _verify(run: _Inputs, m: _Model, gguf_file: str) -> dict:
    """llama.cpp against transformers on the starts of three test documents (and a chat turn); a failed
    check is a UserError."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(m.dst), local_files_only=True)
    test_texts = list(islice((r["text"] for s in m.sources for r in
                              run.curated.documents("test", s, columns=["text"])), 3))
    info(f"  export · {m.name}: llama.cpp vs transformers, greedy, {VERIFY_TOKENS} tokens per prompt")
    verification = verify_gguf(m.dst / gguf_file, m.dst, run.cfg.gguf, verify_prompts(tok, test_texts, m.chat),
                               m.context, chat=m.chat)
    verified = verification["passed"]
    info(f"  export · {m.name}: {'[green]verified[/]' if verified else '[red]NOT verified[/]'} "
         f"(agreement {verification['agreement']:.0%}, tokenization "
         f"{'equal' if verification['tokenization_equal'] else 'DIFFERENT'})")
    if not verified:
        raise UserError(verification_error(m.dst / gguf_file, verification))
    return verification
