"""Visible tests for Part A. Run: pytest exercises/unit1/test_autograd.py"""

import math

import pytest

from autograder.checks import assert_close, check

ACCUMULATE = "a node used twice must accumulate its gradient (+=), not overwrite it (=)"


@pytest.mark.group("value_ops")
def test_add_and_mul(learner):
    Value = learner.module("autograd").Value
    a, b = Value(2.0), Value(-3.0)
    out = a * b + a
    check(out is not None, "a * b + a returned None")
    assert_close(out.data, 2.0 * -3.0 + 2.0, call="(a * b + a).data with a=2, b=-3")
    out.backward()
    # d/da (a*b + a) = b + 1 ; d/db = a
    assert_close(a.grad, -3.0 + 1.0, call="a.grad after (a * b + a).backward()",
                 mistakes={ACCUMULATE: 1.0})
    assert_close(b.grad, 2.0, call="b.grad after (a * b + a).backward()")


@pytest.mark.group("value_ops")
def test_tanh_exp_log(learner):
    Value = learner.module("autograd").Value
    x = Value(0.5)
    y = x.tanh() + x.exp() + x.log()
    assert_close(y.data, math.tanh(0.5) + math.exp(0.5) + math.log(0.5), call="tanh(x) + exp(x) + log(x) at x=0.5")
    y.backward()
    expected = (1 - math.tanh(0.5) ** 2) + math.exp(0.5) + 1 / 0.5
    assert_close(x.grad, expected, call="x.grad of tanh(x) + exp(x) + log(x) at x=0.5",
                 mistakes={"d tanh(x)/dx is 1 - tanh(x)**2, not 1 - tanh(x)": (1 - math.tanh(0.5)) + math.exp(0.5) + 2})


@pytest.mark.group("value_backward")
def test_node_used_twice(learner):
    Value = learner.module("autograd").Value
    x = Value(3.0)
    y = x * x
    y.backward()
    assert_close(x.grad, 6.0, call="x.grad after (x * x).backward() at x=3", mistakes={ACCUMULATE: 3.0})


@pytest.mark.group("value_backward")
def test_deep_chain_has_no_recursion_limit(learner):
    Value = learner.module("autograd").Value
    x = Value(1.0)
    y = x
    for _ in range(2000):
        y = y * 1.0 + 0.0
    y.backward()
    assert_close(x.grad, 1.0, call="x.grad through a chain of 4000 operations")
