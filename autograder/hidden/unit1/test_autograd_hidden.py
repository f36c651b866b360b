"""Hidden tests, Part A: every operation against float64 finite differences and torch.autograd,
random expression graphs (Hypothesis), accumulation, order, and a 10,000-node graph."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close, check

# The hints of the classic mistakes of backward(), each shown only where the learner's gradient is
# what that mistake gives (computed here by _Sim, below).
ACCUMULATE = "a node used twice must accumulate its gradient (+=), not overwrite it (=)"
ORDER = ("call _backward in reverse topological order (for node in reversed(order)): walked forwards, a node "
         "passes its gradient on before its users have added theirs")
ONCE = "call each node's _backward exactly once: check the visited set when you pop a node, not only when you push it"
SWAPPED = "in a * b, a's gradient is b (and b's is a): the operands are swapped"

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

UPSTREAM = 1.7  # the gradient that reaches an operation from above, when it is not the root

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
    # One random point has one sign: a relu that returns 0 everywhere (or x everywhere) agrees with
    # torch on half the seeds.  Where the range holds both signs, both are checked on every seed.
    # Just either side of 0 as well: a relu whose threshold moved (x > -1) is wrong only near it.
    # Where the range is one-signed, its two ends as well: log's domain check moved to x <= 1 is wrong only
    # below 1, where one random point of (0.2, 3) falls on 29% of the seeds.
    ends = (lo + (hi - lo) / 8, hi - (hi - lo) / 8)
    for point in ((abs(x0), -abs(x0), 1e-3, -1e-3) if lo < 0 < hi else (x0, *ends)):
        _check_unary(Value, name, apply, torch_apply, point)


def _check_unary(Value, name, apply, torch_apply, x0):
    __tracebackhide__ = True
    x = Value(x0)
    y = apply(x)
    t = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    ty = torch_apply(t)
    ty.backward()
    assert_close(y.data, ty.item(), rtol=1e-12, atol=1e-12, call=f"{name}(Value({x0!r})).data",
                 hint="relu(x) is x where x > 0, and 0.0 elsewhere" if name == "relu" else None)
    y.backward()
    def build(lib):
        v = lib(x0)
        return (v,), apply(v)

    got = x.grad
    assert_close(got, t.grad.item(), rtol=1e-9, atol=1e-12, call=f"x.grad after {name}(x).backward(), x = Value({x0!r})",
                 mistakes=_mistakes(build, got), hint=LOCAL_HINTS.get(name))
    # At the root out.grad is 1, so a backward that forgets the chain rule (or raises out.grad to a power
    # where it should multiply) still looks right there: the same operation again, under an upstream 1.7.
    x = Value(x0)
    (apply(x) * UPSTREAM).backward()
    t = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    (torch_apply(t) * UPSTREAM).backward()
    assert_close(x.grad, t.grad.item(), rtol=1e-9, atol=1e-12,
                 call=f"x.grad after ({name}(x) * {UPSTREAM}).backward(), x = Value({x0!r})",
                 hint=f"{name}'s _backward must multiply its local derivative by out.grad (the chain rule): "
                      f"here out.grad = {UPSTREAM}, not 1")


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
    call = f"{name} with a = Value({a0!r}), b = Value({b0!r})"
    assert_close(out.data, tout.item(), rtol=1e-12, atol=1e-12, call=f"{call}: value")
    out.backward()
    def build(lib):
        inputs = (lib(a0), lib(b0))
        return inputs, apply(*inputs)

    got = a.grad
    assert_close(got, ta.grad.item(), rtol=1e-9, atol=1e-12, call=f"{call}: a.grad", mistakes=_mistakes(build, got, 0))
    expected_b = tb.grad.item() if tb.grad is not None else 0.0
    got = b.grad
    assert_close(got, expected_b, rtol=1e-9, atol=1e-12, call=f"{call}: b.grad", mistakes=_mistakes(build, got, 1))
    # Under an upstream gradient that is not 1 (see test_unary_against_torch).
    a, b = Value(a0), Value(b0)
    (apply(a, b) * UPSTREAM).backward()
    ta = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    (torch_apply(ta, tb) * UPSTREAM).backward()
    for label, got, want in (("a", a.grad, ta.grad), ("b", b.grad, tb.grad)):
        assert_close(got, want.item() if want is not None else 0.0, rtol=1e-9, atol=1e-12,
                     call=f"({call}) * {UPSTREAM}: {label}.grad",
                     hint=f"{name}'s _backward must multiply its local derivative by out.grad (the chain rule): "
                          f"here out.grad = {UPSTREAM}, not 1")


@pytest.mark.group("value_ops")
def test_log_of_non_positive_raises(learner):
    Value = learner.module("autograd").Value
    for x0 in (-1.0, 0.0):  # "raise ValueError if a <= 0": 0 included
        with pytest.raises(ValueError):
            Value(x0).log()


@pytest.mark.group("value_ops")
def test_relu_at_zero(learner):
    """The kink itself, which random inputs never hit: relu(0) = 0, and its gradient there is 0
    (1 only where the input is > 0, as torch.relu does)."""
    Value = learner.module("autograd").Value
    x = Value(0.0)
    y = x.relu()
    assert_close(y.data, 0.0, atol=0, call="Value(0.0).relu().data")
    y.backward()
    assert_close(x.grad, 0.0, atol=0, call="x.grad after x.relu().backward(), x = Value(0.0)",
                 hint="relu passes the gradient only where the input is > 0: at exactly 0 it passes nothing")


class _Sim:
    """The scalar engine of the handout, written here, with a switch for each classic mistake: it
    computes what a learner's Value with that mistake gives on the same graph, so that a failure
    can name the mistake.  The given operators (-, neg, /, radd, ...) are built the way
    autograd.py builds them, so the graphs have the same nodes in the same order."""

    def __init__(self, data, prev=(), local=(), op=""):
        self.data, self.prev, self.local, self.op, self.grad = float(data), prev, local, op, 0.0

    @staticmethod
    def lift(v):
        return v if isinstance(v, _Sim) else _Sim(v)

    def __add__(self, other):
        other = _Sim.lift(other)
        return _Sim(self.data + other.data, (self, other), (1.0, 1.0), "+")

    def __mul__(self, other):
        other = _Sim.lift(other)
        return _Sim(self.data * other.data, (self, other), (other.data, self.data), "*")

    def __pow__(self, n):
        return _Sim(self.data**n, (self,), (n * self.data ** (n - 1),), "**")

    def tanh(self):
        t = float(np.tanh(self.data))
        return _Sim(t, (self,), (1.0 - t * t,), "tanh")

    def exp(self):
        e = float(np.exp(self.data))
        return _Sim(e, (self,), (e,), "exp")

    def log(self):
        return _Sim(float(np.log(self.data)), (self,), (1.0 / self.data,), "log")

    def relu(self):
        return _Sim(max(self.data, 0.0), (self,), (1.0 if self.data > 0 else 0.0,), "relu")

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-_Sim.lift(other))

    def __truediv__(self, other):
        return self * _Sim.lift(other) ** -1

    def __radd__(self, other):
        return self + other

    def __rsub__(self, other):
        return _Sim.lift(other) - self

    def __rmul__(self, other):
        return self * other

    def __rtruediv__(self, other):
        return _Sim.lift(other) / self

    def backward(self, mistake=None, overwrite=("+", "*", "**", "tanh", "exp", "log", "relu")):
        """mistake: None (right), "overwrite" (= instead of += in the ops named by ``overwrite``),
        "forwards" (the order walked forwards), "twice" (visited checked only when pushing) or
        "swapped" (in a * b, a's gradient uses a and b's uses b)."""
        order, visited, stack = [], set(), [(self, False)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in visited and mistake != "twice":
                continue
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in node.prev if id(child) not in visited)
        self.grad = 1.0
        for node in order if mistake == "forwards" else reversed(order):
            local = node.local[::-1] if mistake == "swapped" and node.op == "*" else node.local
            for child, d in zip(node.prev, local):
                if mistake == "overwrite" and node.op in overwrite:
                    child.grad = d * node.grad
                else:
                    child.grad += d * node.grad


def _mistakes(build, got, which=0):
    """{hint: what that mistake gives} for input ``which`` of the graph ``build(_Sim)`` returns as
    (inputs, out); for `=` instead of `+=`, the variant (in every operation, or in one) closest to
    what the learner got.  None where the learner's value is not a number (assert_close says why)."""
    if not isinstance(got, float):
        return None

    def grad(mistake=None, *overwrite):
        inputs, out = build(_Sim)
        out.backward(mistake, *overwrite)
        return inputs[which].grad

    overwritten = [grad("overwrite", ops) for ops in (("+", "*", "**", "tanh"), ("+",), ("*",), ("**",), ("tanh",))]
    return {ACCUMULATE: min(overwritten, key=lambda v: abs(v - got)), ORDER: grad("forwards"), ONCE: grad("twice"),
            SWAPPED: grad("swapped")}


