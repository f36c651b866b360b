"""Hostile submissions for Unit 1.

Each one is the untouched stub of a learner file (no honest work) plus an attack that patches, at
import, something the unit's tests once trusted on the learner's side: the data generator and the
training wiring that ship in layers.py, MLP.predict, numpy's default_rng, and the harness helpers
that run the learner's autograd.Function.  Each must earn exactly what the plain stub earns: 0 in
the groups it goes after.  The last two are honest-looking work with one lie: a correct LayerNorm
written as plain autograd operations, with the in-process count of saved tensors faked; only the
two tests of what layer_norm saves may fail, and they must (the memory, read from outside, says).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from autograder.course_code import reference_module
from autograder.manifest import REPO_ROOT, Limits, load_course
from autograder.runner import grade
from autograder.scoring import NOT_GRADED

COURSE = load_course()
FAST = COURSE.model_copy(update={"limits": Limits(unit_timeout=240, call_timeout=60, memory_mb=2048,
                                                  max_processes=64, max_file_kb=512)})
STUB = {name: (REPO_ROOT / "exercises" / "unit1" / name).read_text() for name in ("layers.py", "fused.py")}

SPIRALS_AND_PREDICT = """
import numpy as _np

_real_rng = _np.random.default_rng
_np.random.default_rng = lambda seed=None: _real_rng(0)  # every "secret" seed is 0


def make_spirals(n_per_class, n_classes, rng, noise=0.2):
    labels = _np.repeat(_np.arange(n_classes), n_per_class)
    return _np.stack([labels, -labels], axis=1).astype(float), labels  # one point per class


class _Memorised:
    def __init__(self, x, y):
        self.seen = {tuple(p): int(c) for p, c in zip(_np.asarray(x), _np.asarray(y))}

    def predict(self, x):
        return _np.array([self.seen.get(tuple(p), 0) for p in _np.asarray(x)])


def fit_spirals(x, y, seed=0, epochs=300):
    return _Memorised(x, y)


def train(model, optimizer, x, y, epochs, batch_size, rng):
    model._labels = _np.asarray(y)
    return [1.0 / (1 + i) for i in range(epochs)]  # a loss that falls, every epoch


MLP.predict = lambda self, x: getattr(self, "_labels", _np.zeros(len(x), dtype=int))
"""

PRETRAINED = """
import numpy as _np

_PRETRAINED = __PRETRAINED__  # weights fitted beforehand to spirals as make_spirals draws them
_init = MLP.__init__


def _pretrained_init(self, sizes, rng, activation="relu", layernorm=False):
    _init(self, sizes, rng, activation, layernorm)
    for layer, (W, b) in zip([l for l in self.layers if l.params], _PRETRAINED.get(str(list(sizes)), [])):
        layer.params = {"W": _np.array(W), "b": _np.array(b)}


def _forward(self, x):
    linear = [l for l in self.layers if l.params]
    for i, layer in enumerate(linear):
        x = x @ layer.params["W"] + layer.params["b"]
        x = _np.maximum(x, 0) if i < len(linear) - 1 else x
    return x


def train(model, optimizer, x, y, epochs, batch_size, rng):
    return [1.0 / (1 + i) for i in range(epochs)]


MLP.__init__ = _pretrained_init
MLP.forward = _forward
MLP.predict = lambda self, x: _forward(self, x).argmax(axis=1)
"""

# The harness helpers that run a learner's autograd.Function in the worker, rewritten in place (the
# tests look them up in a table made before learner code runs, so the functions' code is swapped):
# a constant forward with zero gradients agrees with itself under gradcheck, and "saves" one number.
HARNESS_CONSTANT = """
import torch
import autograder.worker.harness as _harness


def _constant_forward(fn, args, grad_mask):
    return torch.zeros_like(args[0]), len(args), [(1,)]


def _zero_backward(record, grad_output):
    return [None] * record


_harness.autograd_forward.__code__ = _constant_forward.__code__
_harness.autograd_backward.__code__ = _zero_backward.__code__
"""

# A correct LayerNorm in plain autograd operations (so every value test passes), and the count of
# saved tensors faked to look like xhat alone.
PLAIN_AUTOGRAD_LYING = """
import autograder.worker.harness as _harness


