"""GGUF for llama.cpp and Ollama: a writer for our Llama HF folders and a check that llama.cpp decodes the
file like transformers.

GGUF is written with the `gguf` package's GGUFWriter, the way llama.cpp's convert_hf_to_gguf.py writes
a Llama (architecture "llama", its tensor names from gguf's own HF-name map, q/k rows permuted for
llama.cpp's RoPE layout, the byte-level BPE as tokenizer.ggml.model "gpt2" with the pre-tokenizer
llama.cpp runs the same way as tokenizer.json's: "llama-bpe" for our own tokenizers (their Split regex is
Llama 3's), "gpt-2" for GPT-2's ByteLevel regex, SmolLM2's as transformers reads it from its GGUF). `verify_gguf` has llama.cpp (xllamacpp's prebuilt wheel) load the
file and greedy-decode a few prompts; its tokens must equal transformers' on the same weights (rounded to
the GGUF's float type), and its tokenization must equal the HF tokenizer's.

(This module is `slmforge.deploy.gguf`; `import gguf` in it is the PyPI package: imports are absolute.)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from slmforge.common import cut_at_word
from slmforge.errors import UserError
from slmforge.models.chat import IM_END, strip_generation_marks

VERIFY_TOKENS = 16  # greedy tokens compared per prompt


# ---- writing ---------------------------------------------------------------------------------------
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _permute(w, n_head: int):
    """HF stores q/k rows as [all first halves | all second halves] per head (rotate_half RoPE); llama.cpp
    rotates adjacent pairs. Same permutation as convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Llama 3's pre-tokenizer regex: llama.cpp's "llama-bpe" (LLAMA_VOCAB_PRE_TYPE_LLAMA3) runs exactly this
LLAMA_BPE_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(tj: dict, where: Path) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the pre-tokenizer of tokenizer.json `tj`, or a UserError:
    a GGUF with the wrong one tokenizes differently from transformers (SmolLM2's "gpt-2" regex and
    "llama-bpe" split "pg_foreign_table\n\nThe" differently)."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and (steps[0].get("pattern") or {}).get("Regex") == LLAMA_BPE_SPLIT
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return "llama-bpe"
    raise UserError(f"{where}: GGUF export knows the pre-tokenizers of Llama 3 (our own tokenizers) and GPT-2 "
                    f"(SmolLM2), not {json.dumps(pre)[:200]}; set export.gguf: none to export without GGUF")


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

    cfg = _llama_config(model_dir)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    _add_hyperparameters(w, cfg, outtype, name, description)
    _add_tokenizer(w, model_dir, cfg["vocab_size"])
    n_written = _add_tensors(w, model_dir, cfg, outtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "outtype": outtype, "tensors": n_written, "bytes": path.stat().st_size}


