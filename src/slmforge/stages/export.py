"""export: each chosen model as a folder others can use without slmforge: a Hugging Face folder
(safetensors, tokenizer, chat template, generation config, a model card the Hub reads), a GGUF file for
llama.cpp and Ollama with a Modelfile beside it, samples of the model's domain for a router, and
`slmforge.json` (what the catalog and `serve` read).

The weights exported are the ones evaluate scored: when evaluate picked a snapshot (evaluate.select),
that snapshot; so the card's scores describe the exported weights.

GGUF is written with the `gguf` package's GGUFWriter, the way llama.cpp's convert_hf_to_gguf.py writes
a Llama (architecture "llama", its tensor names from gguf's own HF-name map, q/k rows permuted for
llama.cpp's RoPE layout, the byte-level BPE as tokenizer.ggml.model "gpt2" with pre-tokenizer
"llama-bpe": our Split regex is Llama 3's). With `verify`, llama.cpp (llama-cpp-python) loads the file
and greedy-decodes a few prompts; its tokens must equal transformers' on the same weights (rounded to
the GGUF's float type), and its tokenization must equal the HF tokenizer's.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
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
from slmforge.errors import UserError
from slmforge.records import read_documents

NAME = "export"
INPUTS = ("curate", "evaluate")
# The models the stages make, and which stage makes each (evaluate uses the same names).
MODELS = {"specialist": "pretrain", "generalist": "pretrain", "sft": "sft", "sft-rationale": "sft", "dpo": "dpo"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja")
ROUTER_CHARS = 4000
VERIFY_TOKENS = 16
IM_END = "<|im_end|>"


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
    verify: bool = Field(True, description="check the GGUF with llama.cpp; without llama-cpp-python installed the "
                                           "check is skipped and gguf_verified is null")
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
        from slmforge.catalog import Catalog

        cat = Catalog(cfg.catalog)
        for name in art.manifest["metrics"]["exports"]:
            cat.add(art.path / name, replace=True)
        info(f"  export · added {', '.join(art.manifest['metrics']['exports'])} to the catalog {cat.path} "
             f"(`slmforge models list --catalog {cfg.catalog}`)")
    return art


# ---- GGUF ------------------------------------------------------------------------------------------
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _permute(w, n_head: int):
    """HF stores q/k rows as [all first halves | all second halves] per head (rotate_half RoPE); llama.cpp
    rotates adjacent pairs. Same permutation as convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_chat_template(template: str) -> str:
    """The chat template without transformers' {% generation %} markers: they only tag assistant tokens
    for training (return_assistant_tokens_mask), and the Jinja engines of llama.cpp and llama-cpp-python
    do not know the tag."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def _tokens(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id from tokenizer.json, as convert_hf_to_gguf.py's get_vocab_base:
    special added tokens are CONTROL, other added tokens USER_DEFINED, ids without a token UNUSED."""
    import gguf

    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{model_dir / 'tokenizer.json'}: GGUF export supports byte-level BPE tokenizers only")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def write_gguf(model_dir: Path, path: Path, outtype: str, name: str, description: str | None = None) -> dict:
    """A llama-architecture GGUF of the HF folder `model_dir` at `path` (written beside, then renamed)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise UserError(f"{model_dir / 'config.json'}: model_type {cfg.get('model_type')!r}; GGUF export "
                        "writes Llama models only")
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise UserError(f"{model_dir / 'config.json'}: RoPE scaling is not supported by this exporter")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    if description:
        w.add_description(description)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _tokens(model_dir, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    # gguf's SpecialVocab reads the merges, bos/eos/pad ids and add_bos (from the post-processor); it logs a
    # warning about our pair template (<s> A <s> B), which llama.cpp never uses
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("eos", False)
    if IM_END in tokens:  # chat turns end with <|im_end|>: an end-of-generation token for llama.cpp
        w.add_eot_token_id(tokens.index(IM_END))
    if special.chat_template:
        special.chat_template = gguf_chat_template(special.chat_template)
    special.add_to_gguf(w, quiet=True)  # merges, bos/eos/pad ids, add_bos (from the post-processor)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tensors = load_file(str(model_dir / "model.safetensors"))
    n_written = 0
    for hf_name, data in tensors.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # llama.cpp uses token_embd when output.weight is missing
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"{model_dir / 'model.safetensors'}: no GGUF name for tensor {hf_name!r}")
        data = data.to(torch.float32).numpy()  # via torch: numpy has no bfloat16 for bf16 checkpoints
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        # Norms (1-D) stay float32 in every type, as llama.cpp's converter keeps them.
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and outtype != "f32":
            qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
                     "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
            if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf.GGMLQuantizationType.F16  # rows not a multiple of the 32-value block
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(new, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(new, data)
        else:
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        n_written += 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "outtype": outtype, "tensors": n_written, "bytes": path.stat().st_size}


# ---- verification with llama.cpp -------------------------------------------------------------------
def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def reference_model(model_dir: Path, outtype: str):
    """The HF model with its matrices rounded to the GGUF's float type and back (norms stay float32,
    as in the GGUF), so that f16/bf16 files are compared with the weights they actually hold."""
    import torch

    from slmforge.modeling import load_model

    model, tok = load_model(model_dir)
    rounding = {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if rounding is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(p.to(rounding).float())
    return model.eval(), tok


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list]:
    """n argmax tokens after `ids` with transformers' KV cache, not stopping at EOS (as the llama.cpp loop
    does not), and each step's logits."""
    import torch

    out, logits = [], []
    with torch.no_grad():
        step = model(input_ids=torch.tensor([ids]), use_cache=True)
        for i in range(n):
            row = step.logits[0, -1].float()
            out.append(int(row.argmax()))
            logits.append(row)
            if i + 1 < n:
                step = model(input_ids=torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out, logits


def llama_logits(llm):
    """The logits of the last evaluated token. (llama-cpp-python 0.3.x keeps `scores` only with logits_all=True;
    llama_get_logits_ith is llama.cpp's own call for the last row.)"""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out = []
    for i in range(n):
        out.append(int(np.argmax(llama_logits(llm))))
        if i + 1 < n:
            llm.eval([out[-1]])
    return out


def verify_prompts(tok, texts: list[str], chat: bool, k: int = 3) -> list[str]:
    """Prompts for the check: the starts of `k` held-out domain documents, and for a chat model one
    question through its chat template (special tokens in the text)."""
    prompts = []
    for t in texts[:k]:
        cut = t[:200]
        prompts.append(cut[: cut.rfind(" ")] if " " in cut[20:] else cut)
    if chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": "What does VACUUM do?"}],
                                       add_generation_prompt=True, tokenize=False)
        prompts.append(text.removeprefix(tok.bos_token or ""))  # the tokenizer adds BOS itself
    return prompts or ["The"]