_NAMES = {0: "{a} + {b}", 1: "{a} * {b}", 2: "tanh({a})", 3: "{a} - {b} * 0.5"}


def _build(ops, x0, lib):
    """The same random expression in the learner's Value, in torch and in _Sim."""
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


def _program(ops, x0) -> str:
    """The expression _build makes, as Python you can paste (with your Value as x)."""
    names, lines = ["x"], [f"x = Value({x0!r})"]
    for kind, i, j in ops:
        a, b = names[i % len(names)], names[j % len(names)]
        names.append(f"n{len(names)}")
        lines.append(f"{names[-1]} = " + (_NAMES[kind].format(a=a, b=b) if kind != 2 else f"{a}.tanh()"))
    lines.append("out = " + " + ".join([names[-1]] + [f"{n} * 0.1" for n in names[1:-1]]))
    return "; ".join(lines)


@pytest.mark.group("value_backward")
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=12),
       x0=st.floats(-1.5, 1.5))
# Graphs where each mistake shows for sure (random draws reach them only sometimes): a node used
# twice by one operation (x * x, x + x), an intermediate used twice (n1 + n1: expanded twice when
# visited is checked only at push), and a chain in which the order matters.
@example(ops=[(1, 0, 0)], x0=1.25)
@example(ops=[(0, 0, 0)], x0=0.75)
@example(ops=[(1, 0, 0), (0, 1, 1)], x0=0.5)
@example(ops=[(1, 0, 0), (2, 1, 1), (3, 2, 1)], x0=-0.8)
def test_random_graphs_against_torch(learner, ops, x0):
    Value = learner.module("autograd").Value
    x, out = _build(ops, x0, Value)
    t = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    tx, tout = _build(ops, None, lambda _: t)
    tout.backward()
    out.backward()
    program = _program(ops, x0)

    def build(lib):
        x, out = _build(ops, x0, lib)
        return (x,), out

    assert_close(out.data, tout.item(), rtol=1e-9, atol=1e-9, call=f"out.data after {program}")
    got = x.grad
    assert_close(got, t.grad.item(), rtol=1e-7, atol=1e-9, call=f"x.grad after {program}; out.backward()",
                 mistakes=_mistakes(build, got),
                 hint="check the order (reverse topological) and that every node's _backward runs exactly once")


