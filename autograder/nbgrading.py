"""The course as an nbgrader course directory (`course nbgrader export DIR`), and the code its
graded cells run at `nbgrader autograde` time.

One assignment per unit, named after the unit's folder (the notebooks import ``unitN`` from the
folder's parent)::

    DIR/nbgrader_config.py          course id; learners' .py files kept at autograde; timeouts
    DIR/source/unitN/unitN.ipynb    the unit's notebook (solution regions marked for nbgrader to
                                    clear into release/), then one graded cell per scoring group
    DIR/source/unitN/*.py, ...      the unit's files as `course build` writes them into exercises/:
                                    stubs, never a solution body; provided folders such as common/

A graded cell's visible text is a comment; its code is an nbgrader hidden test, so learners never
see it and nbgrader puts it back at autograde.  The code grades the learner's files beside the
notebook with the same isolated grader as `course grade` (once per kernel) and ends with the
group's score, which nbgrader records as partial credit.  Groups whose tests all need a CUDA GPU
get no cell: `course grade` leaves them out of the maximum where no GPU is found, and nbgrader
cannot leave points out, so GPU parts are graded with `course grade --only gpu` on a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from autograder.build import find_regions, planned_files
from autograder.manifest import REPO_ROOT, Course, Unit, load_course

SCHEMA_VERSION = 3  # nbgrader's cell metadata schema
CONFIG = '''# Written by `course nbgrader export`; nbgrader reads it from this folder.
c = get_config()  # noqa: F821
c.CourseDirectory.course_id = {course_id!r}
# Learners edit these .py files: autograde keeps their versions instead of restoring source/'s stubs.
c.Autograde.exclude_overwriting = {exclude!r}
# A graded cell runs the unit's whole test suite (the first one of a notebook does).
c.Execute.timeout = {timeout}
c.ClearSolutions.code_stub = {{"python": {stub!r}}}
'''
NOTEBOOK_STUB = '# YOUR CODE HERE\nraise NotImplementedError("TODO: fill in this function")'


# --- export ----------------------------------------------------------------------------------

def gpu_only_groups(units: list[Unit]) -> dict[str, set[str]]:
    """Per unit, the groups all of whose tests are marked ``gpu``, from pytest's own collection."""
    from autograder.runner import test_paths

    with tempfile.TemporaryDirectory(prefix="course-collect-") as tmp:
        results = Path(tmp) / "results.jsonl"
        paths = [str(p) for unit in units for p in test_paths(unit)]
        env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", *paths, "--collect-only", "-q", "-c",
                               str(REPO_ROOT / "pyproject.toml"), "--rootdir", str(REPO_ROOT), "--noconftest",
                               "-p", "no:cacheprovider", "--results", str(results)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    collected = next((r["tests"] for r in records if r.get("event") == "collected"), None)
    if done.returncode != 0 or collected is None:
        raise RuntimeError(f"could not collect the units' tests:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = {}
    for unit in units:
        tests = [t for t in collected if t["unit"] == unit.id]
        found[unit.id] = {g.id for g in unit.groups
                          if (mine := [t for t in tests if t["group"] == g.id]) and all(t["gpu"] for t in mine)}
    return found


def _graded_cell(unit: Unit, group) -> nbformat.NotebookNode:
    source = (f"# {group.title}: {group.points:g} points, given by the course's grader (the same as `course grade`)\n"
              f"# when your instructor runs nbgrader autograde; partial credit by test.\n"
              f"### BEGIN HIDDEN TESTS\n"
              f"from autograder.nbgrading import group_score\n"
              f"group_score({unit.id!r}, {group.id!r})\n"
              f"### END HIDDEN TESTS")
    cell = nbformat.v4.new_code_cell(source)
    cell.id = f"grade-{group.id}"
    cell.metadata.nbgrader = {"grade": True, "solution": False, "locked": True, "points": group.points,
                              "grade_id": f"{unit.id}-{group.id}", "schema_version": SCHEMA_VERSION}
    return cell


def assignment_notebook(unit: Unit, groups: list) -> nbformat.NotebookNode:
    """The unit's solution notebook with nbgrader metadata and a graded cell per group."""
    path = REPO_ROOT / "solutions" / unit.dir / f"{unit.dir}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        if find_regions(cell.source, f"{path} (cell {index})"):
            cell.metadata.nbgrader = {"grade": False, "solution": True, "locked": False,
                                      "grade_id": f"{unit.id}-todo-{index}", "schema_version": SCHEMA_VERSION}
    notebook.cells.append(nbformat.v4.new_markdown_cell(
        "## Grading\n\nEach cell below stands for one part of the unit. When your instructor runs nbgrader's "
        "autograde, it grades the `.py` files of this folder with the course's hidden tests and gives that "
        "part's points (partial credit by test). Run `pytest` in this folder for the visible tests."))
    notebook.cells[-1].id = "grading"
    notebook.cells += [_graded_cell(unit, group) for group in groups]
    return notebook


def export(course: Course, out: Path, unit_ids: list[str] | None = None) -> list[Path]:
    """Write the nbgrader course directory ``out``; returns the files written."""
    units = [course.unit(u) for u in unit_ids] if unit_ids else list(course.units)
    gpu = gpu_only_groups(units)
    planned = planned_files(course)  # what `course build` writes: stubs, never a solution body
    written = []

    def put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)

    exercises = REPO_ROOT / "exercises"
    for unit in units:
        assignment = out / "source" / unit.dir
        for folder in [unit.dir, *unit.provided]:
            target = assignment if folder == unit.dir else assignment / folder
            for path, data in planned.items():
                if path.is_relative_to(exercises / folder) and path.suffix != ".ipynb":
                    put(target / path.relative_to(exercises / folder), data)
        groups = [g for g in unit.groups if g.id not in gpu[unit.id]]
        notebook = assignment_notebook(unit, groups)
        put(assignment / f"{unit.dir}.ipynb", (nbformat.writes(notebook) + "\n").encode("utf-8"))
    exclude = {unit.dir: list(unit.files) for unit in units}
    timeout = max(course.limits_for(u).unit_timeout for u in units) + 120
    config = CONFIG.format(course_id=course.course, exclude=exclude, timeout=timeout, stub=NOTEBOOK_STUB)
    put(out / "nbgrader_config.py", config.encode("utf-8"))
    return written


