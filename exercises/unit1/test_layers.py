"""Visible tests for Part B. Run: pytest exercises/unit1/test_layers.py"""

import numpy as np
import pytest

from autograder.checks import assert_close, check
from autograder.testing import numerical_gradient


@pytest.mark.group("layers")
def test_linear_backward_matches_finite_differences(learner):
    layers = learner.module("layers")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3))
    dout = rng.normal(size=(4, 2))
    layer = layers.Linear(3, 2, learner.lib("numpy").random.default_rng(1))
    params = layer.params
    out = layer.forward(x)
    assert_close(out, x @ params["W"] + params["b"], call="Linear(3, 2).forward(x[4,3])")
    dx = layer.backward(dout)
    grads = layer.grads
    W, b = params["W"], params["b"]
    assert_close(dx, numerical_gradient(lambda v: float(np.sum((v @ W + b) * dout)), x), rtol=1e-5, atol=1e-7,
                 call="Linear.backward(dout[4,2]) -> dx", hint="dx = dout @ W.T, of shape [N, d_in] like x")
    assert_close(grads["W"], x.T @ dout, call="Linear.grads['W']",
                 mistakes={"sum over the batch; do not average": x.T @ dout / 4})
    assert_close(grads["b"], dout.sum(axis=0), call="Linear.grads['b']")


@pytest.mark.group("loss")
def test_softmax_cross_entropy_stays_finite(learner):
    layers = learner.module("layers")
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]])
    loss, grad = layers.softmax_cross_entropy(logits, np.array([0, 2]))
    expected_loss = (0.0 + np.log(3.0)) / 2
    assert_close(loss, expected_loss, call="softmax_cross_entropy(logits with entries of +-1e4)",
                 hint="subtract each row's maximum before exp, or exp(1e4) overflows to inf")
    expected_grad = np.array([[0.0, 0.0, 0.0], [1 / 3, 1 / 3, -2 / 3]]) / 2
    assert_close(grad, expected_grad, atol=1e-12, call="softmax_cross_entropy gradient",
                 mistakes={"the loss is a mean over N rows, so divide the gradient by N": expected_grad * 2})


@pytest.mark.group("training")
def test_mlp_learns_spirals(learner):
    layers = learner.module("layers")
    x, y = layers.make_spirals(100, 3, learner.lib("numpy").random.default_rng(0))
    model = layers.fit_spirals(x, y, 0)
    accuracy = float(np.mean(model.predict(x) == y))
    check(accuracy >= 0.95, f"training accuracy on 3 spirals is {accuracy:.1%}; it should reach 95%")