def layer_norm(x, weight, bias, eps=1e-5):
    compute = torch.promote_types(x.dtype, torch.float32)  # float32 for bf16, as the handout asks
    xf = x.to(compute)
    xc = xf - xf.mean(dim=-1, keepdim=True)
    y = xc * torch.rsqrt((xc * xc).mean(dim=-1, keepdim=True) + eps) * weight.to(compute) + bias.to(compute)
    return y.to(x.dtype)


def _lying_forward(fn, args, grad_mask):
    inputs = [_leaf(a, m) for a, m in zip(args, grad_mask)]
    with torch.enable_grad():
        output = fn(*inputs)
    return output.detach(), AutogradRecord(output, inputs), [tuple(inputs[0].shape)]


_harness.autograd_forward.__code__ = _lying_forward.__code__
"""

# The same, and the measurement's tools on the learner's side undone as well: the allocator keeps
# freed memory on its heap (mallopt does nothing) and large buffers of ones are not allocated.
PLAIN_AUTOGRAD_LYING_AND_NO_PROBES = PLAIN_AUTOGRAD_LYING + """
import ctypes
import torch as _torch

_lookup = ctypes.CDLL.__getattr__
ctypes.CDLL.__getattr__ = lambda self, name: (lambda *a: 1) if name == "mallopt" else _lookup(self, name)
_ones = _torch.ones


def _no_big_buffers(*size, **kw):
    return _ones(1, **kw) if size and isinstance(size[0], int) and size[0] > 1 << 20 else _ones(*size, **kw)


_torch.ones = _no_big_buffers
"""

# The same, holding 7 MiB from import on and letting it go at the first large forward, to hide
# it in that forward's figure.
PLAIN_AUTOGRAD_LYING_AND_HIDING = PLAIN_AUTOGRAD_LYING + """
_held = [b"\\x01" * (7 << 20)]
_plain = layer_norm


def layer_norm(x, weight, bias, eps=1e-5):
    if x.numel() > 1 << 16:
        _held.clear()
    return _plain(x, weight, bias, eps)
"""

# The same with ballast enough for every forward: 48 MiB held from import on, 12 MiB of it let go
# in each large forward (what plain autograd keeps beyond the limit, and more).
PLAIN_AUTOGRAD_LYING_AND_BALLAST = PLAIN_AUTOGRAD_LYING + """
_ballast = [bytearray(b"\\x01" * (12 << 20)) for _ in range(4)]
_plain = layer_norm


def layer_norm(x, weight, bias, eps=1e-5):
    if x.numel() > 1 << 16 and _ballast:
        _ballast.pop()
    return _plain(x, weight, bias, eps)
"""

# The same, and the caller's input freed (its storage resized to nothing) once the forward is
# done: plain autograd does not need x itself for backward, so the forward's figure drops by the
# one full-size tensor it keeps too many.
PLAIN_AUTOGRAD_LYING_AND_FREEING_THE_INPUT = PLAIN_AUTOGRAD_LYING + """
_plain = layer_norm


def layer_norm(x, weight, bias, eps=1e-5):
    y = _plain(x, weight, bias, eps)
    if x.numel() > 1 << 16:
        x.untyped_storage().resize_(0)
    return y
"""

# The same, with what autograd saves moved out of the heap into files in the private /tmp (tmpfs
# or disk pages, not anonymous memory) by saved_tensors_hooks, and read back for backward.
PLAIN_AUTOGRAD_LYING_AND_OFFLOADING = PLAIN_AUTOGRAD_LYING + """
import os as _os
import tempfile as _tempfile

_plain = layer_norm
_folder = _tempfile.mkdtemp()


def _pack(tensor):
    if tensor.numel() <= 1 << 16:
        return tensor
    path = _os.path.join(_folder, f"{id(tensor)}-{len(_os.listdir(_folder))}.pt")
    torch.save(tensor.detach().clone(), path)
    return path


def _unpack(packed):
    return torch.load(packed) if isinstance(packed, str) else packed


