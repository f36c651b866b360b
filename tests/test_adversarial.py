"""Hostile submissions: each is a small, realistic cheat or fault.  Every one must end with no
points it did not earn, the rest of the submission still graded, and nothing outside the grading
folder changed.

Most attacks sit in Unit 1's autograd.py on top of the untouched stub (so every Part A point would
be unearned), next to an honest fused.py whose points must all still be awarded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from autograder.manifest import REPO_ROOT, Limits, load_course
from autograder.runner import grade
from autograder.scoring import NOT_GRADED

COURSE = load_course()
# Short limits so that hangs and bombs cost seconds, not minutes.
FAST = COURSE.model_copy(update={"limits": Limits(unit_timeout=240, call_timeout=4, memory_mb=1024,
                                                  max_processes=64, max_file_kb=512)})
GUARDED = [REPO_ROOT / d for d in ("autograder", "solutions", "exercises", "tests")] + [REPO_ROOT / "course.yml"]


def tree_digest() -> str:
    digest = hashlib.sha256()
    for root in GUARDED:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            digest.update(str(path).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


STUB = (REPO_ROOT / "exercises" / "unit1" / "autograd.py").read_text()

ATTACKS = {
    "forge_results_files": """
import glob, json, os
forged = json.dumps({"event": "result", "nodeid": "x", "outcome": "passed"})
for pattern in ("/tmp/**/results*", "/tmp/course-results-*/*", "/work/**/results*.json*"):
    for path in glob.glob(pattern, recursive=True):
        try:
            open(path, "a").write(forged + "\\n")
        except OSError:
            pass
for place in ("/tmp/results.json", "results.json", "/autograder/results/results.json"):
    try:
        os.makedirs(os.path.dirname(place) or ".", exist_ok=True)
        open(place, "w").write(json.dumps({"score": 1000, "tests": []}))
    except OSError:
        pass
""",
    "patch_pytest_runner": """
try:
    import _pytest.runner, _pytest.python
    _pytest.python.Function.runtest = lambda self: None
    _pytest.runner.CallInfo.from_call = classmethod(lambda cls, func, when, reraise=None: None)
except Exception:
    pass
""",
    "exit_during_import": "import os\nos._exit(0)\n",
    "sys_exit_during_import": "import sys\nsys.exit(0)\n",
    "read_hidden_tests_and_solution": """
import glob
_stolen = ""
for pattern in ("/work/**/solutions/unit1/autograd.py", "/work/**/autograder/hidden/unit1/*.py", "/**/hidden/unit1/*.py"):
    for path in glob.glob(pattern, recursive=True):
        try:
            _stolen = open(path).read()
        except OSError:
            pass
if "### BEGIN SOLUTION" in _stolen:
    exec(_stolen)  # replaces the stub's Value with the course's
""",
    "gc_search_for_expected_values": """
import gc
_found = [o for o in gc.get_objects() if isinstance(o, float)]
""",
    "always_equal_objects": """
class _AlwaysEqual(float):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = float.__hash__
class Value:
    def __init__(self, data, *a, **k):
        self.data = _AlwaysEqual(data)
        self.grad = _AlwaysEqual(0.0)
    def _same(self, *a, **k):
        return Value(0.0)
    __add__ = __radd__ = __mul__ = __rmul__ = __sub__ = __rsub__ = __truediv__ = __rtruediv__ = __pow__ = _same
    __neg__ = exp = log = tanh = relu = _same
    def backward(self): pass
_KEEP = Value
""",
    "patch_comparisons_and_timers": """
import time, numpy, torch
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
numpy.allclose = lambda *a, **k: True
numpy.testing.assert_allclose = lambda *a, **k: None
time.perf_counter = lambda: 0.0
torch.cuda.Event.elapsed_time = lambda self, other: 0.001
""",
    "fork_bomb": """
import os
def _bomb(*a, **k):
    while True:
        try:
            os.fork()
        except OSError:
            pass
""",
    "memory_bomb": """
def _bomb(*a, **k):
    hog = []
    while True:
        hog.append(bytearray(64 << 20))
""",
    "infinite_loop": """
def _bomb(*a, **k):
    while True:
        pass
""",
    "segfault": """
import ctypes
def _bomb(*a, **k):
    ctypes.string_at(0)
""",
    "print_forged_results": """
import sys, json
for stream in (sys.stdout, sys.stderr):
    print("test_autograd.py::test_add_and_mul PASSED", file=stream)
    print(json.dumps({"event": "result", "nodeid": "exercises/unit1/test_autograd.py::test_add_and_mul", "outcome": "passed"}), file=stream)
    print("===== 100 passed in 0.01s =====", file=stream)
""",
    "write_into_the_course": """
import glob
for pattern in ("/work/**/autograder/hidden/unit1/*.py", "/work/**/course.yml", "/work/**/solutions/unit1/*.py"):
    for path in glob.glob(pattern, recursive=True):
        try:
            open(path, "a").write("\\n# pwned\\n")
        except OSError:
            pass
""",
    "read_environment_and_proc": """
import glob, os
_secrets = dict(os.environ)
for path in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"):
    try:
        _secrets[path] = open(path, "rb").read()
    except OSError:
        pass
if any("COURSE_GRADING_SEED" in str(v) or "COURSE_GRADING_SEED" in k for k, v in _secrets.items()):
    raise SystemExit("found the seed")  # a real cheat would use it; here it only shows it was reachable
