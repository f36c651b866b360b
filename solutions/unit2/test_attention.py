"""Visible tests for Parts A-C. Run: pytest exercises/unit2/test_attention.py"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autograder.checks import assert_close, check

# Shown when NaN appears where a row's keys are all masked (its max is -inf, and -inf - -inf is NaN).
NAN_MASKED = ("a row whose keys are all masked must give zeros, not NaN: shift it by 0 instead of its max (-inf), "
              "and divide by 1 where the sum of its weights is 0")


def reference_sdpa(q, k, v, mask=None, is_causal=False):
    """torch's attention, pinned to the plain-PyTorch MATH backend (the course's oracle)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def _qkv(seed, lead=(2, 3), n_q=5, n_k=7, d=8, d_v=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, n_q, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, n_k, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, n_k, d_v, generator=g, dtype=torch.float64))


def _mistakes(q, k, v, allowed):
    """What the usual wrong attentions give (for the hints), with ``allowed`` the bool mask."""
    scores = q @ k.transpose(-2, -1)
    d = q.shape[-1]
    return {"divide the scores by sqrt(d) = sqrt(q.shape[-1]) before the softmax":
                torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v,
            "mask the scores (-inf) before the softmax; zeroing weights after it leaves rows that do not sum to 1":
                (torch.softmax(scores / math.sqrt(d), -1) * allowed) @ v}


def _shown(m):
    return "\n    " + "\n    ".join("".join("x" if b else "." for b in row) for row in m.tolist())


@pytest.mark.group("sdpa")
def test_sdpa_matches_torch(learner):
    attention = learner.module("attention")
    q, k, v = _qkv(0)
    unscaled = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    over_queries = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-2) @ v
    assert_close(attention.scaled_dot_product_attention(q, k, v), reference_sdpa(q, k, v), rtol=1e-10, atol=1e-12,
                 call="scaled_dot_product_attention(q[2,3,5,8], k[2,3,7,8], v[2,3,7,4]) (float64, _qkv(seed=0))",
                 mistakes={"divide the scores by sqrt(d) = sqrt(q.shape[-1]) before the softmax": unscaled,
                           "the softmax runs over the keys (the last dimension), not over the queries": over_queries})


@pytest.mark.group("sdpa")
def test_causal_mask(learner):
    attention = learner.module("attention")
    got = attention.causal_mask(3, 4)
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    check(isinstance(got, torch.Tensor) and got.dtype == torch.bool and tuple(got.shape) == (3, 4),
          f"causal_mask(3, 4) must return a bool tensor of shape (3, 4); got {got!r}")
    check(torch.equal(got, want), f"causal_mask(3, 4) (x = may attend) is{_shown(got)}\n  expected{_shown(want)}\n"
                                  "Hint: a query sees itself: the diagonal is included (tril(), not tril(-1) or tril(1))")
    q, k, v = _qkv(1, n_q=6, n_k=6)
    assert_close(attention.scaled_dot_product_attention(q, k, v, None, True), reference_sdpa(q, k, v, is_causal=True),
                 rtol=1e-10, atol=1e-12, call="scaled_dot_product_attention(q[2,3,6,8], k[2,3,6,8], v, is_causal=True)",
                 mistakes=_mistakes(q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()))


@pytest.mark.group("sdpa")
def test_fully_masked_row_gives_zeros(learner):
    attention = learner.module("attention")
    q, k, v = _qkv(2, lead=(1,), n_q=3, n_k=4)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False], [True, True, True, True]])
    got = attention.scaled_dot_product_attention(q, k, v, mask)
    assert_close(got, reference_sdpa(q, k, v, mask), rtol=1e-10, atol=1e-12,
                 call="scaled_dot_product_attention(q[1,3,8], k[1,4,8], v[1,4,4], mask[3,4] with row 1 all False)",
                 mistakes=_mistakes(q, k, v, mask),
                 nan_hint=NAN_MASKED)


@pytest.mark.group("mha")
def test_split_and_merge_heads_round_trip(learner):
    attention = learner.module("attention")
    mha = attention.MultiHeadAttention(12, 3)
    x = torch.arange(2 * 5 * 12, dtype=torch.float32).reshape(2, 5, 12)
    split = mha.split_heads(x, 3)
    assert_close(split, x.view(2, 5, 3, 4).transpose(1, 2), rtol=0, atol=0, call="split_heads(x[2,5,12], 3), x = arange",
                 mistakes={"view as (b, t, heads, head_dim) and then swap t and heads; viewing as (b, heads, t, head_dim) "
                           "mixes tokens into heads": x.view(2, 3, 5, 4)})
    try:
        merged = mha.merge_heads(split)
    except RuntimeError as error:
        if "view" not in str(error):
            raise
        check(False, f"merge_heads(split_heads(x, 3)) raised: {error}\n"
                     "Hint: after transpose the tensor is not contiguous: use reshape(b, t, heads * head_dim), not view")
    assert_close(merged, x, rtol=0, atol=0, call="merge_heads(split_heads(x, 3))",
                 hint="merge_heads undoes split_heads: transpose(1, 2) then reshape(b, t, heads * head_dim)")


