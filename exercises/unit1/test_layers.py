"""Visible tests for Part B. Run: pytest exercises/unit1/test_layers.py"""

import numpy as np
import pytest

from autograder.checks import assert_close, check
from autograder.testing import numerical_gradient

# Hints of mistakes the tests recognise: each is shown only when your result matches what that
# mistake gives, computed here.
BIASED = "LayerNorm uses the biased variance (divide by D, not D - 1)"
EPS_INSIDE = "eps goes inside the square root: rstd = 1 / sqrt(var + eps)"
MEAN_TERMS = "the mean and variance depend on x too: dx needs the two mean terms"
BIAS_CORRECTION = "Adam divides m and v by (1 - beta ** t) (bias correction), with t counting from 1"
EPS_OUTSIDE = "eps goes outside the square root: sqrt(v_hat) + eps"


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
    assert_close(out, x @ params["W"] + params["b"], call="Linear(3, 2) on x[4,3]: forward")
    dx = layer.backward(dout)
    grads = layer.grads
    W, b = params["W"], params["b"]
    assert_close(dx, numerical_gradient(lambda v: float(np.sum((v @ W + b) * dout)), x), rtol=1e-5, atol=1e-7,
                 call="Linear(3, 2) on x[4,3]: backward -> dx", hint="dx = dout @ W.T, of shape [N, d_in] like x")
    assert_close(grads["W"], x.T @ dout, call="Linear(3, 2) on x[4,3]: grads['W']",
                 mistakes={"sum over the batch; do not average": x.T @ dout / 4})
    assert_close(grads["b"], dout.sum(axis=0), call="Linear(3, 2) on x[4,3]: grads['b']",
                 mistakes={"sum over the batch; do not average": dout.mean(axis=0)})


def _layer_norm(x, gamma, beta, ddof=0, eps_inside=True):
    """LayerNorm's forward, written here, and two mistakes of it (for the hints)."""
    centered = x - x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, ddof=ddof, keepdims=True)
    rstd = 1 / np.sqrt(var + 1e-5) if eps_inside else 1 / (np.sqrt(var) + 1e-5)
    return centered * rstd * gamma + beta, rstd


@pytest.mark.group("layers")
def test_layernorm_matches_finite_differences(learner):
    """The forward against the formula, the backward against finite differences of it.  The last
    row is almost constant: its variance (about 1e-6) is below eps, where eps's place matters."""
    layers = learner.module("layers")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6)) * 3 + 1
    x[3] = 2.0 + 1e-3 * rng.normal(size=6)
    gamma, beta, dout = rng.normal(size=6) + 1, rng.normal(size=6), rng.normal(size=(4, 6))
    layer = layers.LayerNorm(6)
    layer.params = {"gamma": gamma.copy(), "beta": beta.copy()}  # made here, not by your __init__
    call = "LayerNorm(6) on x[4,6]"
    y, rstd = _layer_norm(x, gamma, beta)
    assert_close(layer.forward(x), y, rtol=1e-9, atol=1e-10, call=f"{call}: forward",
                 mistakes={BIASED: _layer_norm(x, gamma, beta, ddof=1)[0],
                           EPS_INSIDE: _layer_norm(x, gamma, beta, eps_inside=False)[0]})
    dx = layer.backward(dout)
    assert_close(dx, numerical_gradient(lambda v: float(np.sum(_layer_norm(v, gamma, beta)[0] * dout)), x),
                 rtol=1e-5, atol=1e-6, call=f"{call}: backward -> dx", mistakes={MEAN_TERMS: dout * gamma * rstd},
                 hint="dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * gamma, means over each row")
    xhat = (x - x.mean(axis=1, keepdims=True)) * rstd
    grads = layer.grads
    assert_close(grads["gamma"], (dout * xhat).sum(axis=0), rtol=1e-9, atol=1e-10, call=f"{call}: grads['gamma']",
                 mistakes={"sum over the batch; do not average": (dout * xhat).mean(axis=0)})
    assert_close(grads["beta"], dout.sum(axis=0), rtol=1e-9, atol=1e-10, call=f"{call}: grads['beta']",
                 mistakes={"sum over the batch; do not average": dout.mean(axis=0)})


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


def _adam(start, grads, lr, betas, eps, bias_correction=True, eps_inside=False):
    """Adam with one of two classic mistakes, written here (for the hints)."""
    p = {k: v.copy() for k, v in start.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    for t, g in enumerate(grads, start=1):
        for k in p:
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g[k]
            v[k] = betas[1] * v[k] + (1 - betas[1]) * g[k] ** 2
            m_hat = m[k] / (1 - betas[0] ** t) if bias_correction else m[k]
            v_hat = v[k] / (1 - betas[1] ** t) if bias_correction else v[k]
            p[k] -= lr * m_hat / (np.sqrt(v_hat + eps) if eps_inside else np.sqrt(v_hat) + eps)
    return p


@pytest.mark.group("training")
def test_adam_steps_match_torch(learner):
    """Three Adam steps against torch.optim.Adam.  The gradients of b are tiny (1e-7), where the
    place of eps decides the step."""
    import torch

    layers = learner.module("layers")
    rng = np.random.default_rng(4)
    start = {"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    grads = [{"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2) * 1e-7} for _ in range(3)]
    lr, betas, eps = 0.1, (0.8, 0.95), 1e-8  # with (0.9, 0.99) the first step is sign(g) even without bias correction
    layer = layers.Linear(3, 2, learner.lib("numpy").random.default_rng(0))
    layer.params = {k: v.copy() for k, v in start.items()}  # made here, not by your __init__
    opt = layers.Adam([layer], lr, betas, eps)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    reference = torch.optim.Adam(list(tensors.values()), lr=lr, betas=betas, eps=eps)
    for step, g in enumerate(grads, start=1):
        layer.grads = {k: v.copy() for k, v in g.items()}
        opt.step()
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        reference.step()
        params = layer.params
        for k in ("b", "W"):
            assert_close(params[k], tensors[k].detach().numpy(), rtol=1e-9, atol=1e-12,
                         call=f"Adam(lr={lr}, betas={betas}, eps={eps}): params['{k}'] after step {step}",
                         mistakes={BIAS_CORRECTION: _adam(start, grads[:step], lr, betas, eps, bias_correction=False)[k],
                                   EPS_OUTSIDE: _adam(start, grads[:step], lr, betas, eps, eps_inside=True)[k]})


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
