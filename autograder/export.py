"""Exports for platforms that already run graders at scale: Gradescope and GitHub Classroom.

* Gradescope: a zip with ``setup.sh`` and ``run_autograder`` at its root (from templates/gradescope/)
  and the course: the engine with its hidden suites, the generated exercises/ (visible tests and the
  course's files of each unit), the reference solutions of the learner files (hidden tests compute
  their expected values from them on the trusted side; ``run_autograder`` closes the whole tree to
  the learner's user), course.yml, pyproject.toml and a requirements.txt of the dependencies.  No
  solution tests, course tests, mutants or benchmarks.  ``run_autograder`` calls
  ``course gradescope-run`` (``gradescope_run`` below), which grades in isolation and writes
  results.json with course.yml's visibility for hidden tests.
* GitHub Classroom: a workflow for the student release with one command-grader step per unit
  (points = the unit's points, earned when the unit's visible tests all pass) and the reporter.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import yaml

from autograder.build import SKIPPED_NAMES, planned_files
from autograder.manifest import REPO_ROOT, Course
from autograder.release import TEMPLATES, torch_spec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

EXECUTABLE = 0o100755 << 16
COMMAND_GRADER = "education/autograding-command-grader@v1"
REPORTER = "education/autograding-grading-reporter@v1"


class ExportError(Exception):
    """The course cannot be exported as asked."""


# Gradescope -----------------------------------------------------------------------------------

def requirements(root: Path = REPO_ROOT) -> str:
    """What the grader needs besides torch (pinned on its own line by setup.sh): the course's
    dependencies and the oracles the hidden tests compare against."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = [r for r in project["dependencies"] if re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] != "torch"]
    return "\n".join(needed + project["optional-dependencies"]["oracles"]) + "\n"


