"""Structured pruning of a Llama model to a smaller Llama model, with importance measured on domain text.

The method is Minitron's (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation") with ShortGPT's layer score, on a domain calibration set as D-Pruner and Adapt-Pruner ask:
one forward pass of the teacher over a few hundred domain sequences, with hooks, gives
- each **FFN channel** j of a layer: mean |act(gate(x)) * up(x)|_j times the norm of down_proj's column j
  (the size of what the channel adds to the residual stream);
- each **attention head**: the mean L2 norm of its o_proj contribution; a **KV group** scores the sum of
  its query heads, so grouped-query attention stays uniform (kv_heads groups of heads/kv_heads queries);
- each **residual (hidden) channel**: the mean |x| of the RMSNorm outputs that feed every attention, MLP
  and the LM head (Minitron's embedding-channel score);
- each **layer**: block influence, 1 - mean cos(input, output) of its hidden states (Men et al. 2024):
  a layer that barely turns the residual stream is the first to go.
The student keeps the top-ranked structures of each kind, in their original order, with their weights
sliced out of the teacher's; it is a plain LlamaForCausalLM (export, GGUF and serving need nothing new).
With nothing removed the student is the teacher, bit for bit.

Sizes (`Sizes`: layers, hidden, heads, kv_heads, ffn): `target_sizes` scales every prunable dimension by one
width factor (and depth by the same factor) and takes the largest factor whose parameter count fits the
target; compress's `shape` setting fixes any of them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from slmforge.errors import UserError

DIMS = ("layers", "heads", "ffn", "hidden")


@dataclass(frozen=True)
class Sizes:
    """The sizes a pruned Llama model keeps (head_dim stays the teacher's)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int

    @classmethod
    def of(cls, config) -> Sizes:
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, config.intermediate_size)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def param_count(config, s: Sizes) -> int:
    """Parameters of a Llama model of `config` at shape `s` (embeddings, tied head or not, norms, biases)."""
    hd, h = head_dim(config), s.hidden
    attn = h * s.heads * hd * 2 + h * s.kv_heads * hd * 2
    if getattr(config, "attention_bias", False):
        attn += s.heads * hd + 2 * s.kv_heads * hd + h
    mlp = 3 * h * s.ffn + ((2 * s.ffn + h) if getattr(config, "mlp_bias", False) else 0)
    emb = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return emb + h + s.layers * (attn + mlp + 2 * h)


def _heads_at(config, w: float) -> tuple[int, int]:
    """(heads, kv_heads) nearest to w * heads with the same queries in every kept group (ties: more groups)."""
    kv, rep = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    want = config.num_attention_heads * w
    best = min(((g * r, g) for g in range(1, kv + 1) for r in range(1, rep + 1)),
               key=lambda x: (abs(x[0] - want), -x[1]))
    return best


def _round(n: float, multiple: int, top: int) -> int:
    return int(min(top, max(multiple, round(n / multiple) * multiple)))


def _hidden(top: int, want: float, heads: int, multiple: int) -> int:
    """A multiple of `heads` (and of `multiple` where the teacher's width allows) near `want`, at most `top`."""
    for step in (math.lcm(multiple, heads), heads):
        if step <= top:
            return int(min(top - top % step, max(step, round(want / step) * step)))
    return top


def sizes_at(config, w: float, dims=DIMS, multiple: int = 32) -> Sizes:
    """Every dimension in `dims` scaled by w (widths rounded to `multiple`; hidden also to a multiple of the
    heads, which transformers' LlamaConfig requires even with head_dim set), the others kept."""
    s = Sizes.of(config)
    heads, kv = _heads_at(config, w) if "heads" in dims else (s.heads, s.kv_heads)
    return Sizes(layers=max(1, round(s.layers * w)) if "layers" in dims else s.layers,
                 hidden=_hidden(s.hidden, s.hidden * w, heads, multiple) if "hidden" in dims else s.hidden,
                 heads=heads, kv_heads=kv,
                 ffn=_round(s.ffn * w, multiple, s.ffn) if "ffn" in dims else s.ffn)


def target_sizes(config, params: float, dims=DIMS) -> Sizes:
    """The largest uniform scaling of `dims` whose parameter count is at most `params`."""
    if not dims:
        raise UserError("compress.dims: name at least one of layers, heads, ffn, hidden to prune")
    for w in np.arange(1.0, 0.0, -0.0025):
        s = sizes_at(config, float(w), dims)
        if param_count(config, s) <= params:
            return s
    smallest = param_count(config, sizes_at(config, 0.0, dims))
    raise UserError(f"compress: no shape pruned along {', '.join(dims)} has at most {params / 1e6:.2f}M parameters "
                    f"(the smallest has {smallest / 1e6:.2f}M: the embeddings alone are "
                    f"{config.vocab_size * (32 if 'hidden' in dims else config.hidden_size) / 1e6:.2f}M); "
                    "prune `hidden` too, or ask for a larger compress.params / ratio")


