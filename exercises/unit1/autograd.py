"""Part A: a scalar autograd engine.

A ``Value`` wraps one float.  Every operation makes a new Value that remembers its inputs
(``_prev``) and a ``_backward`` closure that, given ``out.grad``, adds the local derivative times
``out.grad`` into each input's ``grad`` (the chain rule).  ``backward()`` calls the closures in
reverse topological order, so a node's gradient is complete before it is passed on.
"""

from __future__ import annotations

import math


class Value:
    """A scalar that remembers how it was computed."""

    def __init__(self, data: float, _prev: tuple["Value", ...] = (), _op: str = ""):
        self.data = float(data)
        self.grad = 0.0
        self._backward = lambda: None
        self._prev = _prev
        self._op = _op

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"

    @staticmethod
    def lift(other: "Value | float") -> "Value":
        return other if isinstance(other, Value) else Value(other)

    # --- the operations you write: a forward value and a _backward closure each ---------------

    def __add__(self, other: "Value | float") -> "Value":
        other = Value.lift(other)
        # TODO: out = self + other; d(out)/d(self) = 1, d(out)/d(other) = 1.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.__add__ in exercises/unit1/autograd.py")

    def __mul__(self, other: "Value | float") -> "Value":
        other = Value.lift(other)
        # TODO: out = self * other; d(out)/d(self) = other, d(out)/d(other) = self.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.__mul__ in exercises/unit1/autograd.py")

    def __pow__(self, exponent: float) -> "Value":
        if isinstance(exponent, Value):
            raise TypeError("only a constant (int or float) exponent is supported")
        # TODO: out = self ** exponent; d(out)/d(self) = exponent * self ** (exponent - 1).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.__pow__ in exercises/unit1/autograd.py")

    def exp(self) -> "Value":
        # TODO: out = e ** self; d(out)/d(self) = out.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.exp in exercises/unit1/autograd.py")

    def log(self) -> "Value":
        # TODO: out = ln(self) (raise ValueError if self <= 0); d(out)/d(self) = 1 / self.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.log in exercises/unit1/autograd.py")

    def tanh(self) -> "Value":
        # TODO: out = tanh(self); d(out)/d(self) = 1 - out ** 2.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.tanh in exercises/unit1/autograd.py")

    def relu(self) -> "Value":
        # TODO: out = max(0, self); d(out)/d(self) = 1 where self > 0, else 0.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.relu in exercises/unit1/autograd.py")

    def backward(self) -> None:
        """Set self.grad = 1 and add d(self)/d(node) into node.grad for every node below.

        Visit the graph in reverse topological order without recursion (graphs can be 10,000
        nodes deep), calling each node's _backward exactly once.
        """
        # TODO: topological order with an explicit stack; then seed the gradient and go backwards.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Value.backward in exercises/unit1/autograd.py")

    # --- given: everything else is built from the operations above ----------------------------

    def __neg__(self) -> "Value":
        return self * -1.0

    def __sub__(self, other: "Value | float") -> "Value":
        return self + (-Value.lift(other))

    def __truediv__(self, other: "Value | float") -> "Value":
        return self * Value.lift(other) ** -1

    def __radd__(self, other: float) -> "Value":
        return self + other

    def __rsub__(self, other: float) -> "Value":
        return Value.lift(other) - self

    def __rmul__(self, other: float) -> "Value":
        return self * other

    def __rtruediv__(self, other: float) -> "Value":
        return Value.lift(other) / self