# --- at autograde time: the graded cells ---------------------------------------------------

_reports: dict[tuple[str, str], object] = {}


def unit_report(unit_id: str, folder: Path | None = None):
    """The course's grading of the learner's files of ``unit_id`` in ``folder`` (default: the
    notebook's folder), computed once per kernel."""
    folder = Path(folder or Path.cwd()).resolve()
    key = (unit_id, str(folder))
    if key not in _reports:
        from autograder.runner import grade

        course = load_course()
        unit = course.unit(unit_id)
        with tempfile.TemporaryDirectory(prefix="course-nbgrader-") as tmp:
            (Path(tmp) / unit.dir).mkdir()
            for name in unit.files:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, Path(tmp) / unit.dir / name)
            report = grade(course, tmp, [unit.id])
        result = report.units[0]
        if result.error:
            raise RuntimeError(f"{unit_id} could not be graded: {result.error}")
        _reports[key] = result
    return _reports[key]


def group_score(unit_id: str, group_id: str) -> float:
    """The points the learner's files earn in one scoring group, printing what failed; the cell's
    value, which nbgrader records as the cell's (partial) credit."""
    result = unit_report(unit_id)
    group = next(g for g in result.groups if g.id == group_id)
    for test in result.tests:
        if test.group == group_id and test.status != "passed":
            print(f"{test.status}: {test.name}")
            for line in test.output.strip().splitlines()[:8]:
                print(f"    {line}")
    print(f"{group.title}: {group.score:.4g} of {group.max_score:g} points ({group.passed} of {group.total} tests)")
    return min(round(group.score, 6), group.max_score)
