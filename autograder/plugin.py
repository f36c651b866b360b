"""The course's pytest plugin: the ``learner`` fixture, scoring groups, GPU policy, results.

Loaded with ``-p autograder.plugin`` (pyproject.toml does it for every pytest run in the repo).

* Run by a learner (``pytest exercises/unit1``): learner code is imported in-process, so
  tracebacks and ``pdb`` work as usual.
* Run by the grader (``--submission DIR``): learner code runs in a sandboxed worker and every test's
  outcome is written to ``--results`` as one JSON line, which the runner scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from autograder.checks import CheckFailure
from autograder.client import InProcessBackend, Learner, LearnerError, WorkerBackend, is_todo
from autograder.manifest import REPO_ROOT, Course, Unit, load_course

NOT_GRADED_GPU = "not graded: needs a CUDA GPU"
HIDDEN_DIR = REPO_ROOT / "autograder" / "hidden"
_STATE = pytest.StashKey["CourseState"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("course", "course grading")
    group.addoption("--submission", help="grade this folder of unit folders, learner code in a sandboxed worker")
    group.addoption("--isolation", default="auto",
                    help="auto | bwrap | user | none (with --submission); inprocess: no worker, for benchmarks only")
    group.addoption("--call-timeout", type=float, help="seconds for one call into learner code (default: course.yml)")
    group.addoption("--results", help="append one JSON line per test outcome to this file")
    group.addoption("--work-dir", help="make the workers' folders here and record them (and their cgroups) for cleanup")
    group.addoption("--gpu", choices=("auto", "require"), default="auto",
                    help="require: fail, rather than leave ungraded, GPU tests on a machine without CUDA")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class CourseState:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.course: Course = load_course()
        self.submission = config.getoption("submission")
        self.isolation = config.getoption("isolation")
        self.results_path = config.getoption("results")
        self.work_dir = config.getoption("work_dir")
        self.gpu_units: set[str] = set()  # units with GPU tests that run here (their worker sees the GPU)
        # The secret seed reaches this process only through the environment, and leaves it here.
        self.grading_seed = os.environ.pop("COURSE_GRADING_SEED", "visible-tests")
        self.cuda = _cuda_available()
        self.learners: dict[tuple[str, str], Learner] = {}
        self.spawners = []

    # where a test belongs ---------------------------------------------------------
    def unit_of(self, path: Path) -> tuple[Unit, Path, str] | None:
        """(unit, root of the learner's unit folders, visibility) for a test file, if it is a unit's."""
        path = Path(path).resolve()
        for unit in self.course.units:
            hidden = (HIDDEN_DIR / unit.id).resolve()
            if hidden in path.parents:
                return unit, Path(self.submission or REPO_ROOT / "exercises"), "hidden"
            for parent in path.parents:
                if parent.name == unit.dir and (parent / "__init__.py").exists():
                    return unit, parent.parent, "visible"
        return None

    def learner(self, unit: Unit, root: Path) -> Learner:
        # Graded runs share one worker per unit; learner runs may mix roots (exercises/, solutions/).
        key = (unit.id, "" if self.submission else str(root))
        if key not in self.learners:
            if self.submission and self.isolation == "inprocess":
                # Benchmarks only: the graded tree, imported into this (trusted) process.
                from autograder.sandbox import grading_tree

                backend = InProcessBackend(grading_tree(Path(self.submission), unit.dir, unit.files, unit.provided))
            elif self.submission:
                from autograder.sandbox import Spawner

                limits = self.course.limits_for(unit)
                spawner = Spawner(Path(self.submission), unit.dir, unit.files, unit.provided,
                                  [f.model_dump() for f in self.course.forbidden_for(unit)],
                                  limits.memory_mb, limits.max_processes, limits.max_file_kb, self.isolation,
                                  work_dir=Path(self.work_dir) if self.work_dir else None, gpu=unit.id in self.gpu_units)
                self.spawners.append(spawner)
                backend = WorkerBackend(spawner, self.config.getoption("call_timeout") or limits.call_timeout)
            else:  # a learner's own pytest run
                backend = InProcessBackend(root)
            self.learners[key] = Learner(backend, unit.dir)
        return self.learners[key]

    def write(self, record: dict) -> None:
        if self.results_path:
            with open(self.results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        for learner in self.learners.values():
            learner.backend.close()
        for spawner in self.spawners:
            spawner.cleanup()


def _hypothesis_for_grading(grading_seed: str) -> None:
    """Every graded run starts from the same state: no example database (failing examples found on
    one learner's code are never replayed on the next one's), examples drawn from the run's seed."""
    from hypothesis import core, settings

    settings.register_profile("course-grading", database=None)
    settings.load_profile("course-grading")
    core.global_force_seed = int.from_bytes(hashlib.sha256(f"hypothesis|{grading_seed}".encode()).digest()[:8], "little")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "group(name): the course.yml scoring group of a graded test")
    config.addinivalue_line("markers", "fresh_worker: the test calls learner.restart() (a graded run starts its fresh "
                                       "worker while the test before it runs)")
    state = CourseState(config)
    config.stash[_STATE] = state
    if state.submission:
        _hypothesis_for_grading(state.grading_seed)
    if state.results_path:
        config.pluginmanager.register(Recorder(state), "course-recorder")
    if config.getoption("gpu") == "require" and not state.cuda:
        raise pytest.UsageError("--gpu require: no CUDA GPU is visible to torch on this machine")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


