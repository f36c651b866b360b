"""Hidden tests, Part B: each layer against torch.autograd (float64) and finite differences,
the stable loss at extreme logits, Adam against torch.optim.Adam, and training to 95%.

Every input is made here (weights included: a layer's own initialisation is learner code), every
reference is computed here, and training is judged by the weights it leaves behind: they are
fetched and evaluated here, in the reference solution's own MLP, on spirals drawn here."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check
from autograder.course_code import reference_module
from autograder.testing import numerical_gradient

REFERENCE = reference_module("unit1.layers")

BIASED = "LayerNorm uses the biased variance (divide by D, not D - 1)"
EPS_INSIDE = "eps goes inside the square root: rstd = 1 / sqrt(var + eps)"
MEAN_TERMS = "the mean and variance depend on x too: dx needs the two mean terms"
BIAS_CORRECTION = "Adam divides m and v by (1 - beta ** t) (bias correction), with t counting from 1"
EPS_OUTSIDE = "eps goes outside the square root: sqrt(v_hat) + eps"


class _TheirSide:
    """Arrays kept on the learner's side, and calls with them: what a function does to its
    caller's array in place cannot be seen once the array is copied back, so the test keeps the
    array there and reads it again afterwards (it must still hold what was sent)."""

    def __init__(self, learner):
        self.learner, self.kept = learner, []

    def array(self, value: np.ndarray, name: str):
        stored = self.learner.harness("call_stored", self.learner.lib("numpy").array, [value])
        self.kept.append((name, stored, value.copy()))
        return stored

    def call(self, fn, *args):
        return self.learner.harness("fetch", self.learner.harness("call_stored", fn, list(args)))

    def check_unchanged(self, call: str) -> None:
        for name, stored, sent in self.kept:
            assert_close(self.learner.harness("fetch", stored), sent, rtol=0, atol=0, call=f"{call}: your {name} afterwards",
                         hint=f"do not change the {name} you are given in place (the caller still uses it): "
                              "use out-of-place operations, or work on a copy")


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
    W, b = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), rng.normal(size=d_out)
    layer.params = {"W": W, "b": b}
    call = f"Linear({d_in}, {d_out}) on x[{n},{d_in}]"
    theirs = _TheirSide(learner)
    y = theirs.call(layer.forward, theirs.array(x, "x"))
    ref, (dx, dW, db) = _torch_grads(lambda x, W, b: x @ W + b, x, W, b, dout=dout)
    assert_close(y, ref, rtol=1e-12, atol=1e-12, call=f"{call}: forward")
    assert_close(theirs.call(layer.backward, theirs.array(dout, "dout")), dx, rtol=1e-10, atol=1e-12,
                 call=f"{call}: backward -> dx", hint="dx = dout @ W.T, of shape [N, d_in] like x")
    theirs.check_unchanged(call)
    assert_close(layer.grads["W"], dW, rtol=1e-10, atol=1e-12, call=f"{call}: grads['W']",
                 mistakes={"sum over the batch; do not average": dW / n})
    assert_close(layer.grads["b"], db, rtol=1e-10, atol=1e-12, call=f"{call}: grads['b']",
                 mistakes={"sum over the batch; do not average": db / n})


@pytest.mark.group("layers")
@pytest.mark.parametrize("name", ["ReLU", "GELU"])
def test_activations(learner, rng, name):
    layers = learner.module("layers")
    x = rng.normal(size=(5, 7)) * 2
    x[np.abs(x) < 1e-3] = 0.5
    x[0, :3] = 0.0  # the kink itself, which random inputs never hit: ReLU passes nothing there (mask x > 0)
    dout = rng.normal(size=(5, 7))
    torch_fn = {"ReLU": torch.relu, "GELU": lambda t: F.gelu(t, approximate="tanh")}[name]
    layer = getattr(layers, name)()
    ref, (dx,) = _torch_grads(torch_fn, x, dout=dout)
    exact_gelu = F.gelu(torch.tensor(x)).numpy()
    call = f"{name}() on x[5,7] (x[0, :3] = 0)"
    theirs = _TheirSide(learner)
    assert_close(theirs.call(layer.forward, theirs.array(x, "x")), ref, rtol=1e-10, atol=1e-12, call=f"{call}: forward",
                 mistakes={"use the tanh approximation, not the exact erf form": exact_gelu} if name == "GELU" else None)
    assert_close(theirs.call(layer.backward, theirs.array(dout, "dout")), dx, rtol=1e-9, atol=1e-12,
                 call=f"{call}: backward(dout[5,7])",
                 mistakes={"ReLU passes the gradient only where x > 0: at exactly 0 it passes nothing":
                           np.where(x >= 0, dout, 0.0)} if name == "ReLU" else None)
    theirs.check_unchanged(call)


@pytest.mark.group("layers")
def test_layernorm(learner, rng):
    layers = learner.module("layers")
    n, d = int(rng.integers(2, 6)), int(rng.integers(3, 9))
    x, dout = rng.normal(size=(n, d)) * 3 + 1, rng.normal(size=(n, d))
    # One row almost constant: its variance (about 1e-6) is below eps, where eps's place matters.
    x[-1] = rng.normal() + 1e-3 * rng.normal(size=d)
    gamma, beta = rng.normal(size=d), rng.normal(size=d)
    layer = layers.LayerNorm(d)
    layer.params = {"gamma": gamma, "beta": beta}
    call = f"LayerNorm({d}) on x[{n},{d}] (its last row nearly constant)"
    ref, (dx, dgamma, dbeta) = _torch_grads(lambda x, g, b: F.layer_norm(x, (d,), g, b, 1e-5), x, gamma, beta, dout=dout)
    centered = x - x.mean(1, keepdims=True)
    theirs = _TheirSide(learner)
    assert_close(theirs.call(layer.forward, theirs.array(x, "x")), ref, rtol=1e-9, atol=1e-10, call=f"{call}: forward",
                 mistakes={BIASED: centered / np.sqrt(x.var(1, ddof=1, keepdims=True) + 1e-5) * gamma + beta,
                           EPS_INSIDE: centered / (np.sqrt(x.var(1, keepdims=True)) + 1e-5) * gamma + beta})
    rstd = 1 / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    assert_close(theirs.call(layer.backward, theirs.array(dout, "dout")), dx, rtol=1e-8, atol=1e-10,
                 call=f"{call}: backward -> dx", mistakes={MEAN_TERMS: dout * gamma * rstd})
    theirs.check_unchanged(call)
    grads = layer.grads
    assert_close(grads["gamma"], dgamma, rtol=1e-9, atol=1e-10, call=f"{call}: grads['gamma']")
    assert_close(grads["beta"], dbeta, rtol=1e-9, atol=1e-10, call=f"{call}: grads['beta']")


@pytest.mark.group("layers")
def test_layernorm_normalises_the_last_axis_of_any_rank(learner, rng):
    """The handout's "over the last axis": a [batch, time, dim] input with time != dim, where axis 1
    and axis -1 differ, and the parameter gradients sum over every leading axis."""
    layers = learner.module("layers")
    d = int(rng.integers(3, 7))
    shape = (2, d + 2, d)
    x, dout = rng.normal(size=shape) * 2 + 0.5, rng.normal(size=shape)
    gamma, beta = rng.normal(size=d), rng.normal(size=d)
    layer = layers.LayerNorm(d)
    layer.params = {"gamma": gamma, "beta": beta}
    call = f"LayerNorm({d}) on x{list(shape)}"
    ref, (dx, dgamma, dbeta) = _torch_grads(lambda x, g, b: F.layer_norm(x, (d,), g, b, 1e-5), x, gamma, beta, dout=dout)
    assert_close(layer.forward(x), ref, rtol=1e-9, atol=1e-10, call=f"{call}: forward",
                 hint="the mean and variance are over the last axis (axis=-1, keepdims=True), whatever the rank")
    assert_close(layer.backward(dout), dx, rtol=1e-8, atol=1e-10, call=f"{call}: backward -> dx")
    for name, want in (("gamma", dgamma), ("beta", dbeta)):
        assert_close(layer.grads[name], want, rtol=1e-9, atol=1e-10, call=f"{call}: grads['{name}']",
                     hint=f"grads['{name}'] sums over every axis but the last: reshape(-1, dim) with dim = x.shape[-1]")


def _set_weights(model, params: list[dict], call: str) -> None:
    """Put weights made here into the learner's model, layer by layer (layers without parameters
    have empty dicts); the learner's MLP must have the reference's layers."""
    mine = [layer for layer in model.layers]
    shapes = [{k: np.shape(v) for k, v in layer.params.items()} for layer in mine]
    want = [{k: np.shape(v) for k, v in p.items()} for p in params]
    check(shapes == want, f"{call} built layers with parameters {shapes}; expected {want} (leave MLP as given)")
    for layer, p in zip(mine, params):
        if p:
            layer.params = {k: v.copy() for k, v in p.items()}


def _get_weights(model, reference_model, call: str):
    """The learner's trained weights, loaded into the reference model built here."""
    got = [layer.params for layer in model.layers]
    shapes = [{k: np.shape(v) for k, v in p.items()} if isinstance(p, dict) else type(p).__name__ for p in got]
    want = [{k: np.shape(v) for k, v in layer.params.items()} for layer in reference_model.layers]
    check(shapes == want, f"after {call}, the model's layers have parameters {shapes}; expected {want}")
    for layer, p in zip(reference_model.layers, got):
        if p:
            layer.params = {k: np.asarray(v, dtype=np.float64) for k, v in p.items()}
    return reference_model


