"""Visible tests for Part A. Run: pytest exercises/unit1/test_autograd.py"""

import math

import pytest

from autograder.checks import assert_close, check

# Each hint names one mistake; the tests compute what that mistake gives and show its hint only
# when your result matches it.
ACCUMULATE = "a node used twice must accumulate its gradient (+=), not overwrite it (=)"
ORDER = ("call _backward in reverse topological order (for node in reversed(order)): walked forwards, a node "
         "passes its gradient on before its users have added theirs")
SWAPPED = "in a * b, a's gradient is b (and b's is a): the operands are swapped"
ONCE = "call each node's _backward exactly once: check the visited set when you pop a node, not only when you push it"
EXPLICIT_STACK = "walk the graph with an explicit stack: recursion stops at about 1,000 frames"


@pytest.mark.group("value_ops")
def test_add_and_mul(learner):
    Value = learner.module("autograd").Value
    a, b = Value(2.0), Value(-3.0)
    out = a * b + a
    check(out is not None, "a * b + a returned None")
    assert_close(out.data, 2.0 * -3.0 + 2.0, call="(a * b + a).data with a=2, b=-3")
    out.backward()
    # d/da (a*b + a) = b + 1 = -2; d/db = a = 2.  Overwriting (=) in a * b keeps only b = -3;
    # walking the order forwards runs a * b while its gradient is still 0, leaving only the 1 of + a.
    assert_close(a.grad, -3.0 + 1.0, call="a.grad after (a * b + a).backward() with a=2, b=-3",
                 mistakes={ACCUMULATE: -3.0, ORDER: 1.0, SWAPPED: 2.0 + 1.0})
    assert_close(b.grad, 2.0, call="b.grad after (a * b + a).backward() with a=2, b=-3",
                 mistakes={ORDER: 0.0, SWAPPED: -3.0})


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
    """x * x and x + x: self and other are the same Value, which gets both contributions; n + n with
    n = x * 2: n sits on the stack twice, and must still pass its gradient on only once."""
    Value = learner.module("autograd").Value
    x = Value(3.0)
    (x * x).backward()
    assert_close(x.grad, 6.0, call="x.grad after (x * x).backward() at x=3", mistakes={ACCUMULATE: 3.0})
    x = Value(3.0)
    (x + x).backward()
    assert_close(x.grad, 2.0, call="x.grad after (x + x).backward() at x=3", mistakes={ACCUMULATE: 1.0})
    x = Value(3.0)
    n = x * 2.0
    (n + n).backward()
    assert_close(x.grad, 4.0, call="x.grad after (n + n).backward() with n = x * 2.0 at x=3",
                 mistakes={ACCUMULATE: 2.0, ONCE: 8.0})


@pytest.mark.group("value_backward")
def test_deep_chain_has_no_recursion_limit(learner):
    Value = learner.module("autograd").Value
    x = Value(1.0)
    y = x
    for _ in range(2000):
        y = y * 1.0 + 0.0
    try:
        y.backward()
    except RecursionError as exc:
        check(False, f"backward() through a chain of 4000 operations raised RecursionError ({str(exc)[:80]})\n"
                     f"Hint: {EXPLICIT_STACK}")
    # Walked forwards, every node but the last passes on a gradient of 0.
    assert_close(x.grad, 1.0, call="x.grad of y = x * 1.0 + 0.0, repeated 2000 times (4000 operations)",
                 mistakes={ORDER: 0.0})
