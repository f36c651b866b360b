"""Visible tests for Part C. Run: pytest exercises/unit1/test_fused.py"""

import math
import re

import pytest
import torch

from autograder.checks import assert_close, check
from autograder.testing import remote_differentiable, saved_tensor_shapes


BIASED = "LayerNorm uses the biased variance (divide by D, not D - 1)"
EPS_INSIDE = "eps goes inside the square root: rstd = 1 / sqrt(var + eps)"


@pytest.mark.group("fused")
def test_forward_matches_torch(learner):
    """Its last row is almost constant: a variance (about 1e-6) below eps, where eps's place matters."""
    fused = learner.module("fused")
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[3] = 1e-3 * torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    y = fused.layer_norm(x, w, b, 1e-5)
    centered = x - x.mean(-1, keepdim=True)
    assert_close(y, torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5), rtol=1e-10, atol=1e-10,
                 call="layer_norm(x[4,8] float64, w[8], b[8]), x[3] nearly constant",
                 mistakes={BIASED: centered / torch.sqrt(x.var(-1, unbiased=True, keepdim=True) + 1e-5) * w + b,
                           EPS_INSIDE: centered / (x.var(-1, unbiased=False, keepdim=True).sqrt() + 1e-5) * w + b})


@pytest.mark.group("fused")
def test_gradcheck(learner):
    """The output and the gradients against torch's layer_norm, here in the test; then gradcheck,
    which compares your backward with finite differences of your forward."""
    fused = learner.module("fused")
    f = remote_differentiable(learner, fused.layer_norm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    gy = torch.randn(3, 5, dtype=torch.float64, generator=g)
    f(x, w, b, 1e-5).backward(gy)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.layer_norm(xr, (5,), wr, br, 1e-5).backward(gy)
    rstd = torch.rsqrt(xr.detach().var(-1, unbiased=False, keepdim=True) + 1e-5)
    for name, got, want in (("grad_x", x.grad, xr.grad), ("grad_weight", w.grad, wr.grad), ("grad_bias", b.grad, br.grad)):
        g_hat = gy * wr.detach()
        assert_close(got, want, rtol=1e-10, atol=1e-10, call=f"layer_norm(x[3,5] float64) backward: {name}",
                     mistakes={"the mean and variance depend on x too: grad_x needs the two mean terms": g_hat * rstd,
                               "grad_x needs the variance term too: - xhat * mean(g * xhat)":
                               rstd * (g_hat - g_hat.mean(-1, keepdim=True))} if name == "grad_x" else None)
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b))
    try:
        torch.autograd.gradcheck(lambda x, w, b: f(x, w, b, 1e-5), inputs)
    except torch.autograd.gradcheck.GradcheckError as exc:
        found = re.search(r"with respect to input (\d)", str(exc))
        name = ["x", "weight", "bias"][int(found.group(1))] if found else "an input"
        check(False, f"torch.autograd.gradcheck (float64, x[3,5]): your gradient for {name} disagrees with finite "
                     "differences of your forward\nHint: compare your backward with the formula in the handout")


# What layer_norm keeps alive for backward, measured outside your process when graded
# (Cost.kept_bytes: the anonymous memory a call leaves behind): x[256, 4096] float64 is 8 MiB, "a
# unit".  The grader's sandbox makes the allocator give every block of 128 KiB or more its own
# mapping, returned to the system when freed, so the figure moves by one unit per full-size tensor.
MEMORY_SHAPE = (256, 4096)
FORWARDS = 4
KEPT_LIMIT = 2.5  # units a forward: y and xhat make 2; plain autograd ops keep 3 or 4
HELD_LIMIT = 4 * 2**20  # held beyond the inputs before the first forward, in a fresh process (measured: under 1 MiB)


def _random(shape, seed, scale=1.0):
    """Uniform in [-scale, scale), float64: made here, and the same on the learner's side (_stored)."""
    return torch.empty(*shape, dtype=torch.float64).uniform_(-scale, scale, generator=torch.Generator().manual_seed(seed))


def _stored(learner, shape, seed, scale=1.0, leaf=True):
    """_random(shape, seed, scale) made on the learner's side and kept there: only the seed crosses."""
    torch_lib = learner.lib("torch")
    made = learner.harness("call_stored", torch_lib.empty, list(shape), {"dtype": torch.float64})
    made = learner.harness("call_stored", torch_lib.Tensor.uniform_, [made, -scale, scale],
                           {"generator": torch_lib.Generator().manual_seed(seed)})
    return learner.harness("call_stored", torch_lib.Tensor.requires_grad_, [made]) if leaf else made


