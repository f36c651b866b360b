"""Visible tests for Part C. Run: pytest exercises/unit1/test_fused.py"""

import pytest
import torch

from autograder.checks import assert_close, check
from autograder.testing import remote_differentiable, saved_tensor_shapes


@pytest.mark.group("fused")
def test_forward_matches_torch(learner):
    fused = learner.module("fused")
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    y = fused.layer_norm(x, w, b, 1e-5)
    assert_close(y, torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5), rtol=1e-10, atol=1e-10,
                 call="layer_norm(x[4,8] float64, w[8], b[8])",
                 mistakes={"LayerNorm uses the biased variance (divide by D, not D - 1)":
                           (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5) * w + b})


@pytest.mark.group("fused")
def test_gradcheck(learner):
    fused = learner.module("fused")
    f = remote_differentiable(learner, fused.layer_norm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda x, w, b: f(x, w, b, 1e-5), (x, w, b), raise_exception=False)
    check(ok, "torch.autograd.gradcheck disagrees with your backward (float64, x[3,5]); "
              "compare your grad_x with the formula in the handout")


@pytest.mark.group("fused")
def test_saves_only_what_backward_needs(learner):
    fused = learner.module("fused")
    x = torch.randn(6, 16)
    shapes = saved_tensor_shapes(learner, fused.layer_norm, x, torch.ones(16), torch.zeros(16), 1e-5)
    saved = sum(int(torch.Size(s).numel()) for s in shapes)
    budget = x.numel() + 6 + 16
    check(saved > 0, "layer_norm saved nothing for backward: is it an autograd.Function that calls "
                     "ctx.save_for_backward(xhat, rstd, weight)?")
    check(saved <= budget, f"you saved tensors of shapes {shapes} ({saved} numbers) for backward; "
                           f"xhat, rstd and weight need only {budget}")