@pytest.mark.group("value_backward")
def test_diamond_accumulates_and_runs_once(learner, rng):
    Value = learner.module("autograd").Value
    x0 = float(rng.uniform(0.5, 1.5))

    def build(lib):
        x = lib(x0)
        a = x * 2.0
        b = x * 3.0
        c = a * b  # 6 x^2
        return (x,), c + a  # 6 x^2 + 2 x

    (x,), d = build(Value)
    d.backward()
    got = x.grad
    assert_close(got, 12 * x0 + 2, rtol=1e-12, call=f"x.grad of a * b + a, a = x * 2.0, b = x * 3.0, x = Value({x0!r})",
                 mistakes=_mistakes(build, got))


@pytest.mark.group("value_backward")
def test_ten_thousand_nodes(learner, rng):
    Value = learner.module("autograd").Value
    x0 = float(rng.uniform(0.5, 1.0))
    x = Value(x0)
    y = x
    for _ in range(5000):
        y = y * 1.0001 + 0.0  # 10,000 nodes deep
    try:
        y.backward()
    except RecursionError as exc:
        check(False, f"backward() through a chain of 10,000 nodes raised RecursionError ({str(exc)[:80]})\n"
                     "Hint: walk the graph with an explicit stack: recursion stops at about 1,000 frames")
    assert_close(x.grad, 1.0001**5000, rtol=1e-9, call="x.grad of y = x * 1.0001 + 0.0, repeated 5000 times (10,000 nodes)",
                 mistakes={ORDER: 0.0}, hint="check that every node's _backward runs, once, in reverse topological order")


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
