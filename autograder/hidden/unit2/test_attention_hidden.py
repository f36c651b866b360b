"""Hidden tests, Parts A-C: attention against torch's SDPA pinned to the MATH backend (any leading
dimensions, boolean masks, causal, fully-masked rows, extreme scores), multi-head attention against
torch.nn.MultiheadAttention and Hugging Face's GPT-2 attention, grouped queries against SDPA's
enable_gqa, and RoPE against Hugging Face Llama's apply_rotary_pos_emb."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from autograder.checks import assert_close, check

# float64 throughout Parts A-B: any correct order of operations agrees with torch to ~1e-15; the
# tolerances below leave room for a different summation order, not for a different formula.
EXACT = dict(rtol=1e-9, atol=1e-11)
# Shown instead of the other hints when NaN appears: a row whose keys are all masked has max -inf.
NAN_MASKED = ("a row whose keys are all masked must give zeros, not NaN: shift it by 0 instead of its max (-inf), "
              "and divide by 1 where the sum of its weights is 0")


def reference_sdpa(q, k, v, mask=None, is_causal=False, enable_gqa=False):
    with sdpa_kernel(SDPBackend.MATH):
        if mask is not None and is_causal:  # torch takes one or the other: fold causal into the mask
            mask = mask & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            is_causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)


def sdpa_mistakes(q, k, v, mask=None, is_causal=False):
    """What the usual wrong attentions give, for the hints."""
    d = q.shape[-1]
    allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    if is_causal:
        allowed = allowed.tril()
    if mask is not None:
        allowed = allowed & mask
    scores = q @ k.transpose(-2, -1)

    def masked(s):
        return s.masked_fill(~allowed, float("-inf"))

    return {
        "divide the scores by sqrt(d), d = q.shape[-1], before the softmax": torch.softmax(masked(scores), -1) @ v,
        "the softmax runs over the keys (the last dimension), not over the queries":
            torch.nan_to_num(torch.softmax(masked(scores / math.sqrt(d)), -2)) @ v,
        "mask the scores (-inf) before the softmax; zeroing weights after it leaves rows that do not sum to 1":
            (torch.softmax(scores / math.sqrt(d), -1) * allowed) @ v,
    }


def _randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# --- Part A ----------------------------------------------------------------------------------


@pytest.mark.group("sdpa")
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.explicit, Phase.generate])  # no shrinking: each example costs round trips
# Shrinking starts from the first option of each strategy: the first ones are the demanding cases.
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n_q=st.integers(2, 9), n_k=st.integers(2, 9),
       d=st.sampled_from([8, 3, 16, 1]), d_v=st.integers(1, 6), kind=st.sampled_from(["both", "mask", "causal", "none"]),
       draw=st.integers(0, 2**16))
# Cases the strategy reaches rarely, always tried: two batch dimensions with both masks and n_q < n_k;
# one query (a decoding step: causal top-left, it sees key 0 only); more queries than keys, d = 1.
@example(lead=[2, 3], n_q=3, n_k=9, d=8, d_v=5, kind="both", draw=0)
@example(lead=[], n_q=1, n_k=6, d=16, d_v=2, kind="causal", draw=1)
@example(lead=[3], n_q=9, n_k=2, d=1, d_v=1, kind="both", draw=2)
def test_sdpa_against_math_backend(learner, seed, lead, n_q, n_k, d, d_v, kind, draw):
    attention = learner.module("attention")
    gen = torch.Generator().manual_seed(seed ^ draw)
    q, k, v = _randn(gen, *lead, n_q, d), _randn(gen, *lead, n_k, d), _randn(gen, *lead, n_k, d_v)
    mask = None
    if kind in ("mask", "both"):
        mask = torch.rand(n_q, n_k, generator=gen) < 0.6
        mask[:, 0] = True  # every row keeps a key; fully-masked rows have their own test
    is_causal = kind in ("causal", "both")
    got = attention.scaled_dot_product_attention(q, k, v, mask, is_causal)
    assert_close(got, reference_sdpa(q, k, v, mask, is_causal), **EXACT,
                 call=f"scaled_dot_product_attention(q{list(q.shape)}, k{list(k.shape)}, v{list(v.shape)}, "
                      f"mask={'None' if mask is None else list(mask.shape)}, is_causal={is_causal}) (float64 randn, "
                      f"mask = rand < 0.6 with key 0 kept, from torch.Generator().manual_seed({seed ^ draw}))",
                 mistakes=sdpa_mistakes(q, k, v, mask, is_causal), nan_hint=NAN_MASKED)


@pytest.mark.group("sdpa")
def test_batch_dimensions_and_broadcast_masks(learner, torch_gen):
    attention = learner.module("attention")
    q, k, v = _randn(torch_gen, 2, 3, 4, 6, 8), _randn(torch_gen, 2, 3, 4, 5, 8), _randn(torch_gen, 2, 3, 4, 5, 7)
    mask = torch.rand(2, 1, 1, 1, 5, generator=torch_gen) < 0.7  # a padding mask, one row per batch item
    mask[..., 0] = True
    got = attention.scaled_dot_product_attention(q, k, v, mask)
    assert_close(got, reference_sdpa(q, k, v, mask), **EXACT,
                 call="scaled_dot_product_attention(q[2,3,4,6,8], k[2,3,4,5,8], v[2,3,4,5,7], mask[2,1,1,1,5])",
                 hint="every dimension before the last two is a batch dimension; the mask broadcasts like any tensor",
                 nan_hint=NAN_MASKED)


@pytest.mark.group("sdpa")
def test_fully_masked_rows_are_zero(learner, torch_gen):
    attention = learner.module("attention")
    q, k, v = _randn(torch_gen, 2, 6, 8), _randn(torch_gen, 2, 5, 8), _randn(torch_gen, 2, 5, 4)
    mask = torch.rand(2, 6, 5, generator=torch_gen) < 0.5
    mask[:, :, 2] = True
    mask[0, 1] = False
    mask[1, 4] = False
    got = attention.scaled_dot_product_attention(q, k, v, mask)
    assert_close(got, reference_sdpa(q, k, v, mask), **EXACT, nan_hint=NAN_MASKED, mistakes=sdpa_mistakes(q, k, v, mask),
                 call="scaled_dot_product_attention(q[2,6,8], k[2,5,8], v[2,5,4], mask[2,6,5] with rows [0,1] and [1,4] "
                      "all False)")
    weights = attention.masked_softmax(_randn(torch_gen, 2, 6, 5), mask)
    check(isinstance(weights, torch.Tensor) and not torch.isnan(weights).any(),
          f"masked_softmax(scores[2,6,5], mask) with rows [0,1] and [1,4] all masked gave NaN\nHint: {NAN_MASKED}")
    check(torch.equal(weights[0, 1], torch.zeros(5, dtype=torch.float64)) and torch.all(weights[~mask] == 0),
          "masked_softmax must give weight exactly 0 to masked keys, and an all-zero row when every key is masked")


@pytest.mark.group("sdpa")
def test_masked_softmax(learner, torch_gen):
    attention = learner.module("attention")
    scores = _randn(torch_gen, 3, 4, 7) * 5
    mask = torch.rand(3, 4, 7, generator=torch_gen) < 0.5
    mask[..., 3] = True
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    assert_close(attention.masked_softmax(scores, mask), want, **EXACT, call="masked_softmax(scores[3,4,7], mask)",
                 mistakes={"the softmax runs over the last dimension": torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-2)})
    assert_close(attention.masked_softmax(scores), torch.softmax(scores, -1), **EXACT, call="masked_softmax(scores[3,4,7]) (no mask)")


@pytest.mark.group("sdpa")
@pytest.mark.parametrize("n_q,n_k", [(7, 7), (3, 8), (8, 3)])
def test_causal(learner, torch_gen, n_q, n_k):
    attention = learner.module("attention")
    got = attention.causal_mask(n_q, n_k)
    want = torch.ones(n_q, n_k, dtype=torch.bool).tril()
    shown = lambda m: "\n    " + "\n    ".join("".join("x" if b else "." for b in row) for row in m.tolist())  # noqa: E731
    check(isinstance(got, torch.Tensor) and got.dtype == torch.bool and tuple(got.shape) == (n_q, n_k),
          f"causal_mask({n_q}, {n_k}) must return a bool tensor of shape ({n_q}, {n_k}); got {got!r}")
    check(torch.equal(got, want), f"causal_mask({n_q}, {n_k}) (x = may attend) is{shown(got)}\n  expected{shown(want)}\n"
                                  "  Hint: a query sees itself: the diagonal is included (tril(), not tril(-1) or tril(1))")
    q, k, v = _randn(torch_gen, 2, n_q, 4), _randn(torch_gen, 2, n_k, 4), _randn(torch_gen, 2, n_k, 3)
    assert_close(attention.scaled_dot_product_attention(q, k, v, None, True), reference_sdpa(q, k, v, is_causal=True),
                 **EXACT, call=f"scaled_dot_product_attention(q[2,{n_q},4], k[2,{n_k},4], v, is_causal=True)",
                 mistakes=sdpa_mistakes(q, k, v, None, True), nan_hint=NAN_MASKED)


@pytest.mark.group("sdpa")
def test_stable_with_huge_scores(learner, torch_gen):
    attention = learner.module("attention")
    q = _randn(torch_gen, 2, 5, 8, dtype=torch.float32) * 300  # scores ~ 1e5: exp overflows float32 at 89
    k, v = _randn(torch_gen, 2, 6, 8, dtype=torch.float32) * 30, _randn(torch_gen, 2, 6, 4, dtype=torch.float32)
    # Queries 1 and 3 score every key far below zero (about -3000 and less): exp(score - 0) is 0 in any
    # float type below about -104 (float32) or -745 (float64), so a shift that is not the row's max
    # (0, or a max clamped at 0) leaves 0 / 0.  Built on purpose: random rows get there only by chance.
    k[..., 0] = 30 + k[..., 0].abs()
    q[:, 1::2, 1:] /= 100
    q[:, 1::2, 0] = -300 - q[:, 1::2, 0].abs()
    got = attention.scaled_dot_product_attention(q, k, v, None, True)
    want = reference_sdpa(q.double(), k.double(), v.double(), is_causal=True)
    # float32 inputs, near-one-hot weights: each output is ~one value of v, rounded once or twice.
    assert_close(got, want, rtol=1e-4, atol=1e-4, dtype=torch.float32,
                 call="scaled_dot_product_attention(float32 q[2,5,8], k[2,6,8] with scores ~1e5, queries 1 and 3 "
                      "scoring every key below -1000, is_causal=True)",
                 hint="subtract each row's largest score before exp: exp(1e5) is inf in any float type, and exp(-1000) "
                      "is 0: shifted by anything but its max, such a row ends in 0 / 0",
                 nan_hint="subtract each row's own max, even when it is far below 0: exp(-1000 - 0) is 0, and 0 / 0 is NaN")


# bf16 on the CPU (the GPU tests are graded only where there is a GPU).  Part A computes q k^T in the
# inputs' dtype (a bf16 matmul: float32 accumulation, the result rounded to bf16), then the softmax in
# float32, the weights cast to bf16 for "@ v"; float32 scores are accepted too (torch's MATH backend
# upcasts).  The tolerance follows from bf16's 8 significant bits (a relative step of 2^-8): scores
# of order 3 are rounded by up to ~0.01, which moves the weights by ~1%, and the output, a convex
# combination of values of v ~ N(0, 1), by a few steps of |v| <= ~4 (the GPU test's tolerance).
BF16_TOL = dict(rtol=2e-2, atol=3e-2)


@pytest.mark.group("sdpa")
def test_sdpa_bfloat16_on_cpu(learner, torch_gen):
    attention = learner.module("attention")
    q, k, v = (_randn(torch_gen, 2, 4, 64, 64, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(2, 1, 1, 64, generator=torch_gen) < 0.8
    mask[..., 0] = True
    got = attention.scaled_dot_product_attention(q, k, v, mask, True)
    call = "scaled_dot_product_attention(q, k, v [2,4,64,64] bfloat16 on the CPU, mask[2,1,1,64], is_causal=True)"
    check(isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16,
          f"{call} returned {getattr(got, 'dtype', type(got).__name__)}; expected bfloat16 (v's dtype)")
    assert_close(got.float(), reference_sdpa(q.float(), k.float(), v.float(), mask, True), **BF16_TOL, call=call,
                 hint="compute the softmax in float32 (scores.float()), then cast the weights to v's dtype",
                 nan_hint=NAN_MASKED)


def _stored(learner, shape, dtype, seed):
    """A tensor kept on the learner's side, and the same values rebuilt here (harness.random_stored)."""
    here = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)).to(dtype)
    return learner.harness("random_stored", list(shape), dtype, "cpu", seed), here


