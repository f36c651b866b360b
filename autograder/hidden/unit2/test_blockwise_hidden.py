"""Hidden tests, Parts D-E: blockwise attention against SDPA's MATH backend (block sizes that do not
divide the length, causal with n_q != n_k, extreme scores), its log-sum-exp, that no [n_q, n_k]
tensor is ever created, and the recomputation backward (float64 gradcheck, float32 against autograd,
what it saves)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autograder.checks import assert_close, check
from autograder.testing import remote_differentiable, saved_tensor_shapes


def reference_sdpa(q, k, v, is_causal=False):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _scores(q, k, is_causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(), float("-inf"))
    return scores


def reference_lse(q, k, is_causal=False):
    return torch.logsumexp(_scores(q, k, is_causal), dim=-1)


def unrescaled_sum(q, k, v, block, is_causal=False):
    """The online softmax with the running sum never rescaled (the accumulator is): for the hint."""
    scores = _scores(q, k, is_causal)
    final_max = scores.amax(-1, keepdim=True)
    total = torch.zeros_like(final_max)
    for start in range(0, k.shape[-2], block):
        s = scores[..., start : start + block]
        running = scores[..., : start + block].amax(-1, keepdim=True)
        total = total + torch.exp(s - running).sum(-1, keepdim=True)
    return (torch.exp(scores - final_max) @ v) / total


def _qkv(gen, lead, n_q, n_k, d, d_v=None, dtype=torch.float64):
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(*lead, n_q, d), make(*lead, n_k, d), make(*lead, n_k, d_v or d)


@pytest.mark.group("blockwise")
@pytest.mark.parametrize("n_q,n_k,block,is_causal", [
    (17, 17, 5, True), (17, 17, 5, False), (6, 23, 4, False), (6, 23, 4, True), (20, 9, 3, True), (8, 8, 64, True),
])
def test_online_softmax_against_math_backend(learner, torch_gen, n_q, n_k, block, is_causal):
    blockwise = learner.module("blockwise")
    q, k, v = _qkv(torch_gen, (2, 3), n_q, n_k, 8, 5)
    q = q * 3  # spread the scores so the running max moves between blocks
    out, lse = blockwise.online_softmax_attention(q, k, v, is_causal, block)
    call = f"online_softmax_attention(q[2,3,{n_q},8], k[2,3,{n_k},8], v[2,3,{n_k},5], is_causal={is_causal}, block_size={block})"
    assert_close(out, reference_sdpa(q, k, v, is_causal), rtol=1e-9, atol=1e-11, call=call + " -> out",
                 mistakes={"when the running max grows from m to m', rescale the running sum too: l = l * exp(m - m') + rowsum(p)":
                           unrescaled_sum(q, k, v, block, is_causal)},
                 hint="causal is top-left aligned (key j <= query i) as in Part A, and the last block may be shorter")
    assert_close(lse, reference_lse(q, k, is_causal), rtol=1e-9, atol=1e-11, call=call + " -> lse",
                 mistakes={"lse = m + log(l), the log-sum-exp of the scaled scores: add the running max back":
                           reference_lse(q, k, is_causal) - _scores(q, k, is_causal).amax(-1)})


@pytest.mark.group("blockwise")
def test_blockwise_stable_with_huge_scores(learner, torch_gen):
    blockwise = learner.module("blockwise")
    q, k, v = _qkv(torch_gen, (2,), 12, 40, 16, dtype=torch.float32)
    q = q * 100  # scores ~ 1e3-1e4: exp overflows float32 unless the running max is subtracted
    got = blockwise.blockwise_attention(q, k, v, True, 8)
    check(isinstance(got, torch.Tensor) and bool(torch.isfinite(got).all()),
          "blockwise_attention gave inf/NaN for scores ~1e4: subtract the running max before exp, and rescale by exp(m - m')")
    # float32 inputs, near-one-hot rows: the output is a rounded copy of one row of v.
    assert_close(got, reference_sdpa(q.double(), k.double(), v.double(), True), rtol=1e-4, atol=1e-4, dtype=torch.float32,
                 call="blockwise_attention(float32, scores ~1e4, is_causal=True, block_size=8)")


@pytest.mark.group("blockwise")
@pytest.mark.parametrize("block", [1, 7, 1000])
def test_any_block_size(learner, torch_gen, block):
    blockwise = learner.module("blockwise")
    q, k, v = _qkv(torch_gen, (3,), 11, 29, 4)
    assert_close(blockwise.blockwise_attention(q, k, v, False, block), reference_sdpa(q, k, v), rtol=1e-9, atol=1e-11,
                 call=f"blockwise_attention(q[3,11,4], k[3,29,4], v, block_size={block})")


@pytest.mark.group("blockwise")
def test_forward_memory_is_blockwise(learner, torch_gen):
    blockwise = learner.module("blockwise")
    n, block = 512, 32
    q, k, v = _qkv(torch_gen, (1, 2), n, n, 16, dtype=torch.float32)
    largest, out = learner.harness("largest_allocation", blockwise.blockwise_attention, [q, k, v, True, block])
    full = 2 * n * n * 4  # the float32 score matrix of both heads
    check(largest <= full / 8, f"blockwise_attention(n={n}, block_size={block}) created a tensor of {largest / 2**20:.2f} MiB; "
                               f"the full score matrix is {full / 2**20:.0f} MiB and one block of scores "
                               f"{2 * n * block * 4 / 2**20:.2f} MiB: slice k and v with [..., start:end, :] and keep "
                               f"only running statistics")
    # float32 over 1024 keys: sums of 1024 terms, rounded in a different order than torch's.
    assert_close(out, reference_sdpa(q.double(), k.double(), v.double(), True), rtol=1e-4, atol=1e-5,
                 call=f"blockwise_attention(q[1,2,{n},16] float32, causal)")


# --- Part E ----------------------------------------------------------------------------------


@pytest.mark.group("blockwise_backward")
@pytest.mark.parametrize("n_q,n_k,block,is_causal", [(5, 9, 4, False), (7, 7, 3, True), (9, 4, 3, True)])
def test_gradcheck_float64(learner, torch_gen, n_q, n_k, block, is_causal):
    f = remote_differentiable(learner, learner.module("blockwise").memory_efficient_attention)
    q, k, v = (t.requires_grad_() for t in _qkv(torch_gen, (1,), n_q, n_k, 4, 3))
    ok = torch.autograd.gradcheck(lambda q, k, v: f(q, k, v, is_causal, block), (q, k, v), raise_exception=False)
    check(ok, f"gradcheck fails for memory_efficient_attention (float64, {n_q} queries, {n_k} keys, block_size={block}, "
              f"is_causal={is_causal}): check D = rowsum(dO * O), dS = P * (dP - D), and the 1/sqrt(d) in dQ and dK")


@pytest.mark.group("blockwise_backward")
@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_against_autograd(learner, torch_gen, is_causal):
    f = remote_differentiable(learner, learner.module("blockwise").memory_efficient_attention)
    q, k, v = _qkv(torch_gen, (2, 2), 33, 47 if not is_causal else 33, 16, 8, dtype=torch.float32)
    grad = torch.randn(2, 2, 33, 8, generator=torch_gen)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*mine, is_causal, 16).backward(grad)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    reference_sdpa(*ref, is_causal).backward(grad.double())
    # float32 recomputation: P is rebuilt from exp(s - lse) in float32, gradients sum over ~40 keys.
    for name, got, want in zip("qkv", mine, ref):
        assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4, dtype=torch.float32,
                     call=f"d{name} of memory_efficient_attention(float32, 33 queries, block_size=16, is_causal={is_causal})",
                     hint="return gradients in the input's dtype and shape; dK and dV are built block by block")


@pytest.mark.group("blockwise_backward")
def test_saves_no_score_matrix(learner, torch_gen):
    blockwise = learner.module("blockwise")
    q, k, v = _qkv(torch_gen, (2,), 64, 64, 8, dtype=torch.float32)
    shapes = saved_tensor_shapes(learner, blockwise.memory_efficient_attention, q, k, v, True, 16)
    saved = sum(int(torch.Size(s).numel()) for s in shapes)
    budget = 4 * q.numel() + 2 * 64
    check(0 < saved <= budget, f"memory_efficient_attention saved {shapes} ({saved} numbers) for backward; q, k, v, out "
                               f"and lse are all it needs ({budget}): save them with ctx.save_for_backward, and "
                               "recompute the probabilities in backward")
    largest, _ = learner.harness("largest_allocation", blockwise.memory_efficient_attention, [q, k, v, True, 16], True)
    full = 2 * 64 * 64 * 4
    check(largest <= full / 2, f"forward + backward created a tensor of {largest} bytes; the score matrix is {full}: "
                               "in backward, recompute one [n_q, block_size] block of probabilities at a time")
