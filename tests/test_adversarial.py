"""Hostile submissions: each is a small, realistic cheat or fault.  Every one must end with no
points it did not earn, the rest of the submission still graded, and nothing outside the grading
folder changed.

Most attacks sit in Unit 1's autograd.py on top of the untouched stub (so every Part A point would
be unearned), next to an honest fused.py whose points must all still be awarded.  The end of this
file tests the sandbox's own promises (caps, host files, symlinks, residue, reports).  The attacks on
the trust boundary, unit by unit (a patched course module, reference or harness helper, CPU burners
during a timed test), are in tests/test_adversarial_unitN.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
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


# --- The sandbox's promises (issue 15): caps that hold, no host files, no symlinks, no residue ---------

def _worker(unit_id: str = "unit1", memory_mb: int = 1024, level: str = "auto", root: Path | None = None):
    from autograder.client import Learner, WorkerBackend
    from autograder.sandbox import Spawner

    unit = COURSE.unit(unit_id)
    spawner = Spawner(root or REPO_ROOT / "solutions", unit.dir, unit.files, unit.provided,
                      [f.model_dump() for f in COURSE.forbidden_for(unit)], memory_mb, 64, 512, level)
    backend = WorkerBackend(spawner, 30)
    return Learner(backend, unit.dir), backend, spawner


def test_memory_cap_stops_the_worker_at_the_cap():
    """The worker is in its cgroup from its first instruction: touching more than memory_mb stops it
    there (it once reached 4 GiB under a 3072 MB cap)."""
    from autograder.client import WorkerDied

    learner, backend, spawner = _worker(memory_mb=512)
    try:
        learner.lib("builtins").len([1])  # start it
        assert backend.worker.cgroup is not None or os.geteuid() != 0, "running as root, the worker must have a cgroup"
        if backend.worker.cgroup is None:
            pytest.skip("not root: no cgroup can be made here, so the cap is the /proc watchdog's")
        assert os.getpid() not in backend.worker.cgroup.pids()
        assert set(backend.worker.cgroup.pids()) >= {backend.worker.process.pid}
        with pytest.raises(WorkerDied) as died:
            learner.lib("builtins").bytearray(2 << 30)
        message = str(died.value)
        assert "more than 512 MB" in message, message
        reached = int(message.split("stopped at ")[1].split(" MB")[0])
        print(f"worker peak under a 512 MB cap: {reached} MB")
        assert reached <= 512
    finally:
        backend.close()
        spawner.cleanup()


def test_root_only_files_of_the_host_are_not_visible(tmp_path):
    canary = Path("/etc") / f"course-canary-{os.getpid()}"
    made = False
    if os.geteuid() == 0:
        canary.write_text("course-canary-secret\n")
        canary.chmod(0o600)
        made = True
    learner, backend, spawner = _worker()
    try:
        opener = learner.lib("builtins").open
        for path in ("/etc/shadow", "/etc/gshadow", "/etc/ssh/ssh_host_ed25519_key", str(canary), "/root/.bashrc"):
            if backend.isolation == "bwrap" or Path(path).exists():
                with pytest.raises(Exception) as refused:
                    opener(path).read()
                assert "Error" in str(refused.value), path
        if backend.isolation == "bwrap":
            assert sorted(learner.lib("os").listdir("/etc")) == sorted(
                ["alternatives", "group", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "passwd"]
                if Path("/etc/nsswitch.conf").exists() else
                ["alternatives", "group", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd"])
    finally:
        backend.close()
        spawner.cleanup()
        if made:
            canary.unlink()


def test_a_host_secret_never_reaches_the_report(tmp_path):
    if not Path("/etc/shadow").exists() or os.geteuid() != 0:
        pytest.skip("no /etc/shadow readable here to try")
    first_line = Path("/etc/shadow").read_text().splitlines()[0]
    root = hostile_submission(tmp_path, "print_forged_results")
    (root / "unit1" / "autograd.py").write_text(STUB + """
try:
    _secret = open("/etc/shadow").read()
except OSError as exc:
    _secret = f"unreadable: {exc}"