def _llama_config(model_dir: Path) -> dict:
    """config.json of a Llama model this writer supports (no RoPE scaling), or a UserError."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise UserError(f"{model_dir / 'config.json'}: model_type {cfg.get('model_type')!r}; GGUF export "
                        "writes Llama models only")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise UserError(f"{model_dir / 'config.json'}: RoPE scaling is not supported by this exporter")
    return cfg


def _add_hyperparameters(w, cfg: dict, outtype: str, name: str, description: str | None) -> None:
    """The model's name and shape, as llama.cpp's llama architecture reads them, and the file type."""
    import gguf

    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    w.add_name(name)
    if description:
        w.add_description(description)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w, model_dir: Path, n_vocab: int) -> None:
    """The byte-level BPE as llama.cpp's "gpt2" model: tokens, their types, the pre-tokenizer, merges,
    special token ids and the chat template (without {% generation %} marks)."""
    import gguf

    tokens, types = _tokens(model_dir, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")),
                                      model_dir / "tokenizer.json"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    # gguf's SpecialVocab reads the merges, bos/eos/pad ids and add_bos (from the post-processor); it logs a
    # warning about our pair template (<s> A <s> B), which llama.cpp never uses
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("eos", False)
    if IM_END in tokens:  # chat turns end with IM_END: an end-of-generation token for llama.cpp
        w.add_eot_token_id(tokens.index(IM_END))
    if special.chat_template:
        special.chat_template = strip_generation_marks(special.chat_template)
    special.add_to_gguf(w, quiet=True)  # merges, bos/eos/pad ids, add_bos (from the post-processor)


def _add_tensors(w, model_dir: Path, cfg: dict, outtype: str) -> int:
    """model.safetensors under gguf's llama tensor names, q/k rows permuted for llama.cpp's RoPE, each in
    its GGML type; returns how many tensors were added."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    n_written = 0
    for hf_name, data in load_file(str(model_dir / "model.safetensors")).items():
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
        qtype = _tensor_type(data, outtype)
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(new, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(new, data)
        else:
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        n_written += 1
    return n_written


def _tensor_type(data, outtype: str):
    """The GGML type of one tensor: norms (1-D) stay float32 in every type, as llama.cpp's converter keeps
    them; q8_0 matrices whose rows are not a multiple of the 32-value block are written in f16."""
    import gguf

    qtype = gguf.GGMLQuantizationType.F32
    if data.ndim == 2 and outtype != "f32":
        qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
                 "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # rows not a multiple of the 32-value block
    return qtype


# ---- verification with llama.cpp -------------------------------------------------------------------
# llama.cpp through xllamacpp (PyPI, MIT): a prebuilt CPU wheel of llama.cpp's own library and server code
# (glibc 2.17+, no compiler, about 34 MB, installed with `make setup`). llama-cpp-python has no wheel on
# PyPI (a source build of llama.cpp) and llama-cpp-py-sync's wheels need glibc 2.38 (Debian 12 has 2.36).
LLAMA_CPP_PACKAGE = "xllamacpp"


def llama_cpp_available() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_version() -> str:
    """The binding's version; its last number is the llama.cpp build (b11549 for 2026.10.11549)."""
    from importlib.metadata import version

    return f"{LLAMA_CPP_PACKAGE} {version(LLAMA_CPP_PACKAGE)}"


def _server_params(path: Path, context: int, parallel: int, threads: int | None):
    """xllamacpp's CommonParams for the GGUF at `path`: `parallel` slots over `context` tokens in all,
    `threads` CPU threads (default: up to 4), llama.cpp's own log lines off."""
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = str(path)
    p.n_ctx = context
    p.n_parallel = parallel
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads or min(os.cpu_count() or 1, 4)
    p.verbosity = -1
    return p


class LlamaCpp:
    """One GGUF file in llama.cpp: greedy tokens, tokenization and chat-template rendering, each by
    llama.cpp's own server code in this process (xllamacpp.Server). Its HTTP routes listen on a loopback
    port behind a random API key for as long as the object lives; completions are called in process."""

    def __init__(self, path: Path, context: int, threads: int | None = None):
        import secrets

        import xllamacpp

        p = _server_params(path, context, 1, threads)
        self._key = secrets.token_hex(16)
        p.api_keys = [self._key]
        self.server = xllamacpp.Server(p)

    def _post(self, route: str, body: dict) -> dict:
        import httpx

        r = httpx.post(self.server.listening_address + route, json=body, timeout=120,
                       headers={"Authorization": f"Bearer {self._key}"})
        r.raise_for_status()
        return r.json()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens for `text`: BOS as the GGUF's add_bos_token says, special tokens parsed."""
        return self._post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt llama-server makes of `messages`: the GGUF's chat template rendered by llama.cpp's
        Jinja engine (a leading BOS stripped), then tokenized with BOS and special tokens."""
        return self.tokenize(self._post("/apply-template", {"messages": messages})["prompt"])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n argmax tokens after `ids`. llama.cpp stops at an end-of-generation token (and ignore_eos works
        by banning those tokens, which changes the argmax), so after a stop it is asked again with the stop
        token appended, to compare n tokens as transformers' loop makes them."""
        out: list[int] = []
        while len(out) < n:
            r = self.server.handle_completions({"prompt": ids + out, "n_predict": n - len(out), "temperature": 0,
                                                "n_probs": 1, "cache_prompt": True})
            if "error" in r:
                raise RuntimeError(f"llama.cpp: {r['error']}")
            got = [t["id"] for t in r["choices"][0]["logprobs"]["content"]]
            if not got:
                raise RuntimeError("llama.cpp returned no token")
            out += got
        return out[:n]

    def close(self) -> None:
        del self.server


def llama_server(path: Path, host: str, port: int, context: int | None, parallel: int, alias: str | None,
                 threads: int | None, info=print) -> None:
    """llama.cpp's own OpenAI-compatible server (xllamacpp's, continuous batching over `parallel` slots of
    `context` tokens, default the GGUF's context length) for the GGUF at `path`, until interrupted: the
    fastest way to serve an export on a CPU, and an endpoint for the catalog or `serve.fallback`."""
    import gguf

    if not llama_cpp_available():
        raise UserError("llama-server needs xllamacpp: `make llama` (or pip install -e .[llama])")
    import xllamacpp

    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file (export writes <name>.<type>.gguf in each model folder)")
    if context is None:
        field = gguf.GGUFReader(str(path)).fields.get("llama.context_length")
        context = int(field.contents()) if field is not None else 2048
    p = _server_params(path, context * parallel, parallel, threads)  # llama-server splits n_ctx among slots
    p.hostnames, p.port = [host], port
    p.cont_batching = True
    p.model_alias = {alias or path.name.split(".")[0]}
    server = xllamacpp.Server(p)
    info(f"llama.cpp server for {path.name} as model {next(iter(p.model_alias))!r} on "
         f"{server.listening_address}/v1 ({parallel} slots of {context} tokens); Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    finally:
        del server


def reference_model(model_dir: Path, outtype: str):
    """The HF model with its matrices rounded to the GGUF's float type and back (norms stay float32,
    as in the GGUF), so that f16/bf16 files are compared with the weights they actually hold."""
    import torch

    from slmforge.models.modeling import load_model

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
    does not), and each step's logits. (Not lm.generate: the check needs every step's logits for its
    near-tie rule, and model.generate stops at EOS or, with min_new_tokens, masks it.)"""
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


CHAT_CHECK = [{"role": "user", "content": "What does VACUUM do?"}]  # the chat turn both engines render


def verify_prompts(tok, texts: list[str], chat: bool, k: int = 3) -> list[str]:
    """Prompts for the check: the starts of `k` held-out domain documents, and for a chat model one
    question through its chat template (special tokens in the text)."""
    prompts = [cut_at_word(t, 200) for t in texts[:k]]
    if chat and tok.chat_template:
        text = tok.apply_chat_template(CHAT_CHECK, add_generation_prompt=True, tokenize=False)
        prompts.append(text.removeprefix(tok.bos_token or ""))  # the tokenizer adds BOS itself
    return prompts or ["The"]


def verify_gguf(gguf_path: Path, model_dir: Path, outtype: str, prompts: list[str], context: int,
                n_tokens: int = VERIFY_TOKENS, threads: int | None = None, chat: bool = False) -> dict:
    """Greedy decoding with llama.cpp vs transformers on the same token ids, and tokenization of each prompt;
    with `chat`, also the chat prompt llama.cpp renders from the GGUF's template against transformers'
    apply_chat_template(tokenize=True) (one BOS in both: the convention in slmforge.models.chat).

    For f32/f16/bf16 the tokens must be equal (`passed`), except at a near tie: where the two first differ,
    if transformers' logits for the two tokens are within `tie_tolerance`, the rest of the sequence cannot
    be compared and the prompt counts as matching up to there (float rounding decides a tie, not a bug).
    For q8_0 the weights differ by design, so the agreement (matching prefix / tokens) is reported.
    """
    model, tok = reference_model(model_dir, outtype)
    # Logit gaps this small flip with accumulation order (llama.cpp's f16/bf16 matmuls also round the
    # activations). Export's verification records each first difference and its logit gap
    # (`first_difference.logit_gap`); on the demo's dpo model f32 and f16 agree everywhere and bf16's
    # flips come at gaps far below this tolerance (benchmarks/gguf_verify.py prints the agreement).
    tie_tolerance = {"f32": 1e-3, "f16": 2e-2, "bf16": 2e-2}.get(outtype)
    started = time.time()
    # transformers first, then llama.cpp: the two thread pools taking turns per token oversubscribe the cores
    # (on 2 busy cores a check of seconds took about a minute, at commit 763e19e)
    ids = [tok(p)["input_ids"] for p in prompts]
    ref = [hf_greedy(model, x[: max(1, context - n_tokens)], n_tokens) for x in ids]
    del model
    hf_chat = None
    if chat and tok.chat_template:
        hf_chat = list(tok.apply_chat_template(CHAT_CHECK, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
    llm = LlamaCpp(gguf_path, context, threads)
    rows = []
    for prompt, full, (want, logits) in zip(prompts, ids, ref):
        hf_ids = full[: max(1, context - n_tokens)]
        ll_ids = llm.tokenize(prompt)
        got = llm.greedy(hf_ids, n_tokens)
        prefix = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), n_tokens)
        row = {"prompt": prompt[:120], "prompt_tokens": len(hf_ids), "tokenization_equal": ll_ids == full,
               "transformers": want, "llama_cpp": got, "matching_prefix": prefix}
        if prefix < n_tokens:
            gap = float(logits[prefix][want[prefix]] - logits[prefix][got[prefix]])
            row["first_difference"] = {"position": prefix, "logit_gap": round(gap, 6)}
            row["near_tie"] = tie_tolerance is not None and gap <= tie_tolerance
        rows.append(row)
    chat_row = None
    if hf_chat is not None:
        ll_chat = llm.chat_tokens(CHAT_CHECK)
        chat_row = {"messages": CHAT_CHECK, "transformers": hf_chat, "llama_cpp": ll_chat, "equal": ll_chat == hf_chat}
    llm.close()
    agreement = sum(r["matching_prefix"] for r in rows) / (n_tokens * len(rows))
    tokens_ok = all(r["tokenization_equal"] for r in rows)
    chat_ok = chat_row is None or chat_row["equal"]
    exact = tie_tolerance is not None
    passed = tokens_ok and chat_ok and (all(r["matching_prefix"] == n_tokens or r.get("near_tie") for r in rows)
                                        if exact else True)
    return {"outtype": outtype, "passed": passed, "exact": exact, "agreement": round(agreement, 4),
            "tokenization_equal": tokens_ok, "chat_template_equal": chat_row["equal"] if chat_row else None,
            "tokens_per_prompt": n_tokens, "tie_tolerance": tie_tolerance, "engine": llama_cpp_version(),
            "seconds": round(time.time() - started, 2), "prompts": rows, "chat": chat_row}


def verification_error(path: Path, v: dict) -> str:
    """The UserError message for a failed `verify_gguf` report: the first prompt that failed, and why."""
    if v.get("chat") and not v["chat"]["equal"]:
        c = v["chat"]
        return (f"{path}: llama.cpp renders and tokenizes the chat template to {c['llama_cpp']}, transformers to "
                f"{c['transformers']} (a BOS more or less, or a template llama.cpp's Jinja reads differently); "
                "please report it, or set export.verify: false to keep the file unchecked")
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
