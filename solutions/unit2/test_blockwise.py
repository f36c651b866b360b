"""Visible tests for Parts D-E. Run: pytest exercises/unit2/test_blockwise.py"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autograder.checks import assert_close, check
from autograder.testing import remote_differentiable


def reference_sdpa(q, k, v, is_causal=False):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _qkv(seed, n_q=9, n_k=13, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, n, d, generator=g, dtype=dtype) for n in (n_q, n_k, n_k))


@pytest.mark.group("blockwise")
@pytest.mark.parametrize("is_causal", [False, True])
def test_blockwise_matches_attention(learner, is_causal):
    blockwise = learner.module("blockwise")
    q, k, v = _qkv(0)
    out, lse = blockwise.online_softmax_attention(q, k, v, is_causal, 4)
    assert_close(out, reference_sdpa(q, k, v, is_causal), rtol=1e-10, atol=1e-12,
                 call=f"online_softmax_attention(q[2,3,9,8], k[2,3,13,8], v, is_causal={is_causal}, block_size=4)",
                 hint="when a block raises the running max from m to m', multiply both the running sum and "
                      "the accumulator by exp(m - m') before adding the block's terms")
    scores = q @ k.transpose(-2, -1) / 8**0.5
    if is_causal:
        scores = scores.masked_fill(~torch.ones(9, 13, dtype=torch.bool).tril(), float("-inf"))
    assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-10, atol=1e-12, call="the lse it returned",
                 hint="lse = m + log(l): the final running max plus the log of the final running sum")


@pytest.mark.group("blockwise")
def test_blockwise_never_builds_the_score_matrix(learner):
    blockwise = learner.module("blockwise")
    q, k, v = _qkv(1, n_q=256, n_k=256, d=16, dtype=torch.float32)
    largest, out = learner.harness("largest_allocation", blockwise.blockwise_attention, [q, k, v, False, 32])
    full = 2 * 3 * 256 * 256 * 4
    check(largest < full / 4, f"blockwise_attention(n=256, block_size=32) created a {largest} byte tensor; the full "
                              f"score matrix is {full} bytes: work on [..., n_q, block_size] scores only")
    assert_close(out, reference_sdpa(q, k, v), rtol=1e-5, atol=1e-6, call="blockwise_attention(q[2,3,256,16], ...)")


@pytest.mark.group("blockwise_backward")
def test_memory_efficient_attention_gradcheck(learner):
    f = remote_differentiable(learner, learner.module("blockwise").memory_efficient_attention)
    q, k, v = (t[:1, :2].clone().requires_grad_() for t in _qkv(2, n_q=5, n_k=7, d=4))
    for is_causal in (False, True):
        ok = torch.autograd.gradcheck(lambda q, k, v: f(q, k, v, is_causal, 3), (q, k, v), raise_exception=False)
        check(ok, f"gradcheck disagrees with BlockwiseAttentionFunction.backward (float64, 5 queries, 7 keys, "
                  f"block_size=3, is_causal={is_causal}); compare it with the formulas in the class docstring")
