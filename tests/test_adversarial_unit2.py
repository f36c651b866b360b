"""Hostile submissions for Unit 2: a blockwise.py that
computes full attention (right values, one [n_q, n_k] score matrix) earns nothing from the memory
tests however it tampers with the learner's side: the harness helpers the memory tests used to
trust (largest_allocation, the saved shapes of autograd_forward), a score matrix kept on ctx
instead of saved, a large buffer allocated at import and freed during the call, or the allocator
trimmed at import.  The memory tests are graded from outside the worker (its cgroup's peak since
a fresh start), so each attack earns exactly what the honest full-attention file earns there: 0."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from autograder.manifest import REPO_ROOT, Limits, load_course
from autograder.runner import grade

COURSE = load_course()
FAST = COURSE.model_copy(update={"limits": Limits(unit_timeout=240, call_timeout=10, memory_mb=1024,
                                                  max_processes=64, max_file_kb=512)})
STUB = (REPO_ROOT / "exercises" / "unit2" / "blockwise.py").read_text()
MEMORY_TESTS = "memory_is_blockwise or saves_no_score_matrix or never_builds_the_score_matrix"
EXPECTED = {"test_blockwise.py::test_blockwise_never_builds_the_score_matrix",
            "hidden/test_blockwise_hidden.py::test_forward_memory_is_blockwise",
            "hidden/test_blockwise_hidden.py::test_saves_no_score_matrix"}

# Materialised attention with the right values: what an honest learner who skipped the blocks writes.
FULL = '''
import math
import torch


def _full(q, k, v, is_causal=False, block_size=128):
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.to(compute)).to(q.dtype), lse


def online_softmax_attention(q, k, v, is_causal=False, block_size=128):
    return _full(q, k, v, is_causal, block_size)


def blockwise_attention(q, k, v, is_causal=False, block_size=128):
    return _full(q, k, v, is_causal, block_size)[0]


def memory_efficient_attention(q, k, v, is_causal=False, block_size=128):
    return _full(q, k, v, is_causal, block_size)[0]  # plain autograd through the score matrix
'''

# The same values, and everything the old memory tests read inside the worker made to look blockwise.
TAMPER = '''
import sys
import types


class _Hidden(torch.autograd.Function):
    """Saves only q, k, v, out, lse for backward; the probabilities ride along on ctx."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, block_size):
        with torch.enable_grad():
            q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
            out, lse = _full(q2, k2, v2, is_causal, block_size)
        ctx.graph = (q2, k2, v2, out)
        ctx.save_for_backward(q, k, v, out.detach(), lse.detach())
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        q2, k2, v2, out = ctx.graph
        with torch.enable_grad():
            grads = torch.autograd.grad(out, (q2, k2, v2), grad_out)
        return (*grads, None, None)


def memory_efficient_attention(q, k, v, is_causal=False, block_size=128):
    return _Hidden.apply(q, k, v, is_causal, block_size)


_harness = sys.modules.get("autograder.worker.harness")
if _harness is not None:
    def _largest(fn, args, backward=False):
        inputs = [a.detach().clone().requires_grad_(True) if backward and isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for a in args]
        output = fn(*inputs)
        if backward:
            output.backward(torch.ones_like(output))
        return 1024, output.detach()

    def _forward(fn, args, grad_mask):
        output, record, saved = _original_autograd_forward(fn, args, grad_mask)
        return output, record, [tuple(args[0].shape)] * 4

    # The helper table was taken before this file was imported: change the functions it holds.
    _harness._original_autograd_forward = types.FunctionType(
        _harness.autograd_forward.__code__, _harness.__dict__, "autograd_forward")
    _harness.largest_allocation.__code__ = _largest.__code__
    _harness.autograd_forward.__code__ = _forward.__code__
    try:
        import torch.utils._python_dispatch as _dispatch
        _dispatch.TorchDispatchMode.__torch_dispatch__ = lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {}))
    except Exception:
        pass
'''

# A large buffer held from import and freed inside the call: the call's own peak (above its start)
# would no longer show the score matrix; the peak since the worker's start still does.  The
# allocator is trimmed at import too, to lower the memory the call starts from.
IMPORT_BUFFER = '''
import ctypes
import gc

_reserve = [torch.ones(256 << 20, dtype=torch.uint8)]  # 256 MiB, touched: more than any call here needs
gc.collect()
try:
    ctypes.CDLL(None).malloc_trim(0)
except Exception:
    pass
_plain_full = _full


def _full(q, k, v, is_causal=False, block_size=128):
    _reserve.clear()  # handed back to the system just before the score matrix is built
    return _plain_full(q, k, v, is_causal, block_size)
'''

SUBMISSIONS = {"honest_full_attention": FULL, "tampered_harness": FULL + TAMPER, "import_time_buffer": FULL + IMPORT_BUFFER}


def submission(tmp_path: Path, name: str) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "unit2" / "blockwise.py").write_text(STUB + "\n" + SUBMISSIONS[name])
    return root


@pytest.mark.parametrize("name", sorted(SUBMISSIONS))
def test_full_attention_earns_nothing_from_the_memory_tests(tmp_path, name):
    report = grade(FAST, submission(tmp_path, name), ["unit2"], extra_args=["-k", MEMORY_TESTS])
    unit = report.units[0]
    assert unit.error is None, unit.error
    assert report.isolation in ("bwrap", "user"), report.isolation_note
    graded = {t.name: t for t in unit.tests if t.group in ("blockwise", "blockwise_backward")}
    assert set(graded) == EXPECTED, sorted(graded)
    passed = [f"{t.name}: {t.output}" for t in graded.values() if t.status == "passed"]
    assert passed == [], "full attention passed a memory test:\n" + "\n".join(passed)
    # Failed on memory (the values are right): the message says what was measured, from outside.
    for test in graded.values():
        assert "measured outside your process" in test.output, (test.name, test.output)
    assert sum(g.score for g in unit.groups if g.id in ("blockwise", "blockwise_backward")) == 0
    if name == "import_time_buffer":
        # The attack works against a call's own peak: the memory freed inside the call covers the
        # score matrix, so the call rises (almost) nothing above its start.  Only the peak since
        # the fresh worker's start, which covers the import, catches it.
        for test in graded.values():
            rise = float(re.search(r"the call alone rose ([0-9.]+) MiB", test.output).group(1))
            allowed = float(re.search(r"allowed ([0-9.]+) MiB", test.output).group(1))
            assert rise < allowed, (test.name, test.output)


def test_the_values_of_full_attention_still_earn_their_points(tmp_path):
    """The control: the attacks above lose only the memory tests (the honest file's correctness
    tests still pass), so "0 in the memory tests" is what the honest file earns there too."""
    report = grade(FAST, submission(tmp_path, "tampered_harness"), ["unit2"],
                   extra_args=["-k", "test_any_block_size or test_gradients_against_autograd"])
    unit = report.units[0]
    tests = [t for t in unit.tests if t.group in ("blockwise", "blockwise_backward")]
    assert tests and all(t.status == "passed" for t in tests), [(t.name, t.status, t.output) for t in tests]
