"""Hidden tests, Part B: each layer against torch.autograd (float64) and finite differences,
the stable loss at extreme logits, Adam against torch.optim.Adam, and training to 95%."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check
from autograder.testing import numerical_gradient


def _torch_grads(fn, *arrays, dout):
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


@pytest.mark.group("layers")
def test_linear(learner, rng):
    layers = learner.module("layers")
    n, d_in, d_out = rng.integers(2, 9), rng.integers(2, 7), rng.integers(2, 7)
    x, dout = rng.normal(size=(n, d_in)), rng.normal(size=(n, d_out))
    layer = layers.Linear(int(d_in), int(d_out), learner.lib("numpy").random.default_rng(int(rng.integers(1 << 30))))
    W, b = layer.params["W"], layer.params["b"]
    call = f"Linear({d_in}, {d_out}) on x[{n},{d_in}]"
    y = layer.forward(x)
    ref, (dx, dW, db) = _torch_grads(lambda x, W, b: x @ W + b, x, W, b, dout=dout)
    assert_close(y, ref, rtol=1e-12, atol=1e-12, call=f"{call}: forward")
    assert_close(layer.backward(dout), dx, rtol=1e-10, atol=1e-12, call=f"{call}: backward -> dx",
                 hint="dx = dout @ W.T, of shape [N, d_in] like x")
    assert_close(layer.grads["W"], dW, rtol=1e-10, atol=1e-12, call=f"{call}: grads['W']",
                 mistakes={"sum over the batch; do not average": dW / n})
    assert_close(layer.grads["b"], db, rtol=1e-10, atol=1e-12, call=f"{call}: grads['b']")


@pytest.mark.group("layers")
@pytest.mark.parametrize("name", ["ReLU", "GELU"])
def test_activations(learner, rng, name):
    layers = learner.module("layers")
    x = rng.normal(size=(5, 7)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # keep relu away from its kink
    dout = rng.normal(size=(5, 7))
    torch_fn = {"ReLU": torch.relu, "GELU": lambda t: F.gelu(t, approximate="tanh")}[name]
    layer = getattr(layers, name)()
    ref, (dx,) = _torch_grads(torch_fn, x, dout=dout)
    exact_gelu = F.gelu(torch.tensor(x)).numpy()
    assert_close(layer.forward(x), ref, rtol=1e-10, atol=1e-12, call=f"{name}().forward(x[5,7])",
                 mistakes={"use the tanh approximation, not the exact erf form": exact_gelu} if name == "GELU" else None)
    assert_close(layer.backward(dout), dx, rtol=1e-9, atol=1e-12, call=f"{name}().backward(dout[5,7])")


@pytest.mark.group("layers")
def test_layernorm(learner, rng):
    layers = learner.module("layers")
    n, d = int(rng.integers(2, 6)), int(rng.integers(3, 9))
    x, dout = rng.normal(size=(n, d)) * 3 + 1, rng.normal(size=(n, d))
    gamma, beta = rng.normal(size=d), rng.normal(size=d)
    layer = layers.LayerNorm(d)
    layer.params = {"gamma": gamma, "beta": beta}
    call = f"LayerNorm({d}) on x[{n},{d}]"
    ref, (dx, dgamma, dbeta) = _torch_grads(lambda x, g, b: F.layer_norm(x, (d,), g, b, 1e-5), x, gamma, beta, dout=dout)
    assert_close(layer.forward(x), ref, rtol=1e-9, atol=1e-10, call=f"{call}: forward",
                 mistakes={"LayerNorm uses the biased variance (divide by D, not D - 1)":
                           (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, ddof=1, keepdims=True) + 1e-5) * gamma + beta})
    rstd = 1 / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    assert_close(layer.backward(dout), dx, rtol=1e-8, atol=1e-10, call=f"{call}: backward -> dx",
                 mistakes={"the mean and variance depend on x too: dx needs the two mean terms":
                           dout * gamma * rstd})
    grads = layer.grads
    assert_close(grads["gamma"], dgamma, rtol=1e-9, atol=1e-10, call=f"{call}: grads['gamma']")
    assert_close(grads["beta"], dbeta, rtol=1e-9, atol=1e-10, call=f"{call}: grads['beta']")


@pytest.mark.group("layers")
def test_mlp_backward_matches_finite_differences(learner, rng):
    layers = learner.module("layers")
    model = layers.MLP([3, 5, 4], learner.lib("numpy").random.default_rng(int(rng.integers(1 << 30))), "gelu", True)
    x, dout = rng.normal(size=(4, 3)), rng.normal(size=(4, 4))
    model.forward(x)
    dx = model.backward(dout)

    def f(v):
        return float(np.sum(model.forward(v) * dout))

    assert_close(dx, numerical_gradient(f, x), rtol=1e-5, atol=1e-7, call="MLP([3,5,4], gelu, layernorm).backward")


@pytest.mark.group("loss")
def test_cross_entropy_against_torch(learner, rng):
    layers = learner.module("layers")
    n, c = int(rng.integers(3, 9)), int(rng.integers(2, 6))
    logits = rng.normal(size=(n, c)) * 3
    labels = rng.integers(0, c, size=n)
    t = torch.tensor(logits, requires_grad=True)
    ref = F.cross_entropy(t, torch.tensor(labels))
    ref.backward()
    loss, grad = layers.softmax_cross_entropy(logits, labels)
    assert_close(loss, ref.item(), rtol=1e-10, call=f"softmax_cross_entropy(logits[{n},{c}])",
                 mistakes={"the loss is the mean over rows, not the sum": ref.item() * n})
    assert_close(grad, t.grad.numpy(), rtol=1e-9, atol=1e-12, call=f"softmax_cross_entropy(logits[{n},{c}]) gradient",
                 mistakes={"the loss is a mean over N rows, so divide the gradient by N": t.grad.numpy() * n})


@pytest.mark.group("loss")
@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_cross_entropy_extreme_logits(learner, rng, scale):
    layers = learner.module("layers")
    logits = rng.normal(size=(6, 4)) * scale
    labels = rng.integers(0, 4, size=6)
    t = torch.tensor(logits, requires_grad=True)
    ref = F.cross_entropy(t, torch.tensor(labels))
    ref.backward()
    loss, grad = layers.softmax_cross_entropy(logits, labels)
    assert_close(loss, ref.item(), rtol=1e-9, call=f"softmax_cross_entropy(logits of size ~{scale:g})",
                 hint="subtract each row's maximum before exp: exp(1000) is inf in float64")
    assert_close(grad, t.grad.numpy(), rtol=1e-8, atol=1e-12, call=f"gradient at logits of size ~{scale:g}")


@pytest.mark.group("training")
def test_adam_matches_torch(learner, rng):
    layers = learner.module("layers")
    layer = layers.Linear(3, 4, learner.lib("numpy").random.default_rng(int(rng.integers(1 << 30))))
    lr, betas = 0.05, (0.8, 0.95)
    start = layer.params
    W, b = torch.tensor(start["W"], requires_grad=True), torch.tensor(start["b"], requires_grad=True)
    torch_opt = torch.optim.Adam([W, b], lr=lr, betas=betas, eps=1e-8)
    opt = layers.Adam([layer], lr, betas, 1e-8)
    for step in range(1, 4):
        gW, gb = rng.normal(size=(3, 4)), rng.normal(size=4)
        layer.grads = {"W": gW, "b": gb}
        opt.step()
        W.grad, b.grad = torch.tensor(gW), torch.tensor(gb)
        torch_opt.step()
        params = layer.params
        assert_close(params["W"], W.detach().numpy(), rtol=1e-9, atol=1e-12, call=f"W after Adam step {step}",
                     hint="Adam divides m and v by (1 - beta ** t) (bias correction), with t counting from 1")
        assert_close(params["b"], b.detach().numpy(), rtol=1e-9, atol=1e-12, call=f"b after Adam step {step}")


@pytest.mark.group("training")
def test_training_reaches_95_percent(learner, rng):
    layers = learner.module("layers")
    x, y = layers.make_spirals(100, 3, learner.lib("numpy").random.default_rng(int(rng.integers(1 << 30))))
    with learner.time_limit(60):
        model = layers.fit_spirals(x, y, int(rng.integers(1 << 30)))
    accuracy = float(np.mean(model.predict(x) == y))
    check(accuracy >= 0.95, f"your MLP reaches {accuracy:.1%} training accuracy on 3 spirals after 300 epochs; "
                            "it should reach 95% (check train(): shuffle each epoch, and call optimizer.step())")


@pytest.mark.group("training")
def test_train_returns_falling_losses(learner, rng):
    layers = learner.module("layers")
    np_lib = learner.lib("numpy")
    x, y = layers.make_spirals(50, 2, np_lib.random.default_rng(int(rng.integers(1 << 30))))
    model = layers.MLP([2, 32, 2], np_lib.random.default_rng(1))
    history = layers.train(model, layers.SGD(model.layers, 0.5), x, y, 20, 25, np_lib.random.default_rng(2))
    check(isinstance(history, list) and len(history) == 20, f"train(..., epochs=20) should return 20 losses, got {history!r:.80}")
    check(history[-1] < history[0], f"the loss did not fall over 20 epochs of SGD: {history[0]:.3f} -> {history[-1]:.3f}")
