"""One size dial -> a transformers LlamaConfig; build, load and save models with their tokenizer.

The dial is a target parameter count ("5M", "120M", "1.2B") or a depth. Everything else is derived
(nanochat's rule: one knob, the rest by formula), and every derived value is printed and recorded:
- width (hidden size) = `aspect` x depth (aspect 64: nanochat and GPT-2 small-ish shapes)
- attention heads = width / head_dim (head_dim 64, as in Llama); KV heads = the largest divisor of
  the heads up to heads / 4 when there are at least 8 heads (grouped-query attention as in Llama 3),
  else one per head
- FFN (SwiGLU) size = 8/3 x width rounded up to a multiple of 64 (Llama's rule keeps the FFN's
  parameters at 8 x width^2, like a 4x GELU MLP)
- context = 64 x depth rounded to a power of two, clamped to [256, 4096] (small models train on
  short windows; doubling the context roughly doubles attention cost per token)
- embeddings tied to the output layer: at these sizes the vocabulary matrix is a large share of
  the parameters (8192 x 256 = 2.1M of a 5M model)
Given a parameter target, the depth whose total parameter count is closest is chosen.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmforge.errors import UserError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*$")
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(text: str | float) -> float:
    """'5M' -> 5e6, '1.2B' -> 1.2e9, '2T' -> 2e12, 20000 -> 20000."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a count such as 5M, 120M or 1.2B")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


class ModelSize(BaseModel):
    """The size dial. Give `params` (a target such as 5M) or `depth`; the rest is derived."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: str | None = Field("5M", description="target total parameters, e.g. 5M, 120M, 1.2B")
    depth: int | None = Field(None, ge=1, le=128, description="number of layers (instead of params)")
    aspect: int = Field(64, ge=8, description="width per layer: hidden size = aspect x depth")
    head_dim: int = Field(64, ge=8, description="size of each attention head")
    context: int | None = Field(None, ge=16, description="sequence length; default 64 x depth as a power of 2 in [256, 4096]")

    @model_validator(mode="after")
    def _one_dial(self):
        if self.depth is not None and self.params is not None and "params" in self.model_fields_set:
            raise ValueError("give model.params or model.depth, not both. Choose one.")
        if self.depth is None and self.params is None:
            raise ValueError("give model.params (e.g. 5M) or model.depth")
        if self.params is not None and self.depth is None:
            parse_count(self.params)
        return self


def shape(depth: int, vocab_size: int, aspect: int = 64, head_dim: int = 64, context: int | None = None) -> dict:
    width = aspect * depth
    heads = max(1, width // head_dim)
    width = heads * head_dim  # keep width a multiple of the head size
    kv_heads = max(d for d in range(1, heads // 4 + 1) if heads % d == 0) if heads >= 8 else heads
    ffn = int(math.ceil(8 * width / 3 / 64) * 64)
    ctx = context or int(min(4096, max(256, 2 ** round(math.log2(64 * depth)))))
    per_layer = width * (heads * head_dim) + 2 * width * (kv_heads * head_dim) + (heads * head_dim) * width \
        + 3 * width * ffn + 2 * width
    params = depth * per_layer + vocab_size * width + width
    return {"depth": depth, "hidden_size": width, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "intermediate_size": ffn, "context": ctx, "params": params,
            "non_embedding_params": depth * per_layer}


def derive(size: ModelSize, vocab_size: int) -> dict:
    """The full shape for a dial setting (see the module docstring for the rules)."""
    if size.depth is not None:
        return shape(size.depth, vocab_size, size.aspect, size.head_dim, size.context)
    target = parse_count(size.params)
    best = min((shape(d, vocab_size, size.aspect, size.head_dim, size.context) for d in range(1, 129)),
               key=lambda s: abs(math.log(s["params"] / target)))
    return best


def llama_config(s: dict, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["depth"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], head_dim=s["head_dim"],
        max_position_embeddings=s["context"], rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        attn_implementation="sdpa",
    )


def build_model(size: ModelSize, tokenizer, seed: int = 0):
    """A randomly initialised LlamaForCausalLM for `tokenizer`, and the derived shape."""
    import torch
    from transformers import LlamaForCausalLM

    s = derive(size, len(tokenizer))
    cfg = llama_config(s, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    s["params"] = sum(p.numel() for p in model.parameters())
    return model, s


def load_model(path: str | Path, dtype=None, device: str | None = None):
    """A local HF checkpoint and its tokenizer: offline, safetensors only, no remote code; on `device`
    (a torch device string, e.g. from hardware.resolve_device) when given, else where transformers puts it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json). Give a folder written by "
                        f"save_pretrained, e.g. runs/demo/pretrain/<key>/specialist")
    if not list(path.glob("*.safetensors")):
        bins = " (only .bin)" if list(path.glob("*.bin")) else ""
        raise UserError(f"{path}: no .safetensors weights{bins}; slmforge loads only safetensors. Convert once: "
                        "`python -c \"from transformers import AutoModelForCausalLM as M; "
                        "M.from_pretrained('IN').save_pretrained('OUT')\"`")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                                 use_safetensors=True, dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model, tok


def shape_of(model, context: int) -> dict:
    """The shape of a loaded model in `shape()`'s keys (for continued pretraining); `context` as given."""
    c = model.config
    return {"depth": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "intermediate_size": c.intermediate_size, "context": context,
            "params": sum(p.numel() for p in model.parameters())}


def checkpoint_card(name: str, shape_: dict, data: dict, results: dict, about: str | None = None) -> str:
    """README.md with YAML front matter that the Hugging Face tooling reads."""
    import yaml

    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["slmforge", "llama"],
             "model_name": name}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             about or "A small Llama-architecture language model trained by slmforge.", "",
             "## Model", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in shape_.items()]
    lines += ["", "## Training data", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in data.items()]
    lines += ["", "## Results", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results.items()]
    return "\n".join(lines) + "\n"