def _test_info(state: CourseState, item: pytest.Item) -> dict | None:
    found = state.unit_of(item.path)
    if found is None:
        return None
    unit, _, visibility = found
    marker = item.get_closest_marker("group")
    group = marker.args[0] if marker and marker.args else None
    return {"nodeid": item.nodeid, "name": _display_name(item, visibility), "unit": unit.id, "group": group,
            "visibility": visibility, "gpu": item.get_closest_marker("gpu") is not None}


def _display_name(item: pytest.Item, visibility: str) -> str:
    file = Path(item.path).name
    return f"{file}::{item.name}" if visibility == "visible" else f"hidden/{file}::{item.name}"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[_STATE]
    # A learner's own run has no worker to stop an endless loop: pytest-timeout stops the test.
    timed = not state.submission and config.pluginmanager.hasplugin("timeout")
    for item in items:
        if item.get_closest_marker("gpu") and not state.cuda:
            item.add_marker(pytest.mark.skip(reason=NOT_GRADED_GPU))
        found = state.unit_of(item.path) if timed else None
        if found and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(state.course.limits_for(found[0]).visible_test_timeout))


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash[_STATE]
    tests = [info for item in session.items if (info := _test_info(state, item))]
    state.gpu_units = {t["unit"] for t in tests if t["gpu"]} if state.cuda else set()
    state.write({"event": "collected", "tests": tests, "cuda": state.cuda})


def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # A test marked fresh_worker finds its fresh worker started while the test before it ran.
    state = item.config.stash[_STATE]
    units = {info["unit"] for test in (item, nextitem)
             if test is not None and test.get_closest_marker("fresh_worker") and (info := _test_info(state, test))}
    for (unit_id, _), learner in state.learners.items():
        if unit_id in units and isinstance(learner.backend, WorkerBackend):
            learner.backend.start_ahead()


def pytest_runtest_setup(item: pytest.Item) -> None:
    state = item.config.stash[_STATE]
    for learner in state.learners.values():
        learner.backend.in_flight = None
    info = _test_info(state, item)
    if info is None:
        return
    unit = state.course.unit(info["unit"])
    if info["group"] is None or unit.group(info["group"]) is None:
        known = ", ".join(g.id for g in unit.groups)
        raise pytest.UsageError(f"{item.nodeid}: mark it @pytest.mark.group(...) with one of {unit.id}'s groups ({known})")


