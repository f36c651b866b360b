"""Assertions whose failure messages teach.

A failing check says what was called (with shapes and dtypes), what came back, the largest
absolute and relative error and where it is, and -- when the learner's output matches what a
known mistake would produce -- a hint that names the mistake.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autograder.client import Proxy, describe_value

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


class CheckFailure(AssertionError):
    """A graded check failed; the message is meant for the learner."""


def _as_array(value: Any) -> np.ndarray | None:
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_complex():
            return tensor.numpy().astype(np.complex128)
        return tensor.to(torch.float64).numpy() if tensor.dtype != torch.bool else tensor.numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64) if value.dtype.kind in "fiub" and value.dtype != bool else value
    if isinstance(value, (bool, int, float, np.generic)):
        return np.asarray(value, dtype=np.float64)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, bool)) for v in value):
        return np.asarray(value, dtype=np.float64)
    return None


def _index(flat: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return "(scalar)"
    return "[" + ", ".join(str(i) for i in np.unravel_index(flat, shape)) + "]"


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)) and np.array_equal(np.isnan(a), np.isnan(b)))


def _digits(a: float, b: float) -> tuple[str, str]:
    """The two numbers with enough significant digits to show that they differ."""
    for precision in (6, 9, 12, 17):
        x, y = f"{a:.{precision}g}", f"{b:.{precision}g}"
        if x != y:
            return x, y
    return x, y


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-8, call: str = "the result",
                 mistakes: dict[str, Any] | None = None, hint: str | None = None, dtype: Any = None,
                 nan_hint: str | None = None) -> None:
    """Fail with a teaching message unless ``actual`` matches ``expected`` elementwise.

    ``mistakes`` maps a hint to the value a known mistake would give; the hint is shown when the
    learner's output matches that value.  ``hint`` is shown on any other failure of the values;
    where NaN appears that was not expected, ``nan_hint`` is shown instead (a NaN is its own
    mistake: overflow, log(0), 0/0, -inf - -inf).
    """
    __tracebackhide__ = True
    got = _as_array(actual)
    want = _as_array(expected)
    if want is None:
        raise TypeError(f"assert_close: cannot compare against a {type(expected).__name__}")

    def fail(lines: list[str], generic: str | None = hint) -> None:
        __tracebackhide__ = True
        extra = []
        for text, wrong in (mistakes or {}).items():
            wrong_arr = _as_array(wrong)
            if got is not None and wrong_arr is not None and _close(got, wrong_arr, max(rtol, 1e-6), max(atol, 1e-9)):
                extra.append(f"Hint: {text}")
        if generic and not extra:
            extra.append(f"Hint: {generic}")
        raise CheckFailure("\n".join([f"{call} gave a wrong result:", *("  " + l for l in lines), *extra]))

    if actual is None:
        fail(["it returned None (a missing `return`?)"])
    if isinstance(actual, Proxy):
        fail([f"it returned a {actual._handle.type_name} object; expected {describe_value(expected)}"])
    if got is None:
        fail([f"it returned {describe_value(actual)}; expected {describe_value(expected)}"])
    if dtype is not None and getattr(actual, "dtype", None) != dtype:
        fail([f"dtype is {getattr(actual, 'dtype', type(actual).__name__)}; expected {dtype}"])
    if got.shape != want.shape:
        lines = [f"shape is {tuple(got.shape)}; expected {tuple(want.shape)}"]
        if got.ndim == want.ndim == 2 and got.shape == want.shape[::-1]:
            lines.append("the shape is transposed")
        fail(lines)
    if got.size == 0:
        return
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    if np.any(nan_got & ~nan_want):
        first = int(np.flatnonzero(nan_got & ~nan_want)[0])
        fail([f"{int(np.sum(nan_got & ~nan_want))} NaN value(s), the first at "
              f"{_index(first, got.shape)} (expected {want.flat[first]:.6g}): look for overflow, log(0) or 0/0 "
              "(or inf - inf: a row whose every entry is masked to -inf gives NaN in softmax)"], generic=nan_hint)
    err = np.abs(got - want)
    err = np.where(nan_got & nan_want, 0.0, err)
    allowed = atol + rtol * np.abs(want)
    bad = err > allowed
    if np.any(bad) or np.any(np.isinf(got) != np.isinf(want)):
        worst = int(np.argmax(np.where(bad, err - allowed, -np.inf))) if np.any(bad) else int(np.argmax(np.isinf(got) != np.isinf(want)))
        shown_got, shown_want = _digits(float(got.flat[worst]), float(want.flat[worst]))
        lines = [f"{int(np.sum(bad))} of {got.size} value(s) differ beyond atol={atol:g}, rtol={rtol:g}",
                 f"largest absolute error {err.flat[worst]:.4g} at {_index(worst, got.shape)}: got {shown_got}, expected {shown_want}"]
        nonzero = np.abs(want) > 0
        if np.any(bad & nonzero):  # a relative error against 0 means nothing: there the absolute error says it all
            rel = np.where(nonzero, err / np.where(nonzero, np.abs(want), 1.0), 0.0)
            worst_rel = int(np.argmax(np.where(bad & nonzero, rel, -np.inf)))
            lines.append(f"largest relative error {rel.flat[worst_rel]:.4g} at {_index(worst_rel, got.shape)}")
        fail(lines)


def check(condition: bool, message: str) -> None:
    """A plain graded condition with a teaching message."""
    __tracebackhide__ = True
    if not condition:
        raise CheckFailure(message)
