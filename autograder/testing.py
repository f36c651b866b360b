"""Helpers for the course's tests (visible and hidden) that need more than a plain call.

Everything here runs on the trusted side and reaches learner code only through a ``Learner``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from autograder.client import Learner, Proxy, is_todo


class _RemoteFunction(torch.autograd.Function):
    """Makes a learner's differentiable function usable by trusted autograd tools (gradcheck):
    forward and backward each become a call into the learner's process."""

    @staticmethod
    def forward(ctx, learner: Learner, fn: Proxy, *args: Any) -> torch.Tensor:
        mask = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        output, record, saved = learner.harness("autograd_forward", fn, plain, mask)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"expected a tensor from the forward pass, got {type(output).__name__}")
        ctx.learner, ctx.record, ctx.mask = learner, record, mask
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = ctx.learner.harness("autograd_backward", ctx.record, grad_output)
        if not isinstance(grads, list) or len(grads) != len(ctx.mask):
            raise TypeError("backward returned the wrong number of gradients")
        return (None, None, *[g if wanted else None for g, wanted in zip(grads, ctx.mask)])


def remote_differentiable(learner: Learner, fn: Proxy) -> Callable[..., torch.Tensor]:
    """A trusted-side callable whose forward and backward run the learner's code."""
    return lambda *args: _RemoteFunction.apply(learner, fn, *args)


def todo_first(fn: Proxy | Callable[..., Any], *args: Any) -> None:
    """Call ``fn`` on a small input in the current worker before a test starts a fresh one, so that
    a stub's TODO fails the test without a worker start-up (a second of CPU) spent on it.  Any other
    error is left to the fresh worker's call, whose verdict stands."""
    try:
        fn(*args)
    except Exception as error:
        if is_todo(error):
            raise


def saved_tensor_shapes(learner: Learner, fn: Proxy, *args: Any) -> list[tuple[int, ...]]:
    """Shapes of what the learner's autograd.Function saved for backward."""
    mask = [isinstance(a, torch.Tensor) and a.is_floating_point() for a in args]
    _, _, saved = learner.harness("autograd_forward", fn, list(args), mask)
    return [tuple(s) for s in saved]


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function, in float64."""
    x = x.astype(np.float64).copy()
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f(x)
        x[i] = old - eps
        minus = f(x)
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``run()``, timed here, on the trusted side."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def baseline_cpu_seconds(run: Callable[[], Any], threads: int = 1) -> tuple[Any, float]:
    """Run a trusted baseline here, with torch on ``threads`` intra-op threads: (its result, the
    CPU seconds this process spent on it).  Graded speed tests compare this with the CPU time of
    the learner's call measured outside the worker (``learner.measure``): load elsewhere on the
    machine and processes the learner's code starts change neither figure in their favour."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.process_time()
        result = run()
        return result, time.process_time() - start
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread on this side: the expected values are small tensor computations, which on
    a busy machine are many times slower when torch's threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bf16_matmul_flops(n: int = 8192, repeats: int = 10) -> float:
    """The bf16 matmul throughput of this GPU, measured here (FLOP/s): the denominator of MFU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return repeats * 2 * n ** 3 / (time.perf_counter() - start)