Value.__init__ = lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError(_secret))
""")
    report = grade(FAST, root, ["unit1"], extra_args=["-k", "test_add_and_mul or test_value_ops"])
    assert first_line not in json.dumps(report.to_json())


def test_a_symlinked_unit_folder_is_refused(tmp_path):
    root = tmp_path / "submission"
    root.mkdir()
    (root / "unit1").symlink_to(REPO_ROOT / "solutions" / "unit1")
    unit = grade(FAST, root, ["unit1"], extra_args=["-k", "test_autograd"]).units[0]
    assert unit.score == 0
    assert any("unit1: a symbolic link" in note for note in unit.notes), unit.notes


def test_grade_all_refuses_a_clone_whose_exercises_folder_is_a_symlink(tmp_path):
    from autograder.batch import grade_all

    folder = tmp_path / "clones"
    (folder / "mallory").mkdir(parents=True)
    (folder / "mallory" / "exercises").symlink_to(REPO_ROOT / "solutions")
    outcomes = grade_all(FAST, folder, tmp_path / "state", units=["unit1"], jobs=1)
    (outcome,) = outcomes
    assert outcome.report["score"] == 0 and "symbolic link" in outcome.report["refused"]


def test_learner_text_cannot_drive_the_terminal(tmp_path):
    import io

    from rich.console import Console

    from autograder.reporters import gradescope_results, print_unit

    forged = "\\x1b[2K\\x1b[1A\\x1b[8m\\x1b]0;x\\x07\\r\\u202eGrade 90 / 90"
    root = hostile_submission(tmp_path, "print_forged_results")
    (root / "unit1" / "autograd.py").write_text(STUB + f"""
def _forge(self, *a, **k):
    raise RuntimeError("{forged}" * 3)
Value.__init__ = _forge
""")
    report = grade(FAST, root, ["unit1"], extra_args=["-k", "test_add_and_mul"])
    unit = report.units[0]
    assert unit.tests and all("\x1b" not in t.output and "\r" not in t.output and "\u202e" not in t.output
                              for t in unit.tests)
    assert any("Grade 90 / 90" in t.output for t in unit.tests)  # the text stays, its control goes
    screen = io.StringIO()
    print_unit(Console(file=screen, force_terminal=True, width=120), unit)
    for sequence in ("\x1b[2K", "\x1b[1A", "\x1b[8m", "\x1b]0;"):
        assert sequence not in screen.getvalue()
    assert "\x1b" not in json.dumps(gradescope_results(report, COURSE), ensure_ascii=False)


def test_nothing_is_left_after_a_unit_runs_out_of_time(tmp_path, monkeypatch):
    """The unit's trusted pytest is SIGKILLed at its time limit while the worker has started a
    process of its own in a new session: afterwards no process, no folder, no cgroup remains."""
    import tempfile

    import autograder.runner as runner

    marker = f"{os.getpid() % 1000}.{len(str(tmp_path)) % 97}25"
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    seen_cgroups: list[Path] = []
    real_cleanup = runner.cleanup_work_dir

    def recording_cleanup(work):
        registry = Path(work) / "registry.txt"
        if registry.exists():
            seen_cgroups.extend(Path(l.split(" ", 1)[1]) for l in registry.read_text().splitlines() if l.startswith("cgroup "))
        real_cleanup(work)

    monkeypatch.setattr(runner, "cleanup_work_dir", recording_cleanup)
    root = hostile_submission(tmp_path, "print_forged_results")
    (root / "unit1" / "autograd.py").write_text(STUB + f"""
import os, time
if os.fork() == 0:
    os.setsid()
    os.execv("/bin/sleep", ["sleep", "{marker}"])
with open("/tmp/filler", "wb") as _f:
    _f.write(b"x" * (8 << 20))
_orig_init = Value.__init__
def _slow(self, *a, **k):
    time.sleep(0.5)
    _orig_init(self, *a, **k)
