"""Pruning and distillation on tiny Llama models: exactness, shapes, importance, the KD loss, KL falls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slmforge.errors import UserError
from slmforge.training import prune
from slmforge.training.distill import Distiller, kd_loss, mean_kl


def tiny(tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def windows(n: int = 8, t: int = 24, seed: int = 1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [True, False])
def test_pruning_nothing_keeps_the_teacher_exactly(tied):
    m, x = tiny(tied), windows()
    imp = prune.importance(m, x, micro_batch=4)
    s = prune.Sizes.of(m.config)
    student = prune.prune(m, prune.choose(imp, m.config, s)).eval()
    with torch.no_grad():
        assert torch.equal(m(x).logits, student(x).logits)
    assert sum(p.numel() for p in student.parameters()) == prune.param_count(m.config, s)


def test_removing_heads_and_channels_equals_zeroing_them_in_the_teacher():
    """Pruned heads and FFN channels (at full width and depth) must be exactly the structures whose
    output weights are zeroed: this checks the slicing of q/k/v/o, the GQA grouping and gate/up/down."""
    m, x = tiny(), windows()
    imp = prune.importance(m, x, micro_batch=4)
    s = prune.Sizes(layers=4, hidden=64, heads=2, kv_heads=1, ffn=40)
    keep = prune.choose(imp, m.config, s)
    student = prune.prune(m, keep).eval()
    zeroed = tiny()
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            for h in range(4):
                if h not in keep.heads[i]:
                    layer.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
            drop = [j for j in range(96) if j not in keep.ffn[i]]
            layer.mlp.down_proj.weight[:, drop] = 0
        assert torch.allclose(zeroed(x).logits, student(x).logits, atol=1e-5)
    assert all(len(keep.heads[i]) == 2 and keep.heads[i][0] // 2 == keep.heads[i][1] // 2 == keep.kv[i][0]
               for i in keep.layers)  # both kept queries belong to the kept KV group


def test_the_pruned_shape_and_parameter_count_meet_the_target():
    m = tiny(tied=False)
    full = prune.param_count(m.config, prune.Sizes.of(m.config))
    s = prune.target_sizes(m.config, 0.4 * full)
    student = prune.prune(m, prune.choose(prune.importance(m, windows(), 4), m.config, s))
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (s.layers, s.hidden, s.heads, s.kv_heads, s.ffn)
    n = sum(p.numel() for p in student.parameters())
    assert n == prune.param_count(m.config, s) and 0.3 * full < n <= 0.4 * full
    assert c.hidden_size % c.num_attention_heads == 0 and c.head_dim == 16
    with pytest.raises(UserError, match="no shape pruned along layers"):
        prune.target_sizes(m.config, 1000, dims=("layers",))  # the embeddings alone are larger


def test_importance_ranks_zeroed_structures_last():
    m, x = tiny(), windows()
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[:, 7] = 0  # FFN channel 7 of layer 1 adds nothing
        m.model.layers[2].self_attn.o_proj.weight[:, 3 * 16:4 * 16] = 0  # head 3 of layer 2 adds nothing
        m.model.layers[3].self_attn.o_proj.weight.zero_()  # layer 3 passes its input through unchanged
        m.model.layers[3].mlp.down_proj.weight.zero_()
    imp = prune.importance(m, x, micro_batch=4)
    assert int(np.argmin(imp.ffn[1])) == 7 and imp.ffn[1][7] == 0
    assert int(np.argmin(imp.heads[2])) == 3 and imp.heads[2][3] == 0
    assert int(np.argmin(imp.layers)) == 3 and imp.layers[3] == pytest.approx(0, abs=1e-6)
    keep = prune.choose(imp, m.config, prune.Sizes(layers=3, hidden=64, heads=2, kv_heads=1, ffn=95))
    assert 3 not in keep.layers and 7 not in keep.ffn[1] and keep.kv[2] == [0]
    rec = prune.record(imp, keep, m.config, prune.Sizes(layers=3, hidden=64, heads=2, kv_heads=1, ffn=95))
    assert rec["layers"]["removed"] == [3] and rec["ffn"]["importance_kept"] == pytest.approx(1.0, abs=0.02)


def test_kd_loss_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    y = rng.integers(0, 5, size=(2, 3))
    alpha, temp = 0.3, 2.0

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls, lt = log_softmax(s / temp), log_softmax(t / temp)
    kl = (np.exp(lt) * (lt - ls)).sum()
    ce = -np.take_along_axis(log_softmax(s), y[..., None], -1).sum()
    want = alpha * temp ** 2 * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha, temp)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(torch.tensor(s), None, torch.tensor(y), 0.0, temp)) == pytest.approx(ce, rel=1e-5)


def test_distillation_lowers_kl_to_the_teacher():
    teacher = tiny(seed=0)
    x = windows(16, 24, seed=2)
    imp = prune.importance(teacher, x, 4)
    student = prune.prune(teacher, prune.choose(imp, teacher.config, prune.target_sizes(
        teacher.config, 0.5 * prune.param_count(teacher.config, prune.Sizes.of(teacher.config)))))
    before = mean_kl(teacher, student, x)
    loss_fn = Distiller(teacher, alpha=1.0, temperature=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    student.train()
    for step in range(30):
        w = x[(step % 4) * 4:(step % 4 + 1) * 4]
        loss = loss_fn(student(input_ids=w[:, :-1]).logits, w) / w[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
    student.eval()
    after = mean_kl(teacher, student, x)
    assert after < 0.7 * before and math.isfinite(after)
    assert not any(p.requires_grad for p in teacher.parameters())