@pytest.fixture
def learner(request: pytest.FixtureRequest) -> Learner:
    """The learner's unit this test belongs to (modules via ``learner.module("name")``)."""
    state = request.config.stash[_STATE]
    found = state.unit_of(request.path)
    if found is None:
        raise pytest.UsageError(f"{request.path}: the learner fixture is only for tests of a unit in course.yml")
    unit, root, _ = found
    return state.learner(unit, root)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed for this test's inputs: fixed for visible runs, secret per grading run otherwise."""
    state = request.config.stash[_STATE]
    digest = hashlib.sha256(f"{state.grading_seed}|{request.node.nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def torch_gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _timed_out(state: "CourseState", item: pytest.Item, exc: BaseException) -> str | None:
    """pytest-timeout stopped a learner's own run: name the call of learner code that never returned."""
    if not str(exc).startswith("Timeout"):
        return None
    calls = [l.backend.in_flight for l in state.learners.values() if getattr(l.backend, "in_flight", None)]
    marker = item.get_closest_marker("timeout")
    limit = f"{marker.args[0]:g} s" if marker and marker.args else "the time limit"
    if not calls:
        return f"the test did not finish within {limit}."
    return (f"{calls[-1]()} did not return within {limit}: an endless loop (a `while` whose condition never "
            "changes, a generator that never stops)?")


class TodoReached(BaseException):
    """A TODO escaped one example of a Hypothesis test.  Hypothesis lets a BaseException through at
    once: every other example would stop at the same TODO, so shrinking them (hundreds of calls into
    the learner's process) teaches nothing.  Reported as the TODO itself."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _stopping_at_todo(inner_test):
    @functools.wraps(inner_test)
    def run(*args, **kwargs):
        try:
            return inner_test(*args, **kwargs)
        except Exception as exc:
            if is_todo(exc):
                raise TodoReached(exc) from exc
            raise

    run.stops_at_todo = True
    return run


def pytest_runtest_call(item: pytest.Item) -> None:
    # Hypothesis documents .hypothesis.inner_test as the place to change how each example runs.
    hypothesis = getattr(getattr(item, "obj", None), "hypothesis", None)
    if hypothesis is not None and not getattr(hypothesis.inner_test, "stops_at_todo", False):
        hypothesis.inner_test = _stopping_at_todo(hypothesis.inner_test)


def teaching_message(excinfo: pytest.ExceptionInfo) -> str:
    exc = excinfo.value
    if isinstance(exc, (CheckFailure, LearnerError)):
        return str(exc)
    if isinstance(exc, AssertionError):
        text = str(exc).strip()
        return text.split("\nassert ")[0] if text else "assertion failed"
    return f"{type(exc).__name__}: {exc}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    excinfo = call.excinfo
    if excinfo is not None and isinstance(excinfo.value, TodoReached):
        excinfo = pytest.ExceptionInfo.from_exception(excinfo.value.error)
    if excinfo is not None and report.failed:
        message = teaching_message(excinfo)
        timed_out = _timed_out(item.config.stash[_STATE], item, excinfo.value)
        if timed_out:
            found = item.config.stash[_STATE].unit_of(item.path)
            learner_dir = (found[1] / found[0].dir).resolve() if found else None
            where = [e for e in excinfo.traceback if learner_dir and Path(str(e.path)).resolve().is_relative_to(learner_dir)
                     and not Path(str(e.path)).name.startswith("test_")]
            if where:
                timed_out += f" It was running {Path(str(where[-1].path)).name} line {where[-1].lineno + 1}."
            message = report.longrepr = timed_out
        report.course_message = message
        exc = excinfo.value
        state = item.config.stash[_STATE]
        # A learner sees a short message for a TODO; in grading, no trusted-side traceback.
        if isinstance(exc, LearnerError) and (exc.is_todo or state.submission):
            report.longrepr = message
        elif isinstance(exc, NotImplementedError) and str(exc).startswith("TODO"):
            tb = excinfo.traceback[-1]
            report.longrepr = f"{exc} (not written yet: {Path(str(tb.path)).name} line {tb.lineno + 1})"
            report.course_message = report.longrepr


class Recorder:
    """Writes each test's outcome as it happens, so a killed run keeps what it had."""

    def __init__(self, state: CourseState):
        self.state = state
        self.started = time.monotonic()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and (report.when != "setup" or report.passed):
            return
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            outcome, message = "skipped", reason.removeprefix("Skipped: ")
        elif report.passed:
            # What a passing test measured (record_property("figures", ...)): speed-ups, bandwidth.
            outcome, message = "passed", str(dict(report.user_properties).get("figures", ""))
        else:
            outcome = "failed" if report.when == "call" else "error"
            message = getattr(report, "course_message", None) or str(report.longrepr)[-2000:]
        self.state.write({"event": "result", "nodeid": report.nodeid, "outcome": outcome,
                          "message": message[:4000], "duration": round(report.duration, 4)})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash[_STATE]
    levels = sorted({l.backend.isolation for l in state.learners.values()})
    weaker = sorted({s.weaker_because for s in state.spawners if s.weaker_because})
    restarts = sum(getattr(l.backend, "restarts", 0) for l in state.learners.values())
    unplanned = sum(getattr(l.backend, "unplanned_restarts", 0) for l in state.learners.values())
    state.write({"event": "finished", "isolation": levels, "isolation_note": weaker, "worker_restarts": restarts,
                 "unplanned_restarts": unplanned})