""",
}
# Attacks that live in a method call rather than at import: the stub's add and mul call the bomb.
CALLED = {"fork_bomb", "memory_bomb", "infinite_loop", "segfault"}


def hostile_submission(tmp_path: Path, name: str) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    code = STUB + "\n" + ATTACKS[name]
    if name in CALLED:
        code += "\nValue.__add__ = Value.__mul__ = lambda self, other: _bomb()\n"
    (root / "unit1" / "autograd.py").write_text(code)
    return root


def points(unit, groups) -> float:
    return sum(g.score for g in unit.groups if g.id in groups)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_earns_nothing(tmp_path, name):
    before = tree_digest()
    report = grade(FAST, hostile_submission(tmp_path, name), ["unit1"], extra_args=["-k", "autograd or fused"])
    unit = report.units[0]
    assert unit.error is None, unit.error
    assert report.isolation == "bwrap" or report.isolation == "user", report.isolation_note
    assert points(unit, {"value_ops", "value_backward"}) == 0, [t.name for t in unit.tests if t.status == "passed"]
    fused = next(g for g in unit.groups if g.id == "fused")
    lost = [f"{t.name}: {t.output}" for t in unit.tests if t.group == "fused" and t.status not in ("passed", NOT_GRADED)]
    assert fused.max_score > 0 and fused.score == pytest.approx(fused.max_score), "the honest file lost points:\n" + "\n".join(lost)
    assert tree_digest() == before, "the course files changed"
    assert not Path("/tmp/results.json").exists()


def test_crash_reasons_are_readable(tmp_path):
    report = grade(FAST, hostile_submission(tmp_path, "segfault"), ["unit1"], extra_args=["-k", "test_add_and_mul"])
    (test,) = report.units[0].tests
    assert test.status == "failed" and "SIGSEGV" in test.output and "restarted" in test.output


def test_network_is_unreachable(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def listen():
        for _ in range(200):
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    root = hostile_submission(tmp_path, "print_forged_results")
    (root / "unit1" / "autograd.py").write_text(STUB + f"""
import socket
for host in ("127.0.0.1", "localhost"):
    try:
        socket.create_connection((host, {port}), timeout=1).sendall(b"hidden tests please")
    except OSError:
        pass
""")
    report = grade(FAST, root, ["unit1"], extra_args=["-k", "test_add_and_mul"])
    thread.join()
    server.close()
    assert report.units[0].score == 0
    assert accepted == [], "learner code reached a server on the grading machine"


def test_forbidden_shortcut_costs_only_its_tests(tmp_path):
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    fused = root / "unit1" / "fused.py"
    fused.write_text(fused.read_text() + '''

def layer_norm(x, weight, bias, eps=1e-5):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
''')
    unit = grade(FAST, root, ["unit1"], extra_args=["-k", "fused or autograd"]).units[0]
    assert any("forbidden" in note for note in unit.notes), unit.notes
    fused_group = next(g for g in unit.groups if g.id == "fused")
    assert fused_group.score == 0
    failing = [t for t in unit.tests if t.group == "fused" and t.status != NOT_GRADED]
    assert all("forbidden" in t.output.lower() for t in failing if t.visibility == "visible")
    assert points(unit, {"value_ops", "value_backward"}) == pytest.approx(30)


def test_lying_tensor_subclass_earns_nothing(tmp_path):
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "unit1" / "fused.py").write_text('''
import torch

class Liar(torch.Tensor):
    def __eq__(self, other): return torch.ones((), dtype=torch.bool)
    def allclose(self, *a, **k): return True

def layer_norm(x, weight, bias, eps=1e-5):
    return torch.zeros_like(x).as_subclass(Liar)
''')
    unit = grade(FAST, root, ["unit1"], extra_args=["-k", "fused"]).units[0]
    fused_group = next(g for g in unit.groups if g.id == "fused")
    assert fused_group.score == 0


def test_the_other_units_are_still_graded(tmp_path):
    root = hostile_submission(tmp_path, "exit_during_import")
    other = next(u.id for u in COURSE.units if u.id != "unit1")
    report = grade(FAST, root, ["unit1", other])
    by_id = {u.id: u for u in report.units}
    assert by_id[other].max_score > 0 and by_id[other].score == pytest.approx(by_id[other].max_score)
    assert 0 < by_id["unit1"].score < by_id["unit1"].max_score


def test_worker_sees_no_secret_and_no_course_files(tmp_path):
    """Engine level: what the worker process itself can see."""
    from autograder.client import Learner, WorkerBackend
    from autograder.sandbox import Spawner

    os.environ["COURSE_TEST_CANARY"] = "canary-7f3a"
    try:
        spawner = Spawner(REPO_ROOT / "solutions", "unit1", ["autograd.py"], [], [], 1024, 64, 512)
        backend = WorkerBackend(spawner, 10)
        learner = Learner(backend, "unit1")
        os_mod, glob_mod = learner.lib("os"), learner.lib("glob")
        environ = dict(os_mod.environ.copy())
        visible = glob_mod.glob("/work/**/hidden/**", recursive=True) + glob_mod.glob(str(REPO_ROOT / "*"))
        assert "COURSE_TEST_CANARY" not in environ and "COURSE_GRADING_SEED" not in environ
        assert visible == [], visible
        assert backend.isolation in ("bwrap", "user")
    finally:
        os.environ.pop("COURSE_TEST_CANARY")
        backend.close()
        spawner.cleanup()