def check_unchanged(learner, stored, sent, what, call):
    """What a learner-side argument holds after the call, against what was sent."""
    after = learner.harness("fetch", stored)
    if sent.dtype == torch.bool:  # compared as numbers (assert_close subtracts)
        after, sent = after.to(torch.int8) if isinstance(after, torch.Tensor) else after, sent.to(torch.int8)
    assert_close(after, sent, rtol=0, atol=0, call=f"{what} after {call}",
                 hint=f"{call} changed its argument {what} in place: work on new tensors (masked_fill, not "
                      "masked_fill_; x - m, not x.sub_(m) or x -= m)")


@pytest.mark.group("sdpa")
def test_sdpa_leaves_its_inputs_unchanged(learner, seed):
    """Each call runs on tensors kept on the learner's side, which are fetched afterwards: a function
    that works in place on its arguments would look right on a copy sent across."""
    attention = learner.module("attention")
    torch_lib = learner.lib("torch")
    (scores, scores_here), (q, q_here), (k, k_here), (v, v_here), (noise, noise_here) = (
        _stored(learner, shape, torch.float64, seed + i)
        for i, shape in enumerate([(2, 5, 7), (2, 5, 8), (2, 7, 8), (2, 7, 3), (2, 5, 7)]))
    mask = learner.harness("call_stored", torch_lib.gt, [noise, -0.5])  # a bool tensor kept there too
    mask_here = noise_here > -0.5
    call = "masked_softmax(scores[2,5,7], mask[2,5,7])"
    out = learner.harness("fetch", learner.harness("call_stored", attention.masked_softmax, [scores, mask]))
    assert_close(out, torch.softmax(scores_here.masked_fill(~mask_here, float("-inf")), -1).nan_to_num(), **EXACT,
                 call=call, nan_hint=NAN_MASKED)
    check_unchanged(learner, scores, scores_here, "scores", call)
    check_unchanged(learner, mask, mask_here, "mask", call)
    call = "scaled_dot_product_attention(q[2,5,8], k[2,7,8], v[2,7,3], mask[2,5,7], is_causal=True)"
    out = learner.harness("fetch", learner.harness("call_stored", attention.scaled_dot_product_attention, [q, k, v, mask, True]))
    assert_close(out, reference_sdpa(q_here, k_here, v_here, mask_here, True), **EXACT, call=call, nan_hint=NAN_MASKED)
    for stored, here, name in [(q, q_here, "q"), (k, k_here, "k"), (v, v_here, "v"), (mask, mask_here, "mask")]:
        check_unchanged(learner, stored, here, name, call)