def verify_gguf(gguf_path: Path, model_dir: Path, outtype: str, prompts: list[str], context: int,
                n_tokens: int = VERIFY_TOKENS, threads: int | None = None) -> dict:
    """Greedy decoding with llama.cpp vs transformers on the same token ids, and tokenization of each prompt.

    For f32/f16/bf16 the tokens must be equal (`passed`), except at a near tie: where the two first differ,
    if transformers' logits for the two tokens are within `tie_tolerance`, the rest of the sequence cannot
    be compared and the prompt counts as matching up to there (float rounding decides a tie, not a bug).
    For q8_0 the weights differ by design, so the agreement (matching prefix / tokens) is reported.
    """
    from llama_cpp import Llama

    model, tok = reference_model(model_dir, outtype)
    # Logit gaps this small flip with accumulation order (llama.cpp's f16/bf16 matmuls also round the
    # activations). Measured on the demo's dpo model, 21 prompts x 16 tokens: f32 and f16 equal everywhere,
    # bf16 one flip at a gap of 0.0003; q8_0 first differs at gaps up to 0.04.
    tie_tolerance = {"f32": 1e-3, "f16": 2e-2, "bf16": 2e-2}.get(outtype)
    started = time.time()
    # transformers first, then llama.cpp: the two thread pools taking turns per token oversubscribe the cores
    # (on 2 busy cores a 1-second check took a minute)
    ids = [tok(p)["input_ids"] for p in prompts]
    ref = [hf_greedy(model, x[: max(1, context - n_tokens)], n_tokens) for x in ids]
    del model
    llm = Llama(model_path=str(gguf_path), n_ctx=context, logits_all=False, verbose=False,
                n_threads=threads or min(os.cpu_count() or 1, 4), seed=0)
    rows = []
    for prompt, full, (want, logits) in zip(prompts, ids, ref):
        hf_ids = full[: max(1, context - n_tokens)]
        ll_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        got = llama_greedy(llm, hf_ids, n_tokens)
        prefix = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), n_tokens)
        row = {"prompt": prompt[:120], "prompt_tokens": len(hf_ids), "tokenization_equal": ll_ids == full,
               "transformers": want, "llama_cpp": got, "matching_prefix": prefix}
        if prefix < n_tokens:
            gap = float(logits[prefix][want[prefix]] - logits[prefix][got[prefix]])
            row["first_difference"] = {"position": prefix, "logit_gap": round(gap, 6)}
            row["near_tie"] = tie_tolerance is not None and gap <= tie_tolerance
        rows.append(row)
    del llm
    agreement = sum(r["matching_prefix"] for r in rows) / (n_tokens * len(rows))
    tokens_ok = all(r["tokenization_equal"] for r in rows)
    exact = tie_tolerance is not None
    passed = tokens_ok and (all(r["matching_prefix"] == n_tokens or r.get("near_tie") for r in rows) if exact
                            else True)
    return {"outtype": outtype, "passed": passed, "exact": exact, "agreement": round(agreement, 4),
            "tokenization_equal": tokens_ok, "tokens_per_prompt": n_tokens, "tie_tolerance": tie_tolerance,
            "seconds": round(time.time() - started, 2), "prompts": rows}