@pytest.mark.group("layers")
def test_mlp_backward_matches_finite_differences(learner, rng):
    """The learner's MLP gets weights made here; its forward is compared with the reference MLP's
    and its backward with finite differences of the reference forward, both computed here."""
    layers = learner.module("layers")
    sizes = [3, 5, 4]
    reference = REFERENCE.MLP(sizes, np.random.default_rng(int(rng.integers(1 << 30))), "gelu", True)
    for layer in reference.layers:
        if "gamma" in layer.params:  # LayerNorm: not the identity
            layer.params = {"gamma": rng.normal(size=layer.params["gamma"].shape) + 1,
                            "beta": rng.normal(size=layer.params["beta"].shape)}
    call = "MLP([3,5,4], gelu, layernorm)"
    model = layers.MLP(sizes, learner.lib("numpy").random.default_rng(int(rng.integers(1 << 30))), "gelu", True)
    _set_weights(model, [layer.params for layer in reference.layers], call)
    x, dout = rng.normal(size=(4, 3)), rng.normal(size=(4, 4))
    assert_close(model.forward(x), reference.forward(x), rtol=1e-10, atol=1e-12, call=f"{call}.forward(x[4,3])")
    dx = model.backward(dout)

    def f(v):
        return float(np.sum(reference.forward(v) * dout))

    assert_close(dx, numerical_gradient(f, x), rtol=1e-5, atol=1e-7, call=f"{call}.backward(dout[4,4])")