# --- Part B ----------------------------------------------------------------------------------


def _split(x, heads):
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def _mha_reference(x, W, bias, W_o, b_o, n_heads, n_kv, mask=None, causal=False, positions=None, repeat="interleave"):
    """The course's MultiHeadAttention written with torch's SDPA (enable_gqa) and HF Llama's RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, e = x.shape
    hd = e // n_heads
    q, k, v = F.linear(x, W, bias).split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    q, k, v = _split(q, n_heads), _split(k, n_kv), _split(v, n_kv)
    if positions is not None:
        cos, sin = _rope_oracle(positions, hd)
        q, k = apply_rotary_pos_emb(q, k, cos if cos.dim() == 3 else cos[None], sin if sin.dim() == 3 else sin[None])
    if repeat == "tile":  # the wrong order, for the hint
        k, v = k.repeat(1, n_heads // n_kv, 1, 1), v.repeat(1, n_heads // n_kv, 1, 1)
    y = reference_sdpa(q, k, v, mask, causal, enable_gqa=repeat == "interleave" and n_kv != n_heads)
    return F.linear(y.transpose(1, 2).reshape(b, t, e), W_o, b_o)


def _weights(gen, e, n_heads, n_kv):
    hd = e // n_heads
    scale = 1 / math.sqrt(e)
    return (_randn(gen, (n_heads + 2 * n_kv) * hd, e) * scale, _randn(gen, (n_heads + 2 * n_kv) * hd) * 0.1,
            _randn(gen, e, e) * scale, _randn(gen, e) * 0.1)


@pytest.mark.group("mha")
@pytest.mark.parametrize("causal", [False, True])
def test_mha_against_torch_multihead_attention(learner, torch_gen, causal):
    attention = learner.module("attention")
    b, t, e, h = 3, 6, 24, 4
    ref = torch.nn.MultiheadAttention(e, h, batch_first=True).double()
    W, bias, W_o, b_o = _weights(torch_gen, e, h, h)
    with torch.no_grad():
        ref.in_proj_weight.copy_(W), ref.in_proj_bias.copy_(bias), ref.out_proj.weight.copy_(W_o), ref.out_proj.bias.copy_(b_o)
    mine = attention.MultiHeadAttention(e, h, causal=causal).double()
    mine.load_state_dict({"qkv.weight": W, "qkv.bias": bias, "out.weight": W_o, "out.bias": b_o})
    x = _randn(torch_gen, b, t, e)
    padding = torch.rand(b, t, generator=torch_gen) < 0.3  # torch: True = ignore this key
    padding[:, 0] = False
    with torch.no_grad():
        want = ref(x, x, x, key_padding_mask=padding, need_weights=False,
                   attn_mask=~torch.ones(t, t, dtype=torch.bool).tril() if causal else None)[0]
    got = mine(x, ~padding[:, None, None, :])
    assert_close(got, want, **EXACT, call=f"MultiHeadAttention({e}, {h}, causal={causal})(x[{b},{t},{e}], padding mask[{b},1,1,{t}])",
                 hint="torch's key_padding_mask is True where a key is ignored; the course's mask is True where it may be "
                      "used (the test already converted it). Split heads with view(b, t, heads, head_dim).transpose(1, 2)")


@pytest.mark.group("mha")
def test_mha_against_hf_gpt2_attention(learner, torch_gen):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    attention = learner.module("attention")
    b, t, e, h = 2, 7, 32, 4
    config = GPT2Config(n_embd=e, n_head=h, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, attn_implementation="eager")
    ref = GPT2Attention(config, layer_idx=0).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(_randn(torch_gen, *p.shape) * 0.2)
    mine = attention.MultiHeadAttention(e, h, causal=True).double()
    # HF's Conv1D keeps weights as (in, out); nn.Linear as (out, in).
    mine.load_state_dict({"qkv.weight": ref.c_attn.weight.detach().T.contiguous(), "qkv.bias": ref.c_attn.bias.detach(),
                          "out.weight": ref.c_proj.weight.detach().T.contiguous(), "out.bias": ref.c_proj.bias.detach()})
    x = _randn(torch_gen, b, t, e)
    padding = torch.zeros(b, t, dtype=torch.bool)
    padding[1, -2:] = True  # the second sequence is two tokens shorter
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & ~padding[:, None, None, :]
    additive = torch.zeros(b, 1, t, t, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    with torch.no_grad():
        want = ref(x, attention_mask=additive)[0]
    assert_close(mine(x, ~padding[:, None, None, :]), want, **EXACT,
                 call=f"MultiHeadAttention({e}, {h}, causal=True) with GPT-2 weights, x[{b},{t},{e}]",
                 hint="the causal mask and the padding mask must both hold (a key must pass both)")


@pytest.mark.group("mha")
@pytest.mark.parametrize("n_heads,n_kv", [(6, 2), (8, 4), (4, 1)])
def test_grouped_query_attention(learner, torch_gen, n_heads, n_kv):
    attention = learner.module("attention")
    b, t, e = 2, 5, 8 * n_heads
    W, bias, W_o, b_o = _weights(torch_gen, e, n_heads, n_kv)
    mine = attention.MultiHeadAttention(e, n_heads, n_kv, causal=True).double()
    mine.load_state_dict({"qkv.weight": W, "qkv.bias": bias, "out.weight": W_o, "out.bias": b_o})
    x = _randn(torch_gen, b, t, e)
    args = (x, W, bias, W_o, b_o, n_heads, n_kv, None, True)
    assert_close(mine(x), _mha_reference(*args), **EXACT,
                 call=f"MultiHeadAttention({e}, n_heads={n_heads}, n_kv_heads={n_kv}, causal=True)(x[{b},{t},{e}])",
                 mistakes={"query head i uses key/value head i // (n_heads // n_kv_heads): repeat each kv head in place "
                           "(repeat_interleave), not the whole stack (repeat)": _mha_reference(*args, repeat="tile")})
    kv = _randn(torch_gen, 2, n_kv, 3, 4)
    assert_close(attention.repeat_kv(kv, n_heads // n_kv), kv.repeat_interleave(n_heads // n_kv, dim=1), **EXACT,
                 call=f"repeat_kv(x[2,{n_kv},3,4], {n_heads // n_kv})")


@pytest.mark.group("mha")
def test_split_and_merge_heads(learner, torch_gen):
    attention = learner.module("attention")
    mha = attention.MultiHeadAttention(12, 3)
    x = _randn(torch_gen, 2, 5, 12, dtype=torch.float32)
    split = mha.split_heads(x, 3)
    assert_close(split, x.view(2, 5, 3, 4).transpose(1, 2), rtol=0, atol=0, call="split_heads(x[2,5,12], 3)",
                 mistakes={"view as (b, t, heads, head_dim) and then swap t and heads; viewing as (b, heads, t, head_dim) "
                           "mixes tokens into heads": x.view(2, 3, 5, 4)})
    assert_close(mha.merge_heads(split), x, rtol=0, atol=0, call="merge_heads(split_heads(x, 3))",
                 hint="merge_heads undoes split_heads: transpose(1, 2) then reshape(b, t, heads * head_dim)")


# --- Part C ----------------------------------------------------------------------------------


def _rope_oracle(positions, head_dim, base=10000.0, shift=0, layout="half", dtype=torch.float64):
    theta = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    angles = (positions + shift).to(dtype)[..., None] * theta
    angles = torch.cat([angles, angles], -1) if layout == "half" else angles.repeat_interleave(2, -1)
    return angles.cos().double(), angles.sin().double()


@pytest.mark.group("rope")
@pytest.mark.parametrize("head_dim,base", [(8, 10000.0), (64, 10000.0), (32, 500000.0)])
def test_rope_cos_sin(learner, torch_gen, head_dim, base):
    attention = learner.module("attention")
    positions = torch.randint(0, 8192, (2, 9), generator=torch_gen)
    positions[0, 0] = 0
    cos, sin = attention.rope_cos_sin(positions, head_dim, base)
    want_cos, want_sin = _rope_oracle(positions, head_dim, base)
    # float64 angles up to 8192 rad: rounding differences of order 1e-12; float32 would be 1e-3 off.
    call = f"rope_cos_sin(positions[2,9] up to 8191, head_dim={head_dim}, base={base:g})"
    assert_close(cos, want_cos, rtol=0, atol=1e-9, call=call + " -> cos", mistakes={
        "positions start at 0: the token at position p turns by p * theta, so position 0 is not rotated (no + 1)":
            _rope_oracle(positions, head_dim, base, shift=1)[0],
        "use the half-split layout: feature i pairs with feature i + head_dim/2, so repeat the angles as "
        "cat([angles, angles]) (not interleaved)": _rope_oracle(positions, head_dim, base, layout="interleaved")[0],
        "compute the angles in float64: in float32, position * theta is off by ~1e-3 rad at position 8000":
            _rope_oracle(positions, head_dim, base, dtype=torch.float32)[0],
    })
    assert_close(sin, want_sin, rtol=0, atol=1e-9, call=call + " -> sin")


@pytest.mark.group("rope")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_apply_rope_against_hf_llama(learner, torch_gen, dtype, per_sequence):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = learner.module("attention")
    b, h, t, d = 2, 3, 7, 16
    q = _randn(torch_gen, b, h, t, d, dtype=dtype)
    positions = (torch.randint(0, 100, (b, 1), generator=torch_gen) + torch.arange(t)) if per_sequence else torch.arange(t)
    cos, sin = _rope_oracle(positions, d)
    want, _ = apply_rotary_pos_emb(q.double(), q.double(), cos if per_sequence else cos[None], sin if per_sequence else sin[None])
    got = attention.apply_rope(q, positions)
    # float32: one rounding of x*cos + rot(x)*sin, values of order 1.
    tol = EXACT if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(got, want, dtype=dtype, **tol,
                 call=f"apply_rope(x[{b},{h},{t},{d}] {str(dtype)[6:]}, positions{list(positions.shape)})",
                 mistakes={"rotate_half([x1, x2]) is [-x2, x1]: the sign is on the second half":
                           apply_rotary_pos_emb(q.double(), q.double(), cos if per_sequence else cos[None],
                                                -(sin if per_sequence else sin[None]))[0]},
                 hint="positions [b, t] belong to x [b, heads, t, d]: insert the heads axis into cos and sin")


@pytest.mark.group("rope")
def test_apply_rope_leaves_x_unchanged(learner, seed):
    """apply_rope on a tensor kept on the learner's side, fetched afterwards (see the sdpa test)."""
    attention = learner.module("attention")
    x, x_here = _stored(learner, (2, 3, 5, 8), torch.float64, seed)
    positions = torch.tensor([[0, 2, 3, 7, 11], [5, 6, 7, 8, 9]])
    call = "apply_rope(x[2,3,5,8], positions[2,5])"
    out = learner.harness("fetch", learner.harness("call_stored", attention.apply_rope, [x, positions]))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = _rope_oracle(positions, 8)
    assert_close(out, apply_rotary_pos_emb(x_here, x_here, cos, sin)[0], **EXACT, call=call)
    check_unchanged(learner, x, x_here, "x", call)