# ---- importance ---------------------------------------------------------------------------------------
@dataclass
class Importance:
    """Scores measured on calibration text (higher: more important). Per layer lists are indexed by the
    teacher's layer, head and channel numbers."""

    layers: list[float]
    heads: list[list[float]]
    ffn: list[list[float]]
    hidden: list[float]
    tokens: int = 0


def importance(model, windows, micro_batch: int = 8, autocast=None) -> Importance:
    """Score every layer, head, FFN channel and hidden channel of a Llama `model` on `windows` ([N, T]
    token ids), in one forward pass with hooks (no gradients)."""
    import torch

    layers = model.model.layers
    cfg = model.config
    hd, nq, n = head_dim(cfg), cfg.num_attention_heads, len(layers)
    acc = {"bi": torch.zeros(n, dtype=torch.float64), "heads": torch.zeros(n, nq, dtype=torch.float64),
           "ffn": torch.zeros(n, cfg.intermediate_size, dtype=torch.float64),
           "hidden": torch.zeros(cfg.hidden_size, dtype=torch.float64)}
    hooks = []

    def on_norm(_m, _inp, out):
        acc["hidden"] += out.detach().float().abs().flatten(0, -2).sum(0).double()

    def on_down(i):
        def hook(m, inp):
            a = inp[0].detach().float().abs().flatten(0, -2).sum(0)
            acc["ffn"][i] += (a * m.weight.detach().float().norm(dim=0)).double()
        return hook

    def on_o(i):
        def hook(m, inp):
            x = inp[0].detach().float().flatten(0, -2).view(-1, nq, hd)  # [tokens, heads, head_dim]
            w = m.weight.detach().float().view(m.weight.shape[0], nq, hd)  # [hidden, heads, head_dim]
            acc["heads"][i] += torch.einsum("tnd,hnd->tnh", x, w).norm(dim=-1).sum(0).double()
        return hook

    def on_layer(i):
        def hook(_m, args, kwargs, out):
            h_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
            h_out = (out[0] if isinstance(out, tuple) else out).detach().float()
            acc["bi"][i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum().double()
        return hook

    for i, layer in enumerate(layers):
        hooks += [layer.input_layernorm.register_forward_hook(on_norm),
                  layer.post_attention_layernorm.register_forward_hook(on_norm),
                  layer.mlp.down_proj.register_forward_pre_hook(on_down(i)),
                  layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)),
                  layer.register_forward_hook(on_layer(i), with_kwargs=True)]
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    windows = torch.as_tensor(np.asarray(windows, dtype=np.int64))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (autocast or torch.autocast("cpu", enabled=False)):
            for i in range(0, len(windows), micro_batch):
                model(input_ids=windows[i:i + micro_batch].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    tokens = int(windows.numel())
    return Importance(layers=(acc["bi"] / tokens).tolist(), heads=(acc["heads"] / tokens).tolist(),
                      ffn=(acc["ffn"] / tokens).tolist(), hidden=(acc["hidden"] / tokens / (2 * n + 1)).tolist(),
                      tokens=tokens)


# ---- which structures stay ------------------------------------------------------------------------------
@dataclass
class Keep:
    """The teacher's indices the student keeps: layers, hidden channels, and per kept layer its KV groups,
    query heads (grouped: the queries of kv group k come k-th) and FFN channels."""

    layers: list[int]
    hidden: list[int]
    kv: dict[int, list[int]] = field(default_factory=dict)
    heads: dict[int, list[int]] = field(default_factory=dict)
    ffn: dict[int, list[int]] = field(default_factory=dict)


def _top(scores, k: int) -> list[int]:
    """The indices of the k highest scores, in ascending index order (a stable sort: ties keep the first)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return sorted(int(i) for i in order)


def choose(imp: Importance, config, s: Sizes) -> Keep:
    """Keep the highest-scoring structures of each kind, within each layer for heads and FFN channels."""
    rep = config.num_attention_heads // config.num_key_value_heads
    per_group = s.heads // s.kv_heads
    if s.heads % s.kv_heads or per_group > rep or s.kv_heads > config.num_key_value_heads:
        raise UserError(f"compress.shape: {s.heads} heads in {s.kv_heads} kv groups does not fit the teacher's "
                        f"{config.num_attention_heads} heads in {config.num_key_value_heads} groups (each kept group "
                        f"keeps the same number of its {rep} queries)")
    if s.hidden % s.heads:
        raise UserError(f"compress.shape: hidden {s.hidden} is not a multiple of heads {s.heads} (transformers' "
                        "LlamaConfig requires it); choose another hidden or heads")
    keep = Keep(layers=_top(imp.layers, s.layers), hidden=_top(imp.hidden, s.hidden))
    for i in keep.layers:
        heads = imp.heads[i]
        groups = [sum(heads[g * rep:(g + 1) * rep]) for g in range(config.num_key_value_heads)]
        keep.kv[i] = _top(groups, s.kv_heads)
        keep.heads[i] = [g * rep + q for g in keep.kv[i] for q in _top(heads[g * rep:(g + 1) * rep], per_group)]
        keep.ffn[i] = _top(imp.ffn[i], s.ffn)
    return keep


def record(imp: Importance, keep: Keep, config, s: Sizes) -> dict:
    """What was kept and why, for the manifest: per kind the count kept, the share of the total importance
    the kept structures hold, and the removed layers with their scores."""
    def share(scores, kept) -> float:
        total = float(np.sum(scores))
        return round(float(np.sum(np.asarray(scores)[kept])) / total, 4) if total else 1.0

    return {
        "shape": asdict(s), "teacher_shape": asdict(Sizes.of(config)), "calibration_tokens": imp.tokens,
        "layers": {"kept": keep.layers, "removed": [i for i in range(config.num_hidden_layers) if i not in keep.layers],
                   "block_influence": [round(x, 5) for x in imp.layers]},
        "hidden": {"kept": len(keep.hidden), "importance_kept": share(imp.hidden, keep.hidden)},
        "heads": {"kept_per_layer": s.heads, "kv_groups_per_layer": s.kv_heads,
                  "importance_kept": round(float(np.mean([share(imp.heads[i], keep.heads[i])
                                                          for i in keep.layers])), 4)},
        "ffn": {"kept_per_layer": s.ffn,
                "importance_kept": round(float(np.mean([share(imp.ffn[i], keep.ffn[i]) for i in keep.layers])), 4)},
    }


# ---- the student ----------------------------------------------------------------------------------------
def prune(model, keep: Keep):
    """A new LlamaForCausalLM holding the teacher's weights at the kept indices (the teacher is unchanged)."""
    from transformers import LlamaForCausalLM

    cfg = _student_config(model.config, keep)
    new = _sliced(model.state_dict(), keep, cfg.head_dim, cfg.tie_word_embeddings)
    dtype = next(model.parameters()).dtype
    student = LlamaForCausalLM(cfg).to(dtype)
    missing, unexpected = student.load_state_dict(new, strict=False)
    missing = [k for k in missing if "rotary" not in k and k != "lm_head.weight"]
    if missing or unexpected:  # a Llama variant with weights this function does not know how to slice
        raise UserError(f"compress: cannot prune this model: no sliced weights for {missing[:3]}, unknown "
                        f"{unexpected[:3]} (slmforge prunes Llama-architecture models)")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student


def _student_config(config, keep: Keep):
    """The teacher's config with the kept sizes (head_dim written out: it stays the teacher's)."""
    cfg = copy.deepcopy(config)
    first = keep.layers[0]
    cfg.head_dim = head_dim(config)
    cfg.num_hidden_layers = len(keep.layers)
    cfg.hidden_size = len(keep.hidden)
    cfg.num_attention_heads = len(keep.heads[first])
    cfg.num_key_value_heads = len(keep.kv[first])
    cfg.intermediate_size = len(keep.ffn[first])
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep.layers]
    return cfg


