"""Hostile submissions for Unit 4.

The trust boundary: the worker computes only what the learner's functions compute.  Unit 4's tests
used to trust, in the worker, the course model's forward (the "full model" logits), the harness
helpers fill_normal, data_ptrs and compiled_decode, and the learner's own uncached generate as the
speed baseline.  Each attack below patches those at import on top of the untouched stubs (or of a
slow but honest solution) and must earn nothing it did not earn honestly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autograder.manifest import REPO_ROOT, load_course
from autograder.runner import grade
from autograder.scoring import NOT_GRADED

COURSE = load_course()
STUB_KV = (REPO_ROOT / "exercises" / "unit4" / "kvcache.py").read_text()
STUB_GEN = (REPO_ROOT / "exercises" / "unit4" / "generate.py").read_text()

# At import of kvcache.py: everything the old tests computed or measured in the worker, made to agree
# with functions that do no work.  The course model's forward returns zeros (so "the full model's
# logits" equal the zeros the fake functions return), fill_normal's noise becomes zeros (torch.randn),
# every storage address is the same (data_ptr), and torch.compile reports one clean graph and runs the
# function eagerly.  The fake KVCache keeps a consistent length.
PATCH_KV = '''
import torch
import torch.fx
import common.gpt as _gpt


def _zeros_forward(self, idx, positions=None, attn_mask=None):
    return torch.zeros(*idx.shape, self.config.vocab_size, dtype=self.transformer.wte.weight.dtype, device=idx.device)


_gpt.GPT.forward = _zeros_forward
_randn = torch.randn


def _no_noise(*size, generator=None, dtype=None, **kwargs):
    shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    return torch.zeros(*shape, dtype=dtype or torch.float32)


torch.randn = _no_noise
torch.Tensor.data_ptr = lambda self: 4096


def _one_clean_graph(fn, *args, backend=None, **kwargs):
    if callable(backend):
        backend(torch.fx.symbolic_trace(torch.nn.Identity()), [])
    return fn


torch.compile = _one_clean_graph


class KVCache:
    def __init__(self, n_layer, batch, n_head, max_len, head_dim, dtype=torch.float32, device="cpu"):
        self.n_layer, self.batch, self.n_head, self.max_len, self.head_dim = n_layer, batch, n_head, max_len, head_dim
        self.k = torch.zeros(n_layer, batch, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch, max_len):
        c = model.config
        weight = model.transformer.wte.weight
        return cls(c.n_layer, batch, c.n_head, max_len, c.head_dim, weight.dtype, weight.device)

    def append(self, layer, k, v):
        return k, v

    def advance(self, t):
        self.length += t

    def reset(self):
        self.length = 0

    def nbytes(self):
        return 0


def forward_with_cache(model, idx, cache, positions=None, key_mask=None):
    cache.advance(idx.shape[1])
    return model(idx)  # the patched forward: zeros, like "the full model"


def decode_step(model, token, cache, slot):
    return model(token)
'''

# generate.py: tokens that agree with the zeros model (greedy: token 0) and with each other (a seeded
# generator), no model work at all; the uncached path is slow on purpose (the old speed baseline).
PATCH_GEN = '''
import time
import torch


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, use_cache=True, seed=None, cache=None):
    b, t = prompt_ids.shape
    if cache is not None:
        cache.reset()
        cache.advance(t + max_new_tokens - 1)
    if not use_cache:
        time.sleep(0.2 * max_new_tokens / 64)
    if temperature == 0 or top_k == 1 or temperature < 1e-3:
        new = torch.zeros(b, max_new_tokens, dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(seed or 0)
        new = torch.randint(0, model.config.vocab_size, (b, max_new_tokens), generator=g)
    return torch.cat([prompt_ids, new], dim=1)


def generate_batch(model, prompts, max_new_tokens, temperature=0.0, top_k=None, seed=None, pad_id=0):
    if temperature == 0:
        return [list(p) + [0] * max_new_tokens for p in prompts]
    g = torch.Generator().manual_seed(seed or 0)
    return [list(p) + torch.randint(0, model.config.vocab_size, (max_new_tokens,), generator=g).tolist() for p in prompts]
'''

# Appended to a slow but honest generate.py: two CPU burners, each in its own session, that burn only
# while none of the learner's calls is running (they watch a flag file the wrapped generate writes),
# i.e. while the grader runs its own baseline.
BURNERS = '''
import os
import time

_FLAG = "/tmp/.in_a_learner_call"


def _burn():
    os.setsid()
    stop = time.monotonic() + 300
    while time.monotonic() < stop:
        if os.path.exists(_FLAG):
            time.sleep(0.0005)
        else:
            start = time.monotonic()
            while time.monotonic() - start < 0.01:
                pass


if not os.environ.get("_UNIT4_BURNERS"):
    os.environ["_UNIT4_BURNERS"] = "1"
    for _ in range(2):
        if os.fork() == 0:
            try:
                _burn()
            finally:
                os._exit(0)

_honest_generate = generate


def generate(*args, **kwargs):
    open(_FLAG, "w").close()
    try:
        return _honest_generate(*args, **kwargs)
    finally:
        os.remove(_FLAG)
'''


def submission(tmp_path: Path, kvcache: str | None = None, generate: str | None = None, mutant: str | None = None) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    if mutant:
        from tests.course_checks import apply_mutant

        mutants = {m["name"]: m for m in yaml.safe_load((REPO_ROOT / "tests" / "mutants" / "unit4.yml").read_text())}
        apply_mutant(root, "unit4", mutants[mutant])
    if kvcache is not None:
        (root / "unit4" / "kvcache.py").write_text(kvcache)
    if generate is not None:
        (root / "unit4" / "generate.py").write_text(generate)
    return root


def group_points(unit) -> dict[str, float]:
    return {g.id: g.score for g in unit.groups}


def passed(unit) -> list[str]:
    return [t.name for t in unit.tests if t.status == "passed"]


def test_patched_model_and_harness_earn_what_the_stub_earns(tmp_path):
    """Stubs plus every worker-side patch the old tests would have believed: 0 points, as the stub."""
    root = submission(tmp_path, STUB_KV + PATCH_KV, STUB_GEN + PATCH_GEN)
    report = grade(COURSE, root, ["unit4"])
    unit = report.units[0]
    assert unit.error is None, unit.error
    assert report.isolation in ("bwrap", "user"), report.isolation_note
    assert unit.score == 0, f"{group_points(unit)}; passed: {passed(unit)}"


def _speed(unit):
    return next(g for g in unit.groups if g.id == "speed")


def _speed_failures(unit) -> str:
    return "\n".join(f"{t.name}: {t.status}: {t.output}" for t in unit.tests
                     if t.group == "speed" and t.status not in ("passed", NOT_GRADED))


def test_slow_cache_with_cpu_burners_fails_the_speed_group(tmp_path):
    """No cache (every step re-runs the whole sequence: right tokens, no speed-up), plus CPU burners
    that run only while the grader times its baseline: the speed group still scores 0."""
    root = submission(tmp_path, mutant="cache_never_used")
    (root / "unit4" / "generate.py").write_text((root / "unit4" / "generate.py").read_text() + BURNERS)
    unit = grade(COURSE, root, ["unit4"], extra_args=["-k", "speed or faster"]).units[0]
    assert unit.error is None, unit.error
    speed = _speed(unit)
    assert speed.max_score > 0 and speed.score == 0, [t.name for t in unit.tests if t.group == "speed" and t.status == "passed"]


def _burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(10)


def test_speed_group_under_outside_load(tmp_path):
    """Two CPU burners outside the grader: the solutions keep full speed marks (CPU time, not wall
    clock), and the slow mistake (no cache) still scores 0 there."""
    good = submission(tmp_path / "good")
    slow = submission(tmp_path / "slow", mutant="cache_never_used")
    load = _burners(2)
    try:
        good_unit = grade(COURSE, good, ["unit4"], extra_args=["-k", "speed or faster"]).units[0]
        # The hidden speed test alone for the slow one (its every call is slow; the visible one fails
        # the same way in the burners test above).
        slow_unit = grade(COURSE, slow, ["unit4"], extra_args=["-k", "speed_and_flat"]).units[0]
    finally:
        _stop(load)
    for unit in (good_unit, slow_unit):
        assert unit.error is None, unit.error
    speed = _speed(good_unit)
    assert speed.max_score > 0 and speed.score == pytest.approx(speed.max_score), _speed_failures(good_unit)
    assert _speed(slow_unit).score == 0, passed(slow_unit)