def _mha(x, W, b, W_o, b_o, heads, split="right"):
    """The course's multi-head attention written out here, or with the usual wrong head split."""
    bsz, t, e = x.shape
    q, k, v = F.linear(x, W, b).split(e, dim=-1)
    if split == "right":
        q, k, v = (y.view(bsz, t, heads, -1).transpose(1, 2) for y in (q, k, v))
    else:  # viewing [b, t, H*hd] directly as [b, H, t, hd]
        q, k, v = (y.reshape(bsz, heads, t, -1) for y in (q, k, v))
    y = reference_sdpa(q, k, v)
    return F.linear(y.transpose(1, 2).reshape(bsz, t, e), W_o, b_o)


@pytest.mark.group("mha")
def test_mha_matches_torch_multihead_attention(learner):
    attention = learner.module("attention")
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    weights = [ref.in_proj_weight.detach(), ref.in_proj_bias.detach(), ref.out_proj.weight.detach(), ref.out_proj.bias.detach()]
    mine = attention.MultiHeadAttention(16, 4).double()
    mine.load_state_dict(dict(zip(["qkv.weight", "qkv.bias", "out.weight", "out.bias"], weights)))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = ref(x, x, x, need_weights=False)[0].detach()
    assert_close(mine(x), want, rtol=1e-10, atol=1e-12, call="MultiHeadAttention(16, 4)(x[2,5,16]) (torch.manual_seed(0))",
                 mistakes={"split heads with view(b, t, heads, head_dim).transpose(1, 2); viewing [b, t, heads * head_dim] "
                           "directly as [b, heads, t, head_dim] mixes tokens into heads": _mha(x, *weights, 4, split="wrong")},
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


FLOAT32_ANGLES = "compute the angles in float64: in float32, position * theta is off by ~1e-3 rad at position 8000"


def _cos(positions, head_dim, shift=0, dtype=torch.float64):
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    angles = (positions + shift).to(dtype)[:, None] * theta
    return torch.cat([angles, angles], dim=-1).double().cos()


@pytest.mark.group("rope")
def test_rope_formula(learner):
    attention = learner.module("attention")
    positions = torch.arange(5)
    cos, sin = attention.rope_cos_sin(positions, 4)
    theta = torch.tensor([1.0, 1e-2], dtype=torch.float64)  # 10000 ** (-2i / 4) for i = 0, 1
    angles = positions.double()[:, None] * theta
    want_cos = torch.cat([angles, angles], dim=-1).cos()
    assert_close(cos, want_cos, rtol=1e-12, atol=1e-12, call="rope_cos_sin(arange(5), head_dim=4)[0] (cos)",
                 mistakes={"positions start at 0: the first token's angle is 0 (no rotation); do not add 1":
                           _cos(positions, 4, shift=1), FLOAT32_ANGLES: _cos(positions, 4, dtype=torch.float32)})
    far = torch.tensor([0, 1, 4097, 8000, 8191])
    assert_close(attention.rope_cos_sin(far, 64)[0], _cos(far, 64), rtol=0, atol=1e-9,
                 call="rope_cos_sin(tensor([0, 1, 4097, 8000, 8191]), head_dim=64)[0] (cos)",
                 mistakes={FLOAT32_ANGLES: _cos(far, 64, dtype=torch.float32)})
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = attention.apply_rope(x, positions)
    assert_close(got[:, :, 0], x[:, :, 0], rtol=1e-12, atol=1e-12, call="apply_rope(x, arange(5)) at position 0",
                 hint="position 0 is not rotated: cos(0) = 1, sin(0) = 0")
    x1, x2 = x.chunk(2, dim=-1)
    sin_want = torch.cat([angles, angles], dim=-1).sin()
    assert_close(got, x * want_cos + torch.cat([-x2, x1], dim=-1) * sin_want, rtol=1e-10, atol=1e-12,
                 call="apply_rope(x[1,2,5,4], arange(5))",
                 mistakes={"rotate_half([x1, x2]) is [-x2, x1]: the sign is on the second half":
                           x * want_cos - torch.cat([-x2, x1], dim=-1) * sin_want})
