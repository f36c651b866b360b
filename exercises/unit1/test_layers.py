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
    params = {"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}  # made here, not by your __init__
    layer.params = {k: v.copy() for k, v in params.items()}
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


def _spirals(n_per_class, n_classes, rng, noise=0.2):
    """make_spirals, written here (the data must not come from code in your file), then turned by
    a random angle, mirrored half the time, moved by up to 0.25 and with the labels shuffled."""
    xs, ys = [], []
    for c in range(n_classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        theta = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.normal(0, noise, n_per_class)
        xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        ys.append(np.full(n_per_class, c))
    angle = rng.uniform(0, 2 * np.pi)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1.0, rng.choice([-1.0, 1.0])])
    return np.concatenate(xs) @ turn.T + rng.uniform(-0.25, 0.25, 2), rng.permutation(n_classes)[np.concatenate(ys)]


def _predict(weights, x):
    """The MLP's forward pass (Linear, ReLU, ..., Linear), written here, on your trained weights."""
    for i, p in enumerate(weights):
        x = x @ p["W"] + p["b"]
        if i < len(weights) - 1:
            x = np.maximum(x, 0.0)
    return x.argmax(axis=1)


@pytest.mark.group("training")
def test_mlp_learns_spirals(learner, seed):
    """What fit_spirals does, wired here: your MLP, Adam and train() on spirals made here; the
    accuracy is computed here from the weights your training left."""
    layers = learner.module("layers")
    rng = np.random.default_rng(seed)
    x, y = _spirals(100, 3, rng)
    theirs = learner.lib("numpy").random.default_rng(0)
    model = layers.MLP([2, 64, 64, 3], theirs, "relu")
    layers.train(model, layers.Adam(model.layers, 1e-2), x, y, 300, 64, theirs)
    weights = [p for p in (layer.params for layer in model.layers) if p]
    shapes = [{k: np.shape(v) for k, v in p.items()} for p in weights]
    expected = [{"W": (a, b), "b": (b,)} for a, b in [(2, 64), (64, 64), (64, 3)]]
    check(shapes == expected, f"MLP([2, 64, 64, 3]) has parameters {shapes}; expected {expected} (leave MLP as given)")
    accuracy = float(np.mean(_predict(weights, x) == y))
    check(accuracy >= 0.95, f"training accuracy on 3 spirals is {accuracy:.1%} (computed by the test from your "
                            "trained weights); it should reach 95%")