@pytest.mark.group("loss")
def test_cross_entropy_against_torch(learner, rng):
    layers = learner.module("layers")
    n, c = int(rng.integers(3, 9)), int(rng.integers(2, 6))
    logits = rng.normal(size=(n, c)) * 3
    labels = rng.integers(0, c, size=n)
    logits[0, :2] = logits[0].max() + 1.0  # a tie for the row's maximum
    t = torch.tensor(logits, requires_grad=True)
    ref = F.cross_entropy(t, torch.tensor(labels))
    ref.backward()
    theirs = _TheirSide(learner)
    loss, grad = theirs.call(layers.softmax_cross_entropy, theirs.array(logits, "logits"), theirs.array(labels, "labels"))
    theirs.check_unchanged(f"softmax_cross_entropy(logits[{n},{c}], labels[{n}])")
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
                 hint="subtract each row's maximum before exp (exp(1000) is inf in float64), and compute log p as "
                      "shifted - log(sum(exp(shifted))): log of a probability that underflowed to 0 is -inf")
    assert_close(grad, t.grad.numpy(), rtol=1e-8, atol=1e-12, call=f"gradient at logits of size ~{scale:g}")


def _adam(start, grads, lr, betas, eps, bias_correction=True, eps_inside=False):
    """Adam with one of two classic mistakes, run here (for the hints)."""
    p = {k: v.copy() for k, v in start.items()}
    m, v = ({k: np.zeros_like(a) for k, a in p.items()} for _ in range(2))
    for t, g in enumerate(grads, start=1):
        for k in p:
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g[k]
            v[k] = betas[1] * v[k] + (1 - betas[1]) * g[k] ** 2
            m_hat = m[k] / (1 - betas[0] ** t) if bias_correction else m[k]
            v_hat = v[k] / (1 - betas[1] ** t) if bias_correction else v[k]
            p[k] -= lr * m_hat / (np.sqrt(v_hat + eps) if eps_inside else np.sqrt(v_hat) + eps)
    return p