def gradescope_files(course: Course, torch_index: str | None = None, root: Path = REPO_ROOT) -> dict[str, bytes]:
    files = {path.relative_to(root).as_posix(): data for path, data in planned_files(course, root).items()}
    for path in sorted((root / "autograder").rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not SKIPPED_NAMES & set(rel.parts):
            files[rel.as_posix()] = path.read_bytes()
    for unit in course.units:
        for name in ("__init__.py", *unit.files):
            reference = root / "solutions" / unit.dir / name
            if reference.is_file():
                files[reference.relative_to(root).as_posix()] = reference.read_bytes()
    for name in ("course.yml", "pyproject.toml"):
        files[name] = (root / name).read_bytes()
    files["requirements.txt"] = requirements(root).encode()
    index_args = f'--index-url "{torch_index}"' if torch_index else ""
    setup = (TEMPLATES / "gradescope" / "setup.sh").read_text(encoding="utf-8")
    files["setup.sh"] = setup.replace("@TORCH_SPEC@", torch_spec(root)).replace("@TORCH_INDEX_ARGS@", index_args).encode()
    files["run_autograder"] = (TEMPLATES / "gradescope" / "run_autograder").read_bytes()
    return files


def write_gradescope_zip(course: Course, out: Path, torch_index: str | None = None, root: Path = REPO_ROOT) -> int:
    """Write the autograder zip; returns the number of files in it."""
    files = gradescope_files(course, torch_index, root)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in ("setup.sh", "run_autograder"):
                info.external_attr = EXECUTABLE
            else:
                info.external_attr = 0o100644 << 16
            archive.writestr(info, data)
    return len(files)


def locate_submission(folder: Path, course: Course, staging: Path) -> Path:
    """What a learner uploaded, as something ``runner.grade`` takes: the unit folders (at the top or
    under exercises/), a single zip from `course submit`, or loose files, which are put into their
    units' folders under ``staging`` by name (learner file names are unique across units)."""
    unit_dirs = {u.dir for u in course.units}
    for candidate in (folder, folder / "exercises"):
        if any((candidate / d).is_dir() for d in unit_dirs):
            return candidate
    zips = sorted(folder.glob("*.zip"))
    if len(zips) == 1:
        return zips[0]
    owner = {name: unit.dir for unit in course.units for name in unit.files}
    for path in sorted(folder.rglob("*.py")):
        if path.name in owner and path.is_file() and not path.is_symlink():
            target = staging / owner[path.name] / path.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    return staging


def gradescope_run(course: Course, submission: Path, results: Path, units: list[str] | None = None,
                   jobs: int = 1) -> dict:
    """Grade ``submission`` (Gradescope's /autograder/submission) and write its results.json."""
    from autograder.reporters import gradescope_results
    from autograder.runner import grade
    from autograder.submission import SubmissionError

    results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gradescope-staging-") as staging:
        try:
            report = grade(course, locate_submission(submission, course, Path(staging)), units, jobs=jobs)
            data = gradescope_results(report, course)
        except SubmissionError as exc:
            data = {"score": 0, "output": f"Your submission could not be graded: {exc}", "output_format": "text",
                    "visibility": "visible", "stdout_visibility": "hidden", "tests": []}
    results.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return data


# GitHub Classroom -----------------------------------------------------------------------------

def unit_command(unit_id: str, python: str = ".venv/bin/python") -> str:
    """Exit 0 exactly when every graded visible test of the unit passes (full marks)."""
    return f"{python} -m autograder grade exercises --unit {unit_id} --fail-under 100"


def classroom_workflow(course: Course, torch_index: str | None = None, python_version: str = "3.11") -> dict:
    setup = ["(sudo apt-get update -qq && sudo apt-get install -y -qq bubblewrap) || echo 'no bubblewrap: grading without a sandbox'"]
    if torch_index:
        setup += ["python -m venv .venv", f'.venv/bin/python -m pip install --quiet "{torch_spec()}" --index-url "{torch_index}"']
    setup.append("make setup")
    steps: list[dict] = [
        {"name": "Check out the code", "uses": "actions/checkout@v4"},
        {"name": "Set up Python", "uses": "actions/setup-python@v5", "with": {"python-version": python_version}},
        {"name": "Install the course", "run": "\n".join(setup) + "\n"},
    ]
    for unit in course.units:
        points = unit.points
        if points != int(points):
            raise ExportError(f"{unit.id}: {points} points; the command grader awards whole points only")
        minutes = math.ceil(course.limits_for(unit).unit_timeout / 60) + 5
        steps.append({"name": f"{unit.id}: {unit.title}", "id": unit.id, "uses": COMMAND_GRADER,
                      "with": {"test-name": f"{unit.id}: {unit.title}", "setup-command": "",
                               "command": unit_command(unit.id), "timeout": minutes, "max-score": int(points)}})
    steps.append({"name": "Autograding Reporter", "uses": REPORTER,
                  "env": {f"{u.id.upper()}_RESULTS": "${{steps.%s.outputs.result}}" % u.id for u in course.units},
                  "with": {"runners": ",".join(u.id for u in course.units)}})
    return {"name": "Autograding Tests", "on": ["push", "repository_dispatch"],
            "permissions": {"checks": "write", "actions": "read", "contents": "read"},
            "jobs": {"run-autograding-tests": {"runs-on": "ubuntu-latest",
                                               "if": "github.actor != 'github-classroom[bot]'", "steps": steps}}}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (a step's script) as YAML literal blocks, the way workflows are written."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def protected_paths(course: Course) -> list[str]:
    provided = sorted({p for u in course.units for p in u.provided})
    return [".github/**", "exercises/**/test_*.py", "autograder/**", "course.yml", "pyproject.toml", "Makefile",
            *[f"exercises/{p}/**" for p in provided]]


def write_classroom(course: Course, out: Path, torch_index: str | None = None) -> list[Path]:
    workflow = out / ".github" / "workflows" / "classroom.yml"
    workflow.parent.mkdir(parents=True, exist_ok=True)
    stream = io.StringIO()
    stream.write("# GitHub Classroom autograding: one command-grader step per unit; a unit's points are\n"
                 "# earned when all its graded visible tests pass.  Written by `course export github-classroom`.\n")
    yaml.dump(classroom_workflow(course, torch_index), stream, Dumper=_BlockDumper, sort_keys=False, width=120)
    workflow.write_text(stream.getvalue(), encoding="utf-8")
    rows = "\n".join(f"| {u.id} | {u.title} | {int(u.points)} | `{unit_command(u.id)}` |" for u in course.units)
    paths = "\n".join(f"- `{p}`" for p in protected_paths(course))
    notes = out / "CLASSROOM.md"
    notes.write_text(f"""# GitHub Classroom set-up ({course.title})

1. Push the student release (`course release DIR`) with this `.github/` folder to a template
   repository, and create the assignment from it.
2. In the assignment's autograding settings keep the workflow as it is: it runs on every push, one
   step per unit (the command grader awards a unit's points when its command exits 0).
3. **Protected paths**: set these in the assignment, so a change to the tests or the workflow is
   flagged:

{paths}

| unit | title | points | command |
|---|---|---|---|
{rows}

The release has no hidden tests: Classroom's points come from the visible tests. Grade the hidden
suites with `course grade-all` on the collected repositories (see the course README).
""", encoding="utf-8")
    return [workflow, notes]