def _verification_error(path: Path, v: dict) -> str:
    for r in v["prompts"]:
        if not r["tokenization_equal"]:
            return (f"{path}: llama.cpp tokenizes the prompt {r['prompt'][:60]!r} differently from the HF "
                    "tokenizer; the GGUF's tokenizer metadata is wrong (please report it), or set export.verify: "
                    "false to keep the file unchecked")
        if r["matching_prefix"] < v["tokens_per_prompt"] and not r.get("near_tie"):
            d = r["first_difference"]
            return (f"{path}: llama.cpp's greedy tokens differ from transformers' at generated position "
                    f"{d['position']} for the prompt {r['prompt'][:60]!r} (transformers {r['transformers']}, "
                    f"llama.cpp {r['llama_cpp']}; logit gap {d['logit_gap']}). The GGUF does not reproduce the "
                    "model: please report it, or set export.verify: false to keep the file unchecked")
    return f"{path}: verification failed"


# ---- the folder --------------------------------------------------------------------------------------
def _sample_docs(curate: Artifact, split: str, sources: list[str], n: int) -> list[dict]:
    """n documents of the split, picked by a hash of their id (a fixed, order-free sample across sources),
    text cut to ROUTER_CHARS at a word boundary."""
    if n == 0:
        return []
    heap: list[tuple[int, str, str]] = []  # (-hash, id, text): the n smallest hashes
    for s in sources:
        for row in read_documents(curate.path / "data" / split, s, columns=["id", "text"]):
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


def _chain(store: ArtifactStore, stage: str, key: str, model: str) -> list[dict]:
    """The model and the models it was trained from (base first): stage, key, name, tokens, metrics."""
    out, seen = [], set()
    while (stage, key, model) not in seen:
        seen.add((stage, key, model))
        try:
            art = store.load(stage, key)
        except UserError:
            break
        meta = art.manifest["metrics"].get("models", {}).get(model)
        if meta is None:
            break
        out.append({"stage": stage, "key": key, "model": model, "tokens": int(meta.get("tokens") or 0), "meta": meta})
        base = meta.get("base")
        if not base:
            break
        parts = Path(base).parts
        if len(parts) < 3 or parts[-3] not in ("pretrain", "sft", "dpo"):
            break
        stage, key, model = parts[-3], parts[-2], parts[-1]
    return out[::-1]


def _stages(store: ArtifactStore, start: dict[str, str]) -> dict[str, str]:
    """Every stage:key the given artifacts were made from, following the manifests' inputs."""
    found: dict[str, str] = {}
    todo = list(start.items())
    while todo:
        stage, key = todo.pop()
        if stage in found:
            continue
        found[stage] = key
        try:
            todo += list(store.load(stage, key).manifest.get("inputs", {}).items())
        except UserError:
            pass
    from slmforge.stages import STAGES

    return {s: found[s] for s in sorted(found, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))}