@pytest.mark.group("training")
# betas below 0.5 too: there 1 % b differs from 1 - b, and b1 and b2 far apart tell a swap apart.
@pytest.mark.parametrize("betas", [(0.8, 0.95), (0.3, 0.45)])
def test_adam_matches_torch(learner, rng, betas):
    """Step by step against torch.optim.Adam, with b's gradients tiny (where the place of eps
    decides the step).  The arrays in the layer's params must be updated in place: the test keeps
    a reference to them on the learner's side and reads them after the steps."""
    layers = learner.module("layers")
    layer = layers.Linear(3, 4, learner.lib("numpy").random.default_rng(int(rng.integers(1 << 30))))
    lr, eps = 0.05, 1e-8
    start = {"W": rng.normal(size=(3, 4)) / np.sqrt(3), "b": rng.normal(size=4)}
    grads = [{"W": rng.normal(size=(3, 4)), "b": rng.normal(size=4) * 1e-7} for _ in range(3)]
    layer.params = {k: v.copy() for k, v in start.items()}
    getattr_there, getitem_there = learner.lib("builtins").getattr, learner.lib("operator").getitem
    params_there = learner.harness("call_stored", getattr_there, [layer, "params"])
    arrays_there = {k: learner.harness("call_stored", getitem_there, [params_there, k]) for k in start}
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    torch_opt = torch.optim.Adam(list(tensors.values()), lr=lr, betas=betas, eps=eps)
    opt = layers.Adam([layer], lr, betas, eps)
    call = f"Adam(lr={lr}, betas={betas}, eps={eps})"
    for step, g in enumerate(grads, start=1):
        layer.grads = {k: v.copy() for k, v in g.items()}
        opt.step()
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        torch_opt.step()
        params = layer.params
        for k in ("b", "W"):
            assert_close(params[k], tensors[k].detach().numpy(), rtol=1e-9, atol=1e-12,
                         call=f"{call}: params['{k}'] after step {step}",
                         mistakes={BIAS_CORRECTION: _adam(start, grads[:step], lr, betas, eps, bias_correction=False)[k],
                                   EPS_OUTSIDE: _adam(start, grads[:step], lr, betas, eps, eps_inside=True)[k]})
    for k, there in arrays_there.items():
        assert_close(learner.harness("fetch", there), tensors[k].detach().numpy(), rtol=1e-9, atol=1e-12,
                     call=f"{call}: the array that was params['{k}'] before the steps, after them",
                     hint="update each parameter in place (param -= ...): whoever holds the array sees the step")


