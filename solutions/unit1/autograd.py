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
        ### BEGIN SOLUTION
        out = Value(self.data + other.data, (self, other), "+")

        def _backward() -> None:
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out
        ### END SOLUTION

    def __mul__(self, other: "Value | float") -> "Value":
        other = Value.lift(other)
        # TODO: out = self * other; d(out)/d(self) = other, d(out)/d(other) = self.
        ### BEGIN SOLUTION
        out = Value(self.data * other.data, (self, other), "*")

        def _backward() -> None:
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad

        out._backward = _backward
        return out
        ### END SOLUTION

    def __pow__(self, exponent: float) -> "Value":
        if isinstance(exponent, Value):
            raise TypeError("only a constant (int or float) exponent is supported")
        # TODO: out = self ** exponent; d(out)/d(self) = exponent * self ** (exponent - 1).
        ### BEGIN SOLUTION
        out = Value(self.data**exponent, (self,), f"**{exponent:g}")

        def _backward() -> None:
            self.grad += exponent * self.data ** (exponent - 1) * out.grad

        out._backward = _backward
        return out
        ### END SOLUTION

    def exp(self) -> "Value":
        # TODO: out = e ** self; d(out)/d(self) = out.
        ### BEGIN SOLUTION
        out = Value(math.exp(self.data), (self,), "exp")

        def _backward() -> None:
            self.grad += out.data * out.grad

        out._backward = _backward
        return out
        ### END SOLUTION

    def log(self) -> "Value":
        # TODO: out = ln(self) (raise ValueError if self <= 0); d(out)/d(self) = 1 / self.
        ### BEGIN SOLUTION
        if self.data <= 0:
            raise ValueError(f"log of a non-positive number ({self.data})")
        out = Value(math.log(self.data), (self,), "log")

        def _backward() -> None:
            self.grad += out.grad / self.data

        out._backward = _backward
        return out
        ### END SOLUTION

    def tanh(self) -> "Value":
        # TODO: out = tanh(self); d(out)/d(self) = 1 - out ** 2.
        ### BEGIN SOLUTION
        out = Value(math.tanh(self.data), (self,), "tanh")

        def _backward() -> None:
            self.grad += (1.0 - out.data**2) * out.grad

        out._backward = _backward
        return out
        ### END SOLUTION

    def relu(self) -> "Value":
        # TODO: out = max(0, self); d(out)/d(self) = 1 where self > 0, else 0.
        ### BEGIN SOLUTION
        out = Value(self.data if self.data > 0 else 0.0, (self,), "relu")

        def _backward() -> None:
            self.grad += (1.0 if self.data > 0 else 0.0) * out.grad

        out._backward = _backward
        return out
        ### END SOLUTION

    def backward(self) -> None:
        """Set self.grad = 1 and add d(self)/d(node) into node.grad for every node below.

        Visit the graph in reverse topological order without recursion (graphs can be 10,000
        nodes deep), calling each node's _backward exactly once.
        """
        # TODO: topological order with an explicit stack; then seed the gradient and go backwards.
        ### BEGIN SOLUTION
        order: list[Value] = []
        visited: set[int] = set()
        stack: list[tuple[Value, bool]] = [(self, False)]
        while stack:
            node, inputs_done = stack.pop()
            if inputs_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in node._prev if id(child) not in visited)
        self.grad = 1.0
        for node in reversed(order):
            node._backward()
        ### END SOLUTION

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
