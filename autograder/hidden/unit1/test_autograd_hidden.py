"""Hidden tests, Part A: every operation against float64 finite differences and torch.autograd,
random expression graphs (Hypothesis), accumulation, order, and a 10,000-node graph."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close

ACCUMULATE = "a node used twice must accumulate its gradient (+=), not overwrite it (=)"

# (name, how to apply it to a learner Value, the same in torch, a valid input range)
UNARY = {
    "tanh": (lambda v: v.tanh(), torch.tanh, (-2.0, 2.0)),
    "exp": (lambda v: v.exp(), torch.exp, (-2.0, 2.0)),
    "log": (lambda v: v.log(), torch.log, (0.2, 3.0)),
    "relu": (lambda v: v.relu(), torch.relu, (-2.0, 2.0)),
    "pow3": (lambda v: v**3, lambda t: t**3, (-2.0, 2.0)),
    "pow-0.5": (lambda v: v**-0.5, lambda t: t**-0.5, (0.2, 3.0)),
    "neg": (lambda v: -v, torch.neg, (-2.0, 2.0)),
}
BINARY = {
    "add": (lambda a, b: a + b, torch.add),
    "sub": (lambda a, b: a - b, torch.sub),
    "mul": (lambda a, b: a * b, torch.mul),
    "div": (lambda a, b: a / b, torch.div),
    "radd": (lambda a, b: 2.5 + a, lambda a, b: 2.5 + a),
    "rsub": (lambda a, b: 2.5 - a, lambda a, b: 2.5 - a),
    "rmul": (lambda a, b: 2.5 * a, lambda a, b: 2.5 * a),
    "rdiv": (lambda a, b: 2.5 / a, lambda a, b: 2.5 / a),
}

LOCAL_HINTS = {
    "tanh": "d tanh(x)/dx = 1 - tanh(x)**2",
    "exp": "d exp(x)/dx = exp(x), the output itself",
    "log": "d log(x)/dx = 1 / x",
    "relu": "relu passes the gradient only where the input is > 0",
    "pow3": "d x**n/dx = n * x**(n - 1)",
    "pow-0.5": "d x**n/dx = n * x**(n - 1)",
}


@pytest.mark.group("value_ops")
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_against_torch(learner, rng, name):
    Value = learner.module("autograd").Value
    apply, torch_apply, (lo, hi) = UNARY[name]
    x0 = float(rng.uniform(lo, hi))
    if name == "relu" and abs(x0) < 1e-3:
        x0 = 0.5
    x = Value(x0)
    y = apply(x)
    t = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    ty = torch_apply(t)
    ty.backward()
    assert_close(y.data, ty.item(), rtol=1e-12, atol=1e-12, call=f"{name}(Value({x0:.6g})).data")
    y.backward()
    assert_close(x.grad, t.grad.item(), rtol=1e-9, atol=1e-12, call=f"Value({x0:.6g}) grad after {name}(...).backward()",
                 hint=LOCAL_HINTS.get(name))


@pytest.mark.group("value_ops")
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_against_torch(learner, rng, name):
    Value = learner.module("autograd").Value
    apply, torch_apply = BINARY[name]
    a0, b0 = float(rng.uniform(0.3, 2.0)), float(rng.uniform(-2.0, -0.3))
    a, b = Value(a0), Value(b0)
    out = apply(a, b)
    ta = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    tout = torch_apply(ta, tb)
    tout.backward()
    call = f"{name} with a={a0:.4g}, b={b0:.4g}"
    assert_close(out.data, tout.item(), rtol=1e-12, atol=1e-12, call=f"{call}: value")
    out.backward()
    assert_close(a.grad, ta.grad.item(), rtol=1e-9, atol=1e-12, call=f"{call}: a.grad",
                 mistakes={"in a * b, a's gradient is b (and b's is a): the operands are swapped": a0} if name == "mul" else None)
    expected_b = tb.grad.item() if tb.grad is not None else 0.0
    assert_close(b.grad, expected_b, rtol=1e-9, atol=1e-12, call=f"{call}: b.grad")


@pytest.mark.group("value_ops")
def test_log_of_non_positive_raises(learner):
    Value = learner.module("autograd").Value
    with pytest.raises(ValueError):
        Value(-1.0).log()


def _build(ops, x0, lib):
    """The same random expression in the learner's Value and in torch."""
    x = lib(x0)
    nodes = [x]
    for kind, i, j in ops:
        a, b = nodes[i % len(nodes)], nodes[j % len(nodes)]
        if kind == 0:
            nodes.append(a + b)
        elif kind == 1:
            nodes.append(a * b)
        elif kind == 2:
            nodes.append(a.tanh())
        else:
            nodes.append(a - b * 0.5)
    out = nodes[-1]
    for node in nodes[1:-1]:
        out = out + node * 0.1  # every intermediate feeds the output more than once
    return x, out


