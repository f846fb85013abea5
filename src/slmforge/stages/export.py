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
from itertools import islice
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from slmforge.artifacts import Artifact, ArtifactStore, write_json_atomic
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
from slmforge.records import Benchmarks, Curated, Models, made_from, model_lineage

NAME = "export"
INPUTS = ("curate", "evaluate")
# The models the stages make, and which stage makes each (evaluate uses the same names).
MODELS = {"specialist": "pretrain", "generalist": "pretrain", "pruned": "compress", "pruned-kd": "compress",
          "pruned-lm": "compress", "scratch-kd": "compress", "scratch-lm": "compress", "sft": "sft",
          "sft-rationale": "sft", "dpo": "dpo"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
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
        if v is not None and not _NAME_RE.match(f"{v}-x"):
            raise ValueError(f"{v!r} (default: the recipe's name) gives export names that are not 1-64 lower-case "
                             "letters, digits, '.', '_' or '-'; set export.name_prefix or export.names")
        return v

    @model_validator(mode="after")
    def _names(self):
        problems = [f"names.{m}: {m!r} is not in models ({', '.join(self.models)})" for m in self.names
                    if m not in self.models]
        exported = [self.export_name(m) for m in self.models]
        problems += [f"names: {n!r} must be 1-64 lower-case letters, digits, '.', '_' or '-', starting with a "
                     "letter or digit" for n in exported if not _NAME_RE.match(n)]
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

        cat = Catalog(cfg.catalog)
        for name in art.manifest["metrics"]["exports"]:
            cat.add(art.path / name, replace=True)
        info(f"  export · added {', '.join(art.manifest['metrics']['exports'])} to the catalog {cat.path} "
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
    out = []
    for _, doc_id, text in sorted(heap, reverse=True):
        if len(text) > ROUTER_CHARS:
            cut = text[:ROUTER_CHARS]
            text = cut[: cut.rfind(" ")] if " " in cut[ROUTER_CHARS // 2:] else cut
        out.append({"id": doc_id, "text": text})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")



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


def _bench_of(store: ArtifactStore, evaluate: Artifact) -> Benchmarks | None:
    """The bench run evaluate scored with (its manifest's input), or None when it is gone."""
    key = (evaluate.manifest.get("inputs") or {}).get("bench")
    try:
        return Benchmarks.of(store.resolve(f"bench:{key}")) if key else None
    except UserError:
        info(f"  export · the bench run bench:{key} that evaluate used is gone: no eval/ tasks in the exports")
        return None


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path, store: ArtifactStore) -> dict:
    curate, evaluate = inputs["curate"], inputs["evaluate"]
    res_path = evaluate.path / "results.json"
    results = json.loads(res_path.read_text(encoding="utf-8")) if res_path.is_file() else evaluate.manifest["metrics"]
    curated = Curated.of(curate)
    want_verify = cfg.verify and cfg.gguf != "none"
    can_verify = want_verify and llama_cpp_available()
    if want_verify and not can_verify:
        info(f"  export · {LLAMA_CPP_PACKAGE} (llama.cpp) is not installed, so the GGUF files are not checked "
             f"(gguf_verified: null). To check them: `pip install {LLAMA_CPP_PACKAGE}` (a prebuilt wheel; `make "
             "setup` installs it), then `slmforge export --recipe RECIPE --force`")
    bench = _bench_of(store, evaluate)
    eval_cfg = evaluate.manifest.get("config") or {}
    exports = {}
    for model in cfg.models:
        stage = MODELS[model]
        art = inputs[stage]
        made = Models.of(art)
        if model not in made.models:
            raise UserError(f"export.models: the {stage} stage ({art.path}) made "
                            f"{', '.join(made.models) or 'no models'}, not {model!r}")
        name = cfg.export_name(model)
        evaluated = results.get("models", {}).get(model, {})
        scored = evaluated.get("stage") == stage and evaluated.get("key") == art.key
        src = made.folder(model)
        if scored and (sel := results.get("selection", {}).get(model)):
            src = Path(sel["path"])
        if not scored:
            why = (f"evaluate scored {stage}:{evaluated.get('key')}, not {art.ref}" if evaluated else
                   f"evaluate did not score {model!r}")
            info(f"  export · {name}: {why}; the card will have no scores (run `slmforge evaluate` first)")
        res = results if scored else {}
        sources = curated.general if model == "generalist" else curated.domain
        dst = out / name
        info(f"  export · {model} → {name} (from {src})")
        meta = made.models[model]
        chat = bool(meta.get("chat"))
        context = json.loads((src / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]
        _hf_folder(src, dst, chat, context)
        hf_cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
        chain = model_lineage(store, stage, art.key, model)
        evaluation = None
        if scored and bench:
            evaluation = eval_commands(_eval_folder(bench, dst), eval_cfg, chat)

        (dst / "domain").mkdir(exist_ok=True)
        router = None
        train = _sample_docs(curated, "train", sources, cfg.router_docs)
        test = _sample_docs(curated, "test", sources, cfg.router_docs)
        if train and test:
            _write_jsonl(dst / "domain" / "train.jsonl", [{"text": d["text"]} for d in train])
            _write_jsonl(dst / "domain" / "test.jsonl", [{"text": d["text"]} for d in test])
            router = {"train": "domain/train.jsonl", "test": "domain/test.jsonl"}

        gguf_file, verified, verification = None, None, None
        if cfg.gguf != "none":
            gguf_file = f"{name}.{cfg.gguf}.gguf"
            info(f"  export · {name}: writing {gguf_file}")
            g = write_gguf(dst, dst / gguf_file, cfg.gguf, name, cfg.description)
            template = (dst / "chat_template.jinja").read_text(encoding="utf-8") \
                if (dst / "chat_template.jinja").is_file() else None
            (dst / "Modelfile").write_text(modelfile(gguf_file, chat, context, template), encoding="utf-8")
            if can_verify:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(dst), local_files_only=True)
                test_texts = list(islice((r["text"] for s in sources for r in
                                          curated.documents("test", s, columns=["text"])), 3))
                info(f"  export · {name}: llama.cpp vs transformers, greedy, {VERIFY_TOKENS} tokens per prompt")
                verification = verify_gguf(dst / gguf_file, dst, cfg.gguf, verify_prompts(tok, test_texts, chat),
                                           context, chat=chat)
                verified = verification["passed"]
                info(f"  export · {name}: {'[green]verified[/]' if verified else '[red]NOT verified[/]'} "
                     f"(agreement {verification['agreement']:.0%}, tokenization "
                     f"{'equal' if verification['tokenization_equal'] else 'DIFFERENT'})")
                if not verified:
                    raise UserError(verification_error(dst / gguf_file, verification))
            verification = {**g, "verification": verification}

        lineage_start = {c.stage: c.key for c in chain} | {"curate": curate.key, "evaluate": evaluate.key}
        shape = meta.get("shape") or {}
        params = int(shape.get("params") or 0)
        if not params:  # a stage that did not record its shape: count the stored tensors
            from safetensors import safe_open

            with safe_open(str(dst / "model.safetensors"), "pt") as f:
                params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
        domain = "general" if model == "generalist" else "-".join(sources) or "general"
        doc = {
            "format": 1, "name": name, "domain": domain,
            "description": cfg.description or f"{domain} {'chat' if chat else 'base'} model ({model}), made by slmforge",
            "params": params, "context": context, "chat": chat,
            "tokenizer": {"type": "byte-level BPE", "vocab_size": hf_cfg["vocab_size"]},
            "lineage": {"recipe": cfg.name_prefix, "model": model, "stage": stage,
                        "stages": made_from(store, lineage_start)},
            "scores": flat_scores(res, model),
            "training_tokens": sum(c.tokens for c in chain),
            "gguf": gguf_file, "gguf_verified": verified,
            "gguf_check": {k: verification["verification"][k] for k in ("engine", "outtype", "exact", "agreement",
                                                                        "tokens_per_prompt")}
            if verification and verification["verification"] else None,
            "router": router, "eval": evaluation,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (dst / "README.md").write_text(model_card({**doc, "shape": shape}, res, model, chain, cfg.license),
                                       encoding="utf-8")
        write_json_atomic(dst / "slmforge.json", doc)
        exports[name] = {"model": model, "source": str(src), "scored": scored, "gguf": verification,
                         "gguf_verified": verified, "router_docs": {"train": len(train), "test": len(test)}}
    return {"exports": exports}