@pytest.mark.fresh_worker
@pytest.mark.group("fused")
def test_saves_only_what_backward_needs(learner, seed):
    """What layer_norm keeps for backward, measured two ways.  In your process (a helper of the
    grader, right around one call): the shapes your autograd.Function saved.  Outside your process
    (when graded; a run of your own measures in-process and does not judge this part): the memory
    four forwards on x[256, 4096] float64 keep alive until their backward, in a fresh process;
    each is then run backward and checked against torch here."""
    fused = learner.module("fused")
    x = torch.randn(6, 16)
    shapes = saved_tensor_shapes(learner, fused.layer_norm, x, torch.ones(16), torch.zeros(16), 1e-5)
    saved = sum(int(torch.Size(s).numel()) for s in shapes)
    budget = x.numel() + 6 + 16
    check(saved > 0, "layer_norm saved nothing for backward: is it an autograd.Function that calls "
                     "ctx.save_for_backward(xhat, rstd, weight)?")
    check(saved <= budget, f"you saved tensors of shapes {shapes} ({saved} numbers) for backward; "
                           f"xhat, rstd and weight need only {budget}")

    learner.restart()  # a fresh process: nothing held yet that the forwards could let go of
    fused = learner.module("fused")
    harness, torch_lib, getattr_there = learner.harness, learner.lib("torch"), learner.lib("builtins").getattr
    (rows, d), unit, seed = MEMORY_SHAPE, math.prod(MEMORY_SHAPE) * 8, seed % 100_000 * 16
    w, b = _stored(learner, [d], seed + 1), _stored(learner, [d], seed + 2)
    xs = [_stored(learner, MEMORY_SHAPE, seed + 3 + k, 2.0) for k in range(FORWARDS)]
    ys, costs = [], []
    for x in xs:
        y, cost = learner.measure_harness("call_stored", fused.layer_norm, [x, w, b, 1e-5])
        ys.append(y)
        costs.append(cost)
    _, after = learner.measure_harness("call_stored", learner.lib("builtins").len, [[]])
    kept = max(sum(c.kept_bytes for c in costs), after.held_at_start - costs[0].held_at_start) / FORWARDS / unit
    held, source = costs[0].held_at_start - FORWARDS * unit - 2 * d * 8, costs[0].source
    gy, gy_stored = _random(MEMORY_SHAPE, seed), _stored(learner, MEMORY_SHAPE, seed, leaf=False)
    sample = torch.randint(0, rows, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
    wr, br = _random([d], seed + 1), _random([d], seed + 2)
    grad_w = torch.zeros(d, dtype=torch.float64)
    for k, (x, y) in enumerate(zip(xs, ys)):
        harness("call_stored", torch_lib.Tensor.backward, [y, gy_stored])
        xr = _random(MEMORY_SHAPE, seed + 3 + k, 2.0)
        picked = xr[sample].requires_grad_()
        yr = torch.nn.functional.layer_norm(picked, (d,), wr, br, 1e-5)
        yr.backward(gy[sample])
        grad_w += (gy * (xr - xr.mean(-1, keepdim=True)) / torch.sqrt(xr.var(-1, unbiased=False, keepdim=True) + 1e-5)).sum(0)
        call = f"layer_norm(x[{rows},{d}] float64), call {k + 1} of {FORWARDS}"
        assert_close(harness("fetch", x, sample), xr[sample], rtol=0, atol=0, call=f"{call}: x afterwards, rows {sample}",
                     hint="do not change x in place in forward: the caller still uses it")
        assert_close(harness("fetch", y, sample), yr, rtol=1e-9, atol=1e-9, call=f"{call}: output rows {sample}")
        assert_close(harness("fetch", harness("call_stored", getattr_there, [x, "grad"]), sample), picked.grad,
                     rtol=1e-9, atol=1e-9, call=f"{call}: grad_x rows {sample}")
    assert_close(harness("fetch", harness("call_stored", getattr_there, [w, "grad"])), grad_w, rtol=1e-9, atol=1e-9,
                 call=f"layer_norm(x[{rows},{d}] float64): grad_weight summed over the {FORWARDS} backward calls")
    assert_close(harness("fetch", harness("call_stored", getattr_there, [b, "grad"])), FORWARDS * gy.sum(0),
                 rtol=1e-9, atol=1e-9, call=f"layer_norm(x[{rows},{d}] float64): grad_bias summed over the {FORWARDS} calls")
    if source == "in-process":
        return  # your own run: measured in your process, and not judged
    check(held <= HELD_LIMIT,
          f"before the first forward, your process held {held / 2**20:.1f} MiB beyond the test's inputs (measured "
          f"outside it, by {source}): memory held then and let go during the forwards would hide what they keep")
    check(kept <= KEPT_LIMIT,
          f"four forwards of layer_norm(x[{rows},{d}] float64) each kept {kept:.2f} full-size tensors (8 MiB) alive "
          f"until backward (measured outside your process, by {source}); y and xhat make 2, the limit is "
          f"{KEPT_LIMIT:g}. Save only xhat, rstd and weight, and let the forward's temporaries go")