def _spirals(n_per_class: int, n_classes: int, rng: np.random.Generator):
    """The reference make_spirals, run here, then turned by a random angle, mirrored half the time,
    moved by up to 0.25 and with the class labels shuffled: no network trained beforehand fits them."""
    x, y = REFERENCE.make_spirals(n_per_class, n_classes, np.random.default_rng(int(rng.integers(1 << 30))))
    angle = rng.uniform(0, 2 * np.pi)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1.0, rng.choice([-1.0, 1.0])])
    return x @ turn.T + rng.uniform(-0.25, 0.25, 2), rng.permutation(n_classes)[y]


@pytest.mark.group("training")
def test_training_reaches_95_percent(learner, rng, record_property):
    """fit_spirals' wiring, run here: the learner's MLP, Adam and train() on spirals drawn here; the
    trained weights are fetched and the accuracy is computed here by the reference MLP (measured:
    100% for the solution on 100 draws, turned, mirrored and moved as here)."""
    layers = learner.module("layers")
    x, y = _spirals(100, 3, rng)
    learner_rng = learner.lib("numpy").random.default_rng(int(rng.integers(1 << 30)))  # the learner's own shuffling
    model = layers.MLP([2, 64, 64, 3], learner_rng, "relu")
    with learner.time_limit(60):
        layers.train(model, layers.Adam(model.layers, 1e-2), x, y, 300, 64, learner_rng)
    trained = _get_weights(model, REFERENCE.MLP([2, 64, 64, 3], np.random.default_rng(0), "relu"), "train()")
    accuracy = float(np.mean(trained.predict(x) == y))
    record_property("figures", f"training accuracy {accuracy:.1%} (computed by the grader from your trained weights)")
    check(accuracy >= 0.95, f"your MLP([2, 64, 64, 3]) reaches {accuracy:.1%} training accuracy on 3 spirals after 300 "
                            "epochs of train() with Adam(lr=1e-2) (computed by the grader from your trained weights); "
                            "it should reach 95% (check train(): shuffle each epoch, and call optimizer.step())")


# The classic mistakes of train()'s loop, each replayed by _replay (for the hints).
LOOP_MISTAKES = {
    "no_shuffle": "shuffle every epoch: order = rng.permutation(len(x)), then take the batches in that order",
    "shuffle_once": "draw a new permutation at the start of every epoch, not once before the loop",
    "drop_last": "train on the last, shorter batch too: for start in range(0, len(x), batch_size)",
    "step_first": "call model.backward(dlogits) before optimizer.step(): the step uses the gradients backward wrote",
    "no_step": "call optimizer.step() once per batch, after model.backward(dlogits): your weights did not move",
    "last_loss": "each epoch's loss is the mean of its batch losses, not the last batch's loss",
    "weighted": "each epoch's loss is the plain mean of its batch losses (np.mean), not weighted by batch size",
}


def _replay(sizes, weights, x, y, epochs, batch_size, seed, lr, mistake=None):
    """train() with SGD(lr), replayed here from the same weights with the same shuffling rng: the
    reference train() (mistake None), or the loop with one classic mistake.  Returns (the
    weights after, the history)."""
    model = REFERENCE.MLP(sizes, np.random.default_rng(0))
    for layer, p in zip([layer for layer in model.layers if layer.params], weights):
        layer.params = {k: v.copy() for k, v in p.items()}
    opt, rng = REFERENCE.SGD(model.layers, lr), np.random.default_rng(seed)
    if mistake is None:
        history = REFERENCE.train(model, opt, x, y, epochs, batch_size, rng)
    else:
        history, once = [], rng.permutation(len(x)) if mistake == "shuffle_once" else None
        for _ in range(epochs):
            order = {"no_shuffle": np.arange(len(x)), "shuffle_once": once}.get(mistake)
            order = rng.permutation(len(x)) if order is None else order
            ends = len(x) - batch_size + 1 if mistake == "drop_last" else len(x)
            losses, counts = [], []
            for start in range(0, ends, batch_size):
                batch = order[start : start + batch_size]
                loss, dlogits = REFERENCE.softmax_cross_entropy(model.forward(x[batch]), y[batch])
                if mistake == "step_first":
                    opt.step()
                model.backward(dlogits)
                if mistake not in ("step_first", "no_step"):
                    opt.step()
                losses.append(loss)
                counts.append(len(batch))
            history.append({"last_loss": losses[-1], "weighted": np.average(losses, weights=counts)}.get(mistake, np.mean(losses)))
    return [layer.params for layer in model.layers if layer.params], [float(h) for h in history]


