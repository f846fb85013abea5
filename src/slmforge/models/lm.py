"""Running a causal LM: the one log-likelihood loop and the one greedy-generate helper that
pretrain, evaluate, the router, post-training and export share."""

from __future__ import annotations


def nll(forward, x, y, batch_size: int, device=None, chunk: int = 2048, per_token: list | None = None) -> float:
    """Summed next-token negative log-likelihood in nats of targets `y` (-100 = not scored) given
    inputs `x` (both [n, seq] int64), `batch_size` rows per forward pass. `forward` is the model, or
    what accelerate/DDP made of it; logits are cast to float32 before the loss. The LM head and the loss
    run on `chunk` tokens at a time, so a batch's logits over the whole vocabulary never exist at once:
    SmolLM2's 49,152-token head made them 1.6 GB in float32 for 8 x 1024 tokens (evaluate's wall time
    with and without this, and its identical bits per byte: benchmarks/evaluate_speed.py). With a list as
    `per_token`, each batch's per-token losses (float32 [rows, seq], 0 where not scored) are appended."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    model = getattr(forward, "module", forward)  # a DDP wrapper's model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # FSDP gathers a layer's shards in the root module's forward: calling the decoder alone would see them
    # sharded, so a sharded model takes the whole forward pass.
    sharded = isinstance(forward, FullyShardedDataParallel | FSDPModule) or isinstance(model, FSDPModule)
    plain = head is not None and hasattr(model, "get_decoder") and not sharded and not any(
        getattr(model.config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            if not plain:
                logits = forward(input_ids=xb, use_cache=False).logits.float()
                losses = [F.cross_entropy(logits.flatten(0, 1), yb.flatten(), ignore_index=-100, reduction="none")]
            else:
                h = model.get_decoder()(input_ids=xb, use_cache=False).last_hidden_state.flatten(0, 1)
                flat = yb.flatten()
                losses = [F.cross_entropy(head(h[j:j + chunk]).float(), flat[j:j + chunk], ignore_index=-100,
                                          reduction="none") for j in range(0, len(h), chunk)]
            total += sum(v.sum().item() for v in losses)
            if per_token is not None:
                per_token.append(torch.cat(losses).view(yb.shape).cpu())
    return total


def float_logits(loaded):
    """(model, tokenizer) with the model's logits returned in float32 whatever its weights' dtype, so
    that lm-eval's log_softmax and our cross-entropy of a bfloat16 model are computed in float32 (in
    bfloat16 they round every log-probability to 8 bits of mantissa)."""
    import torch

    model, tok = loaded
    if model.dtype != torch.float32:
        model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out.float())
    return model, tok


def generate(model, tokenizer, prompt, max_new_tokens: int, **kwargs) -> str:
    """The model's continuation of `prompt` (a string, or chat messages rendered with the tokenizer's
    chat template and a generation prompt), greedy unless `kwargs` ask for sampling; special tokens
    are dropped from the text."""
    import torch

    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt")
    else:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