def _sliced(sd: dict, keep: Keep, hd: int, tied: bool) -> dict:
    """The student's state dict: each teacher weight (and bias) at the kept rows and columns, its layers
    renumbered in order; a tied head shares the embeddings."""
    import torch

    h = torch.tensor(keep.hidden)

    def rows(heads: list[int]):
        return torch.cat([torch.arange(x * hd, (x + 1) * hd) for x in heads])

    def put(name: str, src: str, out_idx=None, in_idx=None):
        w = sd[src]
        if out_idx is not None:
            w = w.index_select(0, out_idx)
        if in_idx is not None and w.ndim == 2:
            w = w.index_select(1, in_idx)
        new[name] = w.clone()
        bias = src.replace(".weight", ".bias")
        if bias != src and bias in sd:
            new[name.replace(".weight", ".bias")] = (sd[bias] if out_idx is None else sd[bias].index_select(0, out_idx)).clone()

    new: dict = {}
    put("model.embed_tokens.weight", "model.embed_tokens.weight", in_idx=h)
    put("model.norm.weight", "model.norm.weight", out_idx=h)
    if tied:
        new["lm_head.weight"] = new["model.embed_tokens.weight"]
    else:
        put("lm_head.weight", "lm_head.weight", in_idx=h)
    for j, i in enumerate(keep.layers):
        a, b = f"model.layers.{i}.", f"model.layers.{j}."
        q, kv, f = rows(keep.heads[i]), rows(keep.kv[i]), torch.tensor(keep.ffn[i])
        put(b + "self_attn.q_proj.weight", a + "self_attn.q_proj.weight", q, h)
        put(b + "self_attn.k_proj.weight", a + "self_attn.k_proj.weight", kv, h)
        put(b + "self_attn.v_proj.weight", a + "self_attn.v_proj.weight", kv, h)
        put(b + "self_attn.o_proj.weight", a + "self_attn.o_proj.weight", h, q)
        put(b + "mlp.gate_proj.weight", a + "mlp.gate_proj.weight", f, h)
        put(b + "mlp.up_proj.weight", a + "mlp.up_proj.weight", f, h)
        put(b + "mlp.down_proj.weight", a + "mlp.down_proj.weight", h, f)
        put(b + "input_layernorm.weight", a + "input_layernorm.weight", h)
        put(b + "post_attention_layernorm.weight", a + "post_attention_layernorm.weight", h)
    return new