@pytest.mark.group("rope")
def test_rope_scores_depend_on_relative_position(learner, torch_gen):
    attention = learner.module("attention")
    q, k = _randn(torch_gen, 1, 1, 6, 32), _randn(torch_gen, 1, 1, 6, 32)
    p = torch.randint(0, 1000, (6,), generator=torch_gen)
    shift = int(torch.randint(1, 1000, (1,), generator=torch_gen))
    scores = attention.apply_rope(q, p) @ attention.apply_rope(k, p).transpose(-2, -1)
    shifted = attention.apply_rope(q, p + shift) @ attention.apply_rope(k, p + shift).transpose(-2, -1)
    assert_close(shifted, scores, rtol=1e-9, atol=1e-9, call=f"RoPE scores q.k with every position moved by {shift}",
                 hint="rotating q and k by angles that depend on position makes q.k depend only on their distance; "
                      "rotate each (i, i + head_dim/2) pair by the same angle in both")


# --- Part B with Part C: after the RoPE tests, so that a RoPE mistake is named there first ----------


@pytest.mark.group("mha")
def test_mha_with_rope(learner, torch_gen):
    attention = learner.module("attention")
    b, t, e, h, kv = 2, 6, 32, 4, 2
    W, bias, W_o, b_o = _weights(torch_gen, e, h, kv)
    mine = attention.MultiHeadAttention(e, h, kv, causal=True, rope=True).double()
    mine.load_state_dict({"qkv.weight": W, "qkv.bias": bias, "out.weight": W_o, "out.bias": b_o})
    x = _randn(torch_gen, b, t, e)
    default = torch.arange(t)
    # Attention with RoPE on both q and k depends only on position differences: moving every position
    # by the same amount changes nothing here (rope_cos_sin and apply_rope are tested on absolute
    # positions below).  Positions with uneven gaps tell whether the given positions are used at all.
    ignored = _mha_reference(x, W, bias, W_o, b_o, h, kv, None, True, default)
    assert_close(mine(x), ignored, **EXACT,
                 call=f"MultiHeadAttention({e}, {h}, {kv}, causal=True, rope=True)(x[{b},{t},{e}])",
                 hint="RoPE rotates q and k (not v) after split_heads, before repeat_kv")
    uneven = {"positions[t]": torch.tensor([0, 3, 4, 9, 10, 17]),
              f"positions[{b},{t}]": torch.stack([torch.randperm(200, generator=torch_gen)[:t].sort().values for _ in range(b)])}
    for name, positions in uneven.items():
        assert_close(mine(x, None, positions), _mha_reference(x, W, bias, W_o, b_o, h, kv, None, True, positions), **EXACT,
                     call=f"the same module with {name} = {positions.tolist()}",
                     mistakes={"forward must rotate q and k to the positions it is given ([t] or [b, t]); arange(t) is "
                               "only the default": ignored},
                     hint="positions [b, t] belong to x [b, heads, t, d]: insert the heads axis into cos and sin")