@pytest.mark.group("value_backward")
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=12),
       x0=st.floats(-1.5, 1.5))
def test_random_graphs_against_torch(learner, ops, x0):
    Value = learner.module("autograd").Value
    x, out = _build(ops, x0, Value)
    t = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    tx, tout = _build(ops, None, lambda _: t)
    tout.backward()
    out.backward()
    assert_close(out.data, tout.item(), rtol=1e-9, atol=1e-9, call=f"a random graph of {len(ops)} operations: value")
    assert_close(x.grad, t.grad.item(), rtol=1e-7, atol=1e-9, call=f"a random graph of {len(ops)} operations: x.grad",
                 hint="check the order (reverse topological) and that every node's _backward runs exactly once")


@pytest.mark.group("value_backward")
def test_diamond_accumulates_and_runs_once(learner, rng):
    Value = learner.module("autograd").Value
    x0 = float(rng.uniform(0.5, 1.5))
    x = Value(x0)
    a = x * 2.0
    b = x * 3.0
    c = a * b  # 6 x^2
    d = c + a  # 6 x^2 + 2 x
    d.backward()
    assert_close(x.grad, 12 * x0 + 2, rtol=1e-12, call=f"x.grad of (2x)(3x) + 2x at x={x0:.4g}",
                 mistakes={ACCUMULATE: 3 * 2 * x0 * 3,
                           "run each node's _backward once, after all of its users (reverse topological order)":
                               2 * (12 * x0 + 2)})


@pytest.mark.group("value_backward")
def test_ten_thousand_nodes(learner, rng):
    Value = learner.module("autograd").Value
    x0 = float(rng.uniform(0.5, 1.0))
    x = Value(x0)
    y = x
    for _ in range(5000):
        y = y * 1.0001 + 0.0  # 10,000 nodes deep
    y.backward()
    assert_close(x.grad, 1.0001**5000, rtol=1e-9, call="x.grad through a 10,000-node chain",
                 hint="walk the graph with an explicit stack: recursion stops at about 1,000 frames")


@pytest.mark.group("value_backward")
def test_leaf_gradients_of_a_neuron(learner, rng):
    Value = learner.module("autograd").Value
    w0, x0 = rng.normal(size=3), rng.normal(size=3)
    b0 = float(rng.normal())
    ws = [Value(float(v)) for v in w0]
    xs = [Value(float(v)) for v in x0]
    b = Value(b0)
    act = b
    for w, x in zip(ws, xs):
        act = act + w * x
    out = act.tanh()
    out.backward()
    tw = torch.tensor(w0, requires_grad=True)
    tb = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    torch.tanh(tb + (tw * torch.tensor(x0)).sum()).backward()
    assert_close(np.array([w.grad for w in ws]), tw.grad.numpy(), rtol=1e-9, atol=1e-12, call="a tanh neuron: weight grads")
    assert_close(b.grad, tb.grad.item(), rtol=1e-9, atol=1e-12, call="a tanh neuron: bias grad")