def _scores(results: dict, model: str) -> dict:
    """Flat scores: '<set>/<metric>' for each benchmark metric, 'bpb/<source>' for each test split."""
    out = {}
    for task, ms in sorted(results.get("benchmarks", {}).get(model, {}).items()):
        for metric, v in ms.items():
            if isinstance(v, (int, float)):
                out[f"{task.rsplit('_', 1)[-1]}/{metric}"] = v
    for source, s in results.get("scores", {}).get(model, {}).items():
        out[f"bpb/{source}"] = s["bpb"]
    return out


SET_NAMES = {"mcq": "multiple choice", "completion": "completion choice", "qa": "question answering",
             "summarization": "summarization"}


def model_index(name: str, results: dict, model: str, domain: str) -> list[dict]:
    """The card's `model-index` (the Hub's evaluation-results format): one result per task, one per test split."""
    res = []
    for task, ms in sorted(results.get("benchmarks", {}).get(model, {}).items()):
        s = task.rsplit("_", 1)[-1]
        metrics = [{"type": k, "value": v, "name": k} for k, v in ms.items() if isinstance(v, (int, float))]
        if metrics:
            res.append({"task": {"type": "text-generation", "name": SET_NAMES.get(s, s)},
                        "dataset": {"type": task, "name": f"{domain} {SET_NAMES.get(s, s)} (slmforge bench, "
                                    "test split)", "split": "test"},
                        "metrics": metrics})
    for source, sc in results.get("scores", {}).get(model, {}).items():
        res.append({"task": {"type": "text-generation", "name": "language modeling"},
                    "dataset": {"type": f"slmforge_{source}", "name": f"{source} test split", "split": "test"},
                    "metrics": [{"type": "bpb", "value": sc["bpb"], "name": "bits per byte"},
                                {"type": "perplexity", "value": sc["ppl"], "name": "perplexity"}]})
    return [{"name": name, "results": res}] if res else []


