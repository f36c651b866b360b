"""Visible tests for Parts A-C. Run: pytest exercises/unit2/test_attention.py"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autograder.checks import assert_close, check


def reference_sdpa(q, k, v, mask=None, is_causal=False):
    """torch's attention, pinned to the plain-PyTorch MATH backend (the course's oracle)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def _qkv(seed, lead=(2, 3), n_q=5, n_k=7, d=8, d_v=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, n_q, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, n_k, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, n_k, d_v, generator=g, dtype=torch.float64))


@pytest.mark.group("sdpa")
def test_sdpa_matches_torch(learner):
    attention = learner.module("attention")
    q, k, v = _qkv(0)
    unscaled = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    assert_close(attention.scaled_dot_product_attention(q, k, v), reference_sdpa(q, k, v), rtol=1e-10, atol=1e-12,
                 call="scaled_dot_product_attention(q[2,3,5,8], k[2,3,7,8], v[2,3,7,4])",
                 mistakes={"divide the scores by sqrt(d) = sqrt(q.shape[-1]) before the softmax": unscaled})


@pytest.mark.group("sdpa")
def test_causal_mask(learner):
    attention = learner.module("attention")
    got = attention.causal_mask(3, 4)
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    check(isinstance(got, torch.Tensor) and got.dtype == torch.bool and torch.equal(got, want),
          f"causal_mask(3, 4) returned {got!r}; expected {want!r} (True where key j <= query i)")
    q, k, v = _qkv(1, n_q=6, n_k=6)
    assert_close(attention.scaled_dot_product_attention(q, k, v, None, True), reference_sdpa(q, k, v, is_causal=True),
                 rtol=1e-10, atol=1e-12, call="scaled_dot_product_attention(q, k, v, is_causal=True), 6 tokens")


@pytest.mark.group("sdpa")
def test_fully_masked_row_gives_zeros(learner):
    attention = learner.module("attention")
    q, k, v = _qkv(2, lead=(1,), n_q=3, n_k=4)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False], [True, True, True, True]])
    got = attention.scaled_dot_product_attention(q, k, v, mask)
    check(isinstance(got, torch.Tensor) and not torch.isnan(got).any(),
          "a query row whose keys are all masked must give zeros, not NaN: shift such a row by 0, not by its max (-inf)")
    assert_close(got, reference_sdpa(q, k, v, mask), rtol=1e-10, atol=1e-12,
                 call="scaled_dot_product_attention with mask row 1 all False")


@pytest.mark.group("mha")
def test_mha_matches_torch_multihead_attention(learner):
    attention = learner.module("attention")
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    mine = attention.MultiHeadAttention(16, 4).double()
    mine.load_state_dict({"qkv.weight": ref.in_proj_weight.detach(), "qkv.bias": ref.in_proj_bias.detach(),
                          "out.weight": ref.out_proj.weight.detach(), "out.bias": ref.out_proj.bias.detach()})
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = ref(x, x, x, need_weights=False)[0].detach()
    assert_close(mine(x), want, rtol=1e-10, atol=1e-12, call="MultiHeadAttention(16, 4)(x[2,5,16])",
                 hint="q, k, v are the three d_model-wide parts of qkv(x); each splits into heads with "
                      "view(b, t, heads, head_dim).transpose(1, 2)")


@pytest.mark.group("mha")
def test_grouped_query_attention_shapes(learner):
    attention = learner.module("attention")
    mha = attention.MultiHeadAttention(24, 6, 2, causal=True)
    check(tuple(mha.qkv.weight.shape) == (24 + 2 * 2 * 4, 24), "qkv's weight has the wrong shape (it is given: do not change __init__)")
    y = mha(torch.randn(3, 7, 24))
    check(isinstance(y, torch.Tensor) and tuple(y.shape) == (3, 7, 24),
          f"MultiHeadAttention(24, 6, n_kv_heads=2)(x[3,7,24]) returned {getattr(y, 'shape', y)}; expected shape (3, 7, 24)")
    kv = torch.arange(2 * 3).reshape(1, 2, 3, 1).double()
    got = attention.repeat_kv(kv, 3)
    assert_close(got, kv.repeat_interleave(3, dim=1), call="repeat_kv(x[1,2,3,1], 3)",
                 mistakes={"consecutive query heads share a key/value head: (h0, h0, h0, h1, h1, h1), not (h0, h1, h0, h1, ...)":
                           kv.repeat(1, 3, 1, 1)})


@pytest.mark.group("rope")
def test_rope_formula(learner):
    attention = learner.module("attention")
    positions = torch.arange(5)
    cos, sin = attention.rope_cos_sin(positions, 4)
    theta = torch.tensor([1.0, 1e-2], dtype=torch.float64)  # 10000 ** (-2i / 4) for i = 0, 1
    angles = positions.double()[:, None] * theta
    want_cos = torch.cat([angles, angles], dim=-1).cos()
    shifted = (positions.double() + 1)[:, None] * theta
    assert_close(cos, want_cos, rtol=1e-12, atol=1e-12, call="rope_cos_sin(arange(5), head_dim=4)[0] (cos)",
                 mistakes={"positions start at 0: the first token's angle is 0 (no rotation); do not add 1":
                           torch.cat([shifted, shifted], dim=-1).cos()})
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = attention.apply_rope(x, positions)
    assert_close(got[:, :, 0], x[:, :, 0], rtol=1e-12, atol=1e-12, call="apply_rope(x, arange(5)) at position 0",
                 hint="position 0 is not rotated: cos(0) = 1, sin(0) = 0")
    x1, x2 = x.chunk(2, dim=-1)
    sin_want = torch.cat([angles, angles], dim=-1).sin()
    assert_close(got, x * want_cos + torch.cat([-x2, x1], dim=-1) * sin_want, rtol=1e-10, atol=1e-12,
                 call="apply_rope(x[1,2,5,4], arange(5))")