def layer_norm(x, weight, bias, eps=1e-5):
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        return _plain(x, weight, bias, eps)
"""


def _pretrained_weights() -> str:
    """The solution's training on spirals drawn the way make_spirals draws them (not turned, moved
    or relabelled), for both MLPs of the training tests."""
    layers = reference_module("unit1.layers")
    weights = {}
    x, y = layers.make_spirals(100, 3, np.random.default_rng(0))
    model = layers.fit_spirals(x, y, 0)
    weights[str([2, 64, 64, 3])] = [(np.round(layer.params["W"], 5).tolist(), np.round(layer.params["b"], 5).tolist())
                                   for layer in model.layers if layer.params]
    x, y = layers.make_spirals(50, 2, np.random.default_rng(0))
    model = layers.MLP([2, 32, 2], np.random.default_rng(1))
    layers.train(model, layers.Adam(model.layers, 1e-2), x, y, 300, 25, np.random.default_rng(2))
    weights[str([2, 32, 2])] = [(np.round(layer.params["W"], 5).tolist(), np.round(layer.params["b"], 5).tolist())
                               for layer in model.layers if layer.params]
    return repr(weights)


def _submission(tmp_path: Path, file: str, attack: str) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "unit1" / file).write_text(STUB[file] + "\n" + attack)
    return root


def _groups(unit) -> dict[str, float]:
    return {g.id: g.score for g in unit.groups}


def _passed(unit, group: str) -> list[str]:
    return [t.name for t in unit.tests if t.group == group and t.status == "passed"]


@pytest.mark.parametrize("name, attack", [("spirals_and_predict", SPIRALS_AND_PREDICT), ("pretrained", PRETRAINED)])
def test_layers_attack_earns_what_the_stub_earns(tmp_path, name, attack):
    """Data from make_spirals, a memorising predict, a fake loss history, a fixed default_rng, or
    weights fitted beforehand: the training tests make their spirals here, run fit_spirals' wiring
    here and judge the weights train() leaves, on the trusted side."""
    if name == "pretrained":
        attack = attack.replace("__PRETRAINED__", _pretrained_weights())
    unit = grade(FAST, _submission(tmp_path, "layers.py", attack), ["unit1"], extra_args=["-k", "layers"]).units[0]
    assert unit.error is None, unit.error
    for group in ("layers", "loss", "training"):
        assert _groups(unit)[group] == 0, (group, _passed(unit, group))


def test_harness_that_agrees_with_itself_earns_nothing(tmp_path):
    """A constant forward with zero gradients passes gradcheck (both sides run in the worker) and a
    faked saved-tensor count passes the in-process figure: the tests compare with torch here and
    measure the memory from outside."""
    root = _submission(tmp_path, "fused.py", HARNESS_CONSTANT)
    unit = grade(FAST, root, ["unit1"], extra_args=["-k", "fused"]).units[0]
    assert unit.error is None, unit.error
    assert _groups(unit)["fused"] == 0, _passed(unit, "fused")


@pytest.mark.parametrize("attack", [PLAIN_AUTOGRAD_LYING, PLAIN_AUTOGRAD_LYING_AND_NO_PROBES,
                                    PLAIN_AUTOGRAD_LYING_AND_HIDING, PLAIN_AUTOGRAD_LYING_AND_BALLAST,
                                    PLAIN_AUTOGRAD_LYING_AND_FREEING_THE_INPUT, PLAIN_AUTOGRAD_LYING_AND_OFFLOADING],
                         ids=["faked_count", "faked_count_and_no_probes", "faked_count_and_hidden_memory",
                              "faked_count_and_ballast", "faked_count_and_freed_input", "faked_count_and_offloading"])
def test_faked_saved_count_fails_the_memory_tests(tmp_path, attack):
    """Plain autograd ops are a correct LayerNorm (every value test passes), but keep a full-size
    tensor more a forward than xhat: with the in-process count faked, the memory measured outside
    the worker still fails both tests of what layer_norm saves."""
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    fused = root / "unit1" / "fused.py"
    fused.write_text(fused.read_text() + "\n" + attack)
    unit = grade(FAST, root, ["unit1"], extra_args=["-k", "fused and not gpu"]).units[0]
    assert unit.error is None, unit.error
    saves = {t.name: t for t in unit.tests if "saves" in t.name}
    assert len(saves) == 2 and all(t.status == "failed" for t in saves.values()), \
        {n: (t.status, t.output[:300]) for n, t in saves.items()}
    others = [t for t in unit.tests if t.group == "fused" and "saves" not in t.name and t.status != NOT_GRADED]
    assert others and all(t.status == "passed" for t in others), [(t.name, t.output[:200]) for t in others]