def _flat(weights) -> np.ndarray:
    return np.concatenate([np.ravel(p[k]) for p in weights for k in ("W", "b")])


@pytest.mark.group("training")
def test_train_replays_the_loop(learner, rng, record_property):
    """train() with SGD from weights made here, shuffled by an rng seeded here: the weights it
    leaves (fetched) and the losses it returns must be those of the reference train() replayed
    here from the same weights and seed.  Judged on the fetched weights, so a train() that only
    returns falling numbers, or weights fitted beforehand, earns nothing; and a loop that differs
    (no shuffle, the last partial batch skipped, step before backward, np.random instead of rng)
    ends elsewhere.  100 points in batches of 32: the last batch has 4."""
    layers = learner.module("layers")
    sizes, epochs, batch_size, lr = [2, 16, 2], 12, 32, 0.5
    x, y = _spirals(50, 2, rng)
    start = [{"W": rng.normal(size=(a, b)) / np.sqrt(a), "b": rng.normal(size=b) * 0.1} for a, b in zip(sizes, sizes[1:])]
    seed = int(rng.integers(1 << 30))
    made = iter(start)
    per_layer = [next(made) if layer.params else {} for layer in REFERENCE.MLP(sizes, np.random.default_rng(0)).layers]
    model = layers.MLP(sizes, learner.lib("numpy").random.default_rng(0))
    _set_weights(model, per_layer, f"MLP({sizes})")
    history = layers.train(model, layers.SGD(model.layers, lr), x, y, epochs, batch_size,
                           learner.lib("numpy").random.default_rng(seed))
    call = f"train(MLP({sizes}), SGD(lr={lr}), x[{len(x)},2], y, epochs={epochs}, batch_size={batch_size}, rng)"
    check(isinstance(history, list) and len(history) == epochs,
          f"{call} should return a list of {epochs} floats (one per epoch), got {history!r:.80}")
    trained = _get_weights(model, REFERENCE.MLP(sizes, np.random.default_rng(0)), "train()")
    got = _flat([layer.params for layer in trained.layers if layer.params])
    want_weights, want_history = _replay(sizes, start, x, y, epochs, batch_size, seed, lr)
    replays = {hint: _replay(sizes, start, x, y, epochs, batch_size, seed, lr, m) for m, hint in LOOP_MISTAKES.items()}
    record_property("figures", f"reported losses {history[0]:.3f} -> {history[-1]:.3f}; the replay's "
                               f"{want_history[0]:.3f} -> {want_history[-1]:.3f}")
    assert_close(got, _flat(want_weights), rtol=1e-7, atol=1e-9,
                 call=f"{call}: the weights it left (all W and b, flattened), against the loop replayed by the grader",
                 mistakes={hint: _flat(w) for hint, (w, _) in replays.items()},
                 hint="follow the handout's loop exactly: shuffle with the rng you are given (not np.random), batches "
                      "in that order, then forward, softmax_cross_entropy, model.backward, optimizer.step")
    assert_close(history, want_history, rtol=1e-7, atol=1e-9, call=f"{call}: the losses it returned",
                 mistakes={hint: h for hint, (_, h) in replays.items()},
                 hint="return one number per epoch: the mean of that epoch's batch losses")
