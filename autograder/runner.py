"""Grade a submission: one trusted pytest run per unit, learner code in a sandboxed worker.

The pytest run (the course's visible tests and the hidden suite, with ``autograder.plugin``)
decides every outcome and writes them to a results file in a private folder; the learner's code
runs only in the worker that the plugin starts.  One unit's crash or time-out never stops the
others.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from autograder.manifest import REPO_ROOT, Course, Unit
from autograder.sandbox import cleanup_work_dir, dies_with_parent, probe_level
from autograder.scoring import NOT_GRADED, Report, TestResult, UnitResult, clean_text, score_unit
from autograder.submission import Intake, take_in

HIDDEN_ROOT = REPO_ROOT / "autograder" / "hidden"
NOT_GRADED_GPU = "not graded: needs a CUDA GPU"


def test_paths(unit: Unit, hidden: bool = True, visible: bool = True) -> list[Path]:
    """The course's copies of the unit's tests (a learner's edited visible tests are never run)."""
    shown = sorted((REPO_ROOT / "exercises" / unit.dir).glob("test_*.py")) if visible else []
    hidden_dir = HIDDEN_ROOT / unit.id
    return shown + ([hidden_dir] if hidden and hidden_dir.is_dir() else [])


SUMMARY_LINES, SUMMARY_WIDTH = 8, 300


def _summarise(message: str, feedback: str) -> str:
    """What a learner sees of a failed hidden test (course.yml's ``hidden_feedback``).

    ``full``: the whole message.  ``summary``: what went wrong, without long dumps of the hidden
    inputs: the first lines (the call, with shapes; the error figures: how many values differ, the
    largest error and where) and every hint, each line cut at 300 characters, at most 8 lines.
    ``none``: only that a hidden test failed."""
    if feedback == "full":
        return message
    if feedback == "none":
        return "a hidden test failed"
    lines = [line.rstrip() for line in message.strip().splitlines() if line.strip()]
    hints = [line for line in lines if line.lstrip().startswith("Hint:")]
    kept = [line for line in lines if line not in hints][: SUMMARY_LINES - min(len(hints), SUMMARY_LINES // 2)]
    kept += hints[: SUMMARY_LINES - len(kept)]
    return "\n".join(line if len(line) <= SUMMARY_WIDTH else line[: SUMMARY_WIDTH - 4] + " ..." for line in kept)


def run_unit(course: Course, unit: Unit, submission_root: Path, *, isolation: str, seed: str,
             hidden: bool = True, visible: bool = True, extra_args: list[str] | None = None) -> UnitResult:
    result = UnitResult(unit.id, unit.title)
    limits = course.limits_for(unit)
    started = time.monotonic()
    # The results file lives in a folder only this user can open; the workers' folders and
    # cgroups are recorded in a work folder that is removed below whatever became of the run.
    work = Path(tempfile.mkdtemp(prefix="course-work-"))
    os.chmod(work, 0o711)  # the worker's user (level "user") may pass through to its own folder
    with tempfile.TemporaryDirectory(prefix="course-results-") as private:
        os.chmod(private, 0o700)
        results_file = Path(private) / "results.jsonl"
        args = [sys.executable, "-m", "pytest", *map(str, test_paths(unit, hidden, visible)),
                "-c", str(REPO_ROOT / "pyproject.toml"), "--rootdir", str(REPO_ROOT), "--noconftest",
                "-p", "no:cacheprovider", "-q", "--no-header", "-rN", "--tb=no",
                "--submission", str(submission_root), "--isolation", isolation, "--results", str(results_file),
                "--call-timeout", str(limits.call_timeout), "--work-dir", str(work),
                *(extra_args or [])]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COURSE_"))}
        # One thread for HF tokenizers' trainer: a baseline's CPU time means the same on any machine.
        env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", COURSE_GRADING_SEED=seed, PYTHONDONTWRITEBYTECODE="1",
                   TOKENIZERS_PARALLELISM="false",
                   # Hypothesis keeps its examples and caches in a folder of this run alone, removed with it:
                   # one submission's failing examples never steer another's grade.
                   HYPOTHESIS_STORAGE_DIRECTORY=str(Path(private) / "hypothesis"))
        process = subprocess.Popen(dies_with_parent(args), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            console, _ = process.communicate(timeout=limits.unit_timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            console, _ = process.communicate()
            timed_out = True
        finally:
            cleanup_work_dir(work)
        records = []
        if results_file.exists():
            for line in results_file.read_text(encoding="utf-8").splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    result.seconds = time.monotonic() - started
    collected = next((r for r in records if r.get("event") == "collected"), None)
    outcomes = {r["nodeid"]: r for r in records if r.get("event") == "result"}
    finished = next((r for r in records if r.get("event") == "finished"), {})
    result.isolation = ", ".join(finished.get("isolation", [])) or isolation
    result.unplanned_restarts = finished.get("unplanned_restarts", 0)
    tail = console.decode("utf-8", errors="replace")[-3000:]
    if collected is None:
        result.error = f"the tests of {unit.id} could not be collected (a course problem, not yours):\n{tail}"
        return score_unit(course, unit, result)
    if "error" in tail.lower() and "errors during collection" in tail.lower():
        result.notes.append("some test files of this unit failed to load; their groups score 0:\n" + tail[-1500:])
    for test in collected["tests"]:
        if test["unit"] != unit.id:
            continue
        outcome = outcomes.get(test["nodeid"])
        if outcome is None:
            status = "not_run"
            output = (f"not run: the unit's {limits.unit_timeout:g} s time limit ran out" if timed_out
                      else "not run: the test process ended early")
        else:
            status, output = outcome["outcome"], outcome.get("message", "")
            if status == "skipped" and output.startswith(NOT_GRADED_GPU):
                status = NOT_GRADED
        if test["visibility"] == "hidden" and status not in ("passed", NOT_GRADED):
            output = _summarise(output, course.hidden_feedback)
        elif test["visibility"] == "hidden" and course.hidden_feedback == "none":
            output = ""  # not even what a passing hidden test measured
        result.tests.append(TestResult(test["name"], test["group"], test["visibility"], status, clean_text(output),
                                       nodeid=test["nodeid"]))
    if timed_out:
        result.notes.append(f"the unit's tests ran past {limits.unit_timeout:g} s and were stopped")
    # Without the hidden suite (a student release), a group only hidden tests cover is not tested.
    return score_unit(course, unit, result, empty_groups_count=hidden and (HIDDEN_ROOT / unit.id).is_dir())


def grade(course: Course, submission: Path | str, unit_ids: list[str] | None = None, *, isolation: str = "auto",
          hidden: bool = True, visible: bool = True, jobs: int = 1, on_unit: Callable[[UnitResult], None] | None = None,
          extra_args: list[str] | None = None) -> Report:
    """Grade ``submission`` (a folder like exercises/ or a zip from `course submit`)."""
    units = [course.unit(u) for u in unit_ids] if unit_ids else list(course.units)
    intake = take_in(submission, course, units)
    try:
        return grade_intake(course, intake, units, isolation=isolation, hidden=hidden, visible=visible, jobs=jobs,
                            on_unit=on_unit, extra_args=extra_args)
    finally:
        intake.cleanup()


def grade_intake(course: Course, intake: Intake, units: list[Unit], *, isolation: str = "auto", hidden: bool = True,
                 visible: bool = True, jobs: int = 1, on_unit: Callable[[UnitResult], None] | None = None,
                 extra_args: list[str] | None = None) -> Report:
    """Grade a submission already taken in (its grading folder and the intake's notes)."""
    started = time.monotonic()
    if isolation == "inprocess":  # benchmarks only: no worker, learner code in the pytest process
        level, weaker_because = "inprocess", "learner code ran inside the grading process (benchmark mode)"
    else:
        level, weaker_because = probe_level(isolation)
    seed = secrets.token_hex(16)

    def one(unit: Unit) -> UnitResult:
        result = run_unit(course, unit, intake.root, isolation=level, seed=seed, hidden=hidden, visible=visible,
                          extra_args=extra_args)
        result.notes = [clean_text(n) for n in intake.notes.get(unit.id, []) + result.notes]
        if on_unit:
            on_unit(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, units))
    note = weaker_because
    if level in ("none", "inprocess"):
        note = f"WARNING: learner code ran without a sandbox ({weaker_because})"
    return Report(course.course, course.version, results, level, note, time.monotonic() - started)