def model_card(doc: dict, results: dict, model: str, chain: list[dict], cfg: Config) -> str:
    """README.md: YAML front matter the Hugging Face Hub reads, then the model, its data, its scores and how
    to run it."""
    import yaml

    name, domain = doc["name"], doc["domain"]
    front = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if cfg.license:
        front["license"] = cfg.license
    front["tags"] = ["slmforge", "llama", "small-language-model", domain] + (["gguf"] if doc["gguf"] else [])
    front["model_name"] = name
    # What a catalog or a person filtering cards needs without reading the body (the Hub keeps unknown keys)
    pretrain = next((c["meta"] for c in chain if c["stage"] == "pretrain"), {})
    front["domain"] = domain
    front["parameters"] = doc["params"]
    front["training_tokens"] = doc["training_tokens"]
    front["training_data"] = {"sources": pretrain.get("sources", []), "stages": [c["stage"] for c in chain]}
    if index := model_index(name, results, model, domain):
        front["model-index"] = index
    s = doc["shape"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {name}", "",
             doc["description"], "",
             (f"A {doc['params'] / 1e6:.1f}M-parameter Llama-architecture model trained from scratch by slmforge "
              f"for **{domain}** text ({'a chat model' if doc['chat'] else 'a base model: it continues text'})."), "",
             "## Model", "", "| | |", "|---|---|",
             f"| parameters | {doc['params']:,} |", f"| layers | {s.get('depth')} |",
             f"| hidden size | {s.get('hidden_size')} |",
             f"| attention heads (key/value) | {s.get('num_attention_heads')} ({s.get('num_key_value_heads')}) |",
             f"| FFN size | {s.get('intermediate_size')} |", f"| context | {doc['context']} tokens |",
             f"| tokenizer | {doc['tokenizer']['type']}, {doc['tokenizer']['vocab_size']} tokens |", "",
             "## Training", "", "| model | stage | tokens | data |", "|---|---|---|---|"]
    for c in chain:
        m = c["meta"]
        data = ", ".join(m.get("sources", [])) if c["stage"] == "pretrain" else \
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (m.get("data") or {}).items())
        lines.append(f"| {c['model']} | {c['stage']} | {c['tokens']:,} | {data} |")
    lines += ["", f"Training tokens in all: {doc['training_tokens']:,}. Lineage: "
              + ", ".join(f"{k}:{v}" for k, v in doc["lineage"]["stages"].items()) + ".", ""]
    lines += _score_lines(results, model, doc)
    run_lines = ["## How to run", "", "transformers:", "", "```python",
                 "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 f'tok = AutoTokenizer.from_pretrained("{name}")',
                 f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    if doc["chat"]:
        run_lines += ['ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
                      '                              return_tensors="pt", return_dict=True)']
    else:
        run_lines += ['ids = tok("The ", return_tensors="pt")']
    run_lines += ["out = model.generate(**ids, max_new_tokens=64)",
                  'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if doc["gguf"]:
        run_lines += ["llama.cpp and Ollama:", "", "```sh",
                      f"llama-cli -m {doc['gguf']} -p \"...\" -n 64" + (" -cnv" if doc["chat"] else ""),
                      f"ollama create {name} -f Modelfile && ollama run {name}", "```", ""]
        v = doc["gguf_verified"]
        run_lines += [("The GGUF was checked with llama.cpp: greedy tokens equal transformers' on the same weights."
                       if v else "The GGUF was not checked with llama.cpp (install llama-cpp-python to check it)."
                       if v is None else "The GGUF's llama.cpp check did not pass; see slmforge.json."), ""]
    lines += run_lines
    lines += ["## Limitations", "",
              (f"A model this small ({doc['params'] / 1e6:.1f}M parameters, {doc['training_tokens']:,} training "
               f"tokens) knows the surface of its {domain} corpus, not the facts behind it: it produces "
               "fluent-looking text that is often wrong. Check anything it says against the source. It was trained "
               f"{'on general text' if model == 'generalist' else f'mostly on {domain} text'}; it is not a "
               "general assistant, and it has no safety tuning. Scores are on small benchmarks made from held-out "
               "pages of the same corpus (see the intervals in the slmforge report)."), ""]
    return "\n".join(lines)


def _score_lines(results: dict, model: str, doc: dict) -> list[str]:
    bench = results.get("benchmarks", {})
    if model not in bench and model not in results.get("scores", {}):
        return ["## Scores", "", ("evaluate did not score this model; add it to `evaluate.models` and run "
                                  "`slmforge evaluate` to get scores on the card."), ""]
    cols = [model] + (["generalist"] if model != "generalist" and "generalist" in bench else [])
    lines = ["## Scores", "", "Domain benchmarks (lm-evaluation-harness, test split) and bits per byte on each "
             "source's test split (lower is better). " + ("The generalist is a same-size model trained on general "
                                                          "text, for comparison." if len(cols) > 1 else ""), "",
             "| task · metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    headline = results.get("headline", {})
    for task, ms in sorted(bench.get(model, {}).items()):
        s = task.rsplit("_", 1)[-1]
        for metric, v in ms.items():
            if not isinstance(v, (int, float)):
                continue
            mark = " (headline)" if headline.get(s) == metric else ""
            cells = [f"{bench.get(c, {}).get(task, {}).get(metric, float('nan')):.3f}" for c in cols]
            lines.append(f"| {s} · {metric}{mark} | " + " | ".join(cells) + " |")
    for source in results.get("scores", {}).get(model, {}):
        cells = [f"{results['scores'].get(c, {}).get(source, {}).get('bpb', float('nan')):.3f}" for c in cols]
        lines.append(f"| bits per byte · {source} | " + " | ".join(cells) + " |")
    if sel := results.get("selection", {}).get(model):
        lines += ["", f"Weights: the `{sel['chosen']}` checkpoint, chosen on the dev set by {sel['metric']}."]
    return lines + [""]


def modelfile(gguf_name: str, chat: bool, context: int, template: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it. Chat models get the ChatML template (and the `[label] `
    prefix on user turns when the model's chat template adds it: rationale-distilled models); base models
    complete the raw prompt."""
    lines = [f"FROM ./{gguf_name}", ""]
    if chat:
        label = "[label] " if template and "[label]" in template else ""
        user = f'{{{{ if eq .Role "user" }}}}{label}{{{{ end }}}}' if label else ""
        # Ollama's documented ChatML template (docs/template.md); system turns come in .Messages too
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
                  f"{user}{{{{ .Content }}}}<|im_end|>", "{{ end }}<|im_start|>assistant", '"""',
                  'PARAMETER stop "<|im_end|>"']
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""']
    lines += ['PARAMETER stop "</s>"', f"PARAMETER num_ctx {context}", "PARAMETER temperature 0.7",
              "PARAMETER repeat_penalty 1.1", ""]
    return "\n".join(lines)


def _hf_folder(src: Path, dst: Path) -> None:
    """The HF files of `src`, unchanged except: tokenizer_config.json names PreTrainedTokenizerFast (which
    transformers 4 and 5 both load) without the local-loading flags, and config.json turns the KV cache on."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in HF_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    missing = [f for f in HF_FILES[:5] if not (dst / f).is_file()]
    if missing:
        raise UserError(f"{src}: missing {', '.join(missing)}; re-run the stage that made this model")
    tc = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("is_local", "local_files_only"):
        tc.pop(k, None)
    write_json_atomic(dst / "tokenizer_config.json", tc)
    c = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    c["use_cache"] = True
    write_json_atomic(dst / "config.json", c)


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path, store: ArtifactStore) -> dict:
    curate, evaluate = inputs["curate"], inputs["evaluate"]
    res_path = evaluate.path / "results.json"
    results = json.loads(res_path.read_text(encoding="utf-8")) if res_path.is_file() else evaluate.manifest["metrics"]
    roles = curate.manifest["metrics"]["roles"]
    want_verify = cfg.verify and cfg.gguf != "none"
    can_verify = want_verify and llama_cpp_available()
    if want_verify and not can_verify:
        info("  export · llama-cpp-python is not installed, so the GGUF files are not checked (gguf_verified: "
             "null). To check them: `make llama` (pip install llama-cpp-python; it builds llama.cpp from source, "
             "6-12 min on 2 cores), then "
             "`slmforge export --recipe RECIPE --force`")
    exports = {}
    for model in cfg.models:
        stage = MODELS[model]
        art = inputs[stage]
        if model not in art.manifest["metrics"].get("models", {}):
            raise UserError(f"export.models: the {stage} stage ({art.path}) made "
                            f"{', '.join(art.manifest['metrics'].get('models', {})) or 'no models'}, not {model!r}")
        name = cfg.export_name(model)
        evaluated = results.get("models", {}).get(model, {})
        scored = evaluated.get("stage") == stage and evaluated.get("key") == art.key
        src = art.path / model
        if scored and (sel := results.get("selection", {}).get(model)):
            src = Path(sel["path"])
        if not scored:
            why = (f"evaluate scored {stage}:{evaluated.get('key')}, not {art.ref}" if evaluated else
                   f"evaluate did not score {model!r}")
            info(f"  export · {name}: {why}; the card will have no scores (run `slmforge evaluate` first)")
        res = results if scored else {}
        sources = [s for s, r in roles.items() if r == ("general" if model == "generalist" else "domain")]
        dst = out / name
        info(f"  export · {model} → {name} (from {src})")
        _hf_folder(src, dst)
        hf_cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
        context = hf_cfg["max_position_embeddings"]
        chain = _chain(store, stage, art.key, model)
        meta = art.manifest["metrics"]["models"][model]
        chat = bool(meta.get("chat"))

        (dst / "domain").mkdir(exist_ok=True)
        router = None
        train = _sample_docs(curate, "train", sources, cfg.router_docs)
        test = _sample_docs(curate, "test", sources, cfg.router_docs)
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
                                          read_documents(curate.path / "data" / "test", s, columns=["text"])), 3))
                info(f"  export · {name}: llama.cpp vs transformers, greedy, {VERIFY_TOKENS} tokens per prompt")
                verification = verify_gguf(dst / gguf_file, dst, cfg.gguf, verify_prompts(tok, test_texts, chat),
                                           context)
                verified = verification["passed"]
                info(f"  export · {name}: {'[green]verified[/]' if verified else '[red]NOT verified[/]'} "
                     f"(agreement {verification['agreement']:.0%}, tokenization "
                     f"{'equal' if verification['tokenization_equal'] else 'DIFFERENT'})")
                if not verified:
                    raise UserError(_verification_error(dst / gguf_file, verification))
            verification = {**g, "verification": verification}

        lineage_start = {c["stage"]: c["key"] for c in chain} | {"curate": curate.key, "evaluate": evaluate.key}
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
                        "stages": _stages(store, lineage_start)},
            "scores": _scores(res, model),
            "training_tokens": sum(c["tokens"] for c in chain),
            "gguf": gguf_file, "gguf_verified": verified, "router": router,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (dst / "README.md").write_text(model_card({**doc, "shape": shape}, res, model, chain, cfg), encoding="utf-8")
        write_json_atomic(dst / "slmforge.json", doc)
        exports[name] = {"model": model, "source": str(src), "scored": scored, "gguf": verification,
                         "gguf_verified": verified, "router_docs": {"train": len(train), "test": len(test)}}
    return {"exports": exports}