Value.__init__ = _slow
""")
    short = FAST.model_copy(update={"limits": FAST.limits.model_copy(update={"unit_timeout": 15})})
    unit = grade(short, root, ["unit1"], extra_args=["-k", "autograd"]).units[0]
    assert any("ran past 15 s" in note for note in unit.notes), unit.notes
    time.sleep(0.5)
    sleepers = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                sleepers.append(entry.name)
        except OSError:
            continue
    assert sleepers == [], "a process the learner started outlived the unit"
    assert list(private_tmp.iterdir()) == [], list(private_tmp.iterdir())
    assert seen_cgroups or os.geteuid() != 0
    assert not [p for p in seen_cgroups if p.exists()], seen_cgroups


FORBIDDEN_ROUTES = {
    "aten_packet": "torch.ops.aten.layer_norm(x, (x.shape[-1],), weight, bias, eps)",
    "aten_overload": "torch.ops.aten.native_layer_norm.default(x, (x.shape[-1],), weight, bias, eps)[0]",
    "variable_functions": "torch._C._VariableFunctions.layer_norm(x, (x.shape[-1],), weight, bias, eps, False)",
    "wrapped_original": "torch.nn.functional.layer_norm.__wrapped__(x, (x.shape[-1],), weight, bias, eps)",
    "forged_file_name": ("_ns = {}; exec(compile('import torch\\ndef f(x, w, b, e): return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, e)', "
                         "torch.__file__, 'exec'), _ns); _ns['f'](x, weight, bias, eps)"),
}


@pytest.mark.parametrize("route", sorted(FORBIDDEN_ROUTES))
def test_forbidden_functions_are_guarded_at_every_alias(tmp_path, route):
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    fused = root / "unit1" / "fused.py"
    fused.write_text(fused.read_text() + f'''

def layer_norm(x, weight, bias, eps=1e-5):
    return {FORBIDDEN_ROUTES[route]}
''')
    unit = grade(FAST, root, ["unit1"], extra_args=["-k", "test_fused and not gpu"]).units[0]
    fused_group = next(g for g in unit.groups if g.id == "fused")
    assert fused_group.total and fused_group.score == 0, [(t.name, t.status, t.output[:200]) for t in unit.tests]


@pytest.mark.parametrize("level", ["bwrap", "none"])
def test_a_forbidden_package_cannot_be_imported_by_any_route(level):
    from autograder.sandbox import probe_level

    if level == "bwrap" and probe_level("auto")[0] != "bwrap":
        pytest.skip("bubblewrap is not usable here")
    learner, backend, spawner = _worker("unit3", level=level)
    try:
        evaluate = learner.lib("builtins").eval
        for route in ("__import__('tiktoken')", "__import__('importlib').import_module('tokenizers')"):
            with pytest.raises(Exception) as refused:
                evaluate(route)
            assert "not available in this unit" in str(refused.value) or "forbidden" in str(refused.value), route
        if level == "bwrap":  # absent at the mount level: even the file the spec names is the stub
            spec = learner.lib("importlib.util").find_spec("tiktoken")
            assert "not available in this unit" in learner.lib("pathlib").Path(spec.origin).read_text()
    finally:
        backend.close()
        spawner.cleanup()


def test_probe_level_never_raises_and_falls_back(monkeypatch):
    from autograder import sandbox

    sandbox.probe_level.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)

    def no_python(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0][0])

    monkeypatch.setattr(sandbox.subprocess, "run", no_python)
    try:
        level, why = sandbox.probe_level("auto")
        assert level == "none" and "bubblewrap is not installed" in why
        if os.geteuid() == 0:
            assert "cannot run this Python" in why and "Permission denied" in why
    finally:
        sandbox.probe_level.cache_clear()


def test_grading_works_without_bubblewrap(tmp_path, monkeypatch):
    from autograder import sandbox

    sandbox.probe_level.cache_clear()
    real_which = shutil.which  # sandbox.shutil is this same module: the patch must not call itself
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    try:
        report = grade(FAST, REPO_ROOT / "solutions", ["unit1"], extra_args=["-k", "test_autograd"])
    finally:
        sandbox.probe_level.cache_clear()
    assert report.isolation in ("user", "none"), report.isolation
    unit = report.units[0]
    assert unit.error is None and unit.tests and all(t.status == "passed" for t in unit.tests), unit.tests


def test_no_hypothesis_database_is_shared_between_submissions(tmp_path, monkeypatch):
    # The storage folder a grader would otherwise share (the course's .hypothesis, or one named by the
    # environment); other tests running next to this one may write to the course's own.
    shared = tmp_path / "shared-hypothesis"
    monkeypatch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", str(shared))
    wrong = hostile_submission(tmp_path, "print_forged_results")  # the stub: every property fails
    grade(FAST, wrong, ["unit1"], extra_args=["-k", "random"])
    written = sorted(p.relative_to(shared) for p in shared.rglob("*")) if shared.exists() else []
    assert written == [], f"grading wrote to a shared Hypothesis folder: {written[:5]}"
    from autograder.plugin import _hypothesis_for_grading
    from hypothesis import settings

    current = settings._current_profile
    try:
        _hypothesis_for_grading("some-seed")
        assert settings.default.database is None
    finally:
        settings.load_profile(current)


def test_a_patched_harness_helper_is_not_the_one_called(tmp_path):
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "unit1" / "autograd.py").write_text((root / "unit1" / "autograd.py").read_text() + """
import autograder.worker.harness as _h
_h.drain = lambda *a, **k: (42, 42)
""")
    learner, backend, spawner = _worker(root=root)
    try:
        learner.module("autograd")
        digest = 0
        for item in (1, 2, 3):
            digest = (digest * 1_000_003 + item + 1) % (1 << 61)
        assert learner.harness("drain", [1, 2, 3]) == (3, digest)
    finally:
        backend.close()
        spawner.cleanup()
