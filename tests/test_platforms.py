"""Exports: a Gradescope autograder run on a simulated /autograder tree, a GitHub Classroom workflow."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from autograder.export import COMMAND_GRADER, REPORTER, locate_submission, write_classroom, write_gradescope_zip
from autograder.manifest import REPO_ROOT, load_course
from autograder.release import torch_spec, write_release
from autograder.submission import pack_submission

COURSE = load_course()
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "COURSE_"))}
VISIBILITY = {"enum": ["hidden", "after_due_date", "after_published", "visible"]}
FORMAT = {"enum": ["text", "html", "simple_format", "md", "ansi"]}
# Gradescope's results.json, from its documented format (autograder specifications).
RESULTS_SCHEMA = {
    "type": "object",
    "required": ["tests"],
    "anyOf": [{"required": ["score"]}, {"properties": {"tests": {"items": {"required": ["score"]}}}}],
    "properties": {
        "score": {"type": "number"},
        "execution_time": {"type": "number"},
        "output": {"type": "string"},
        "output_format": FORMAT,
        "test_output_format": FORMAT,
        "test_name_format": FORMAT,
        "visibility": VISIBILITY,
        "stdout_visibility": VISIBILITY,
        "extra_data": {"type": "object"},
        "tests": {"type": "array", "items": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "score": {"type": "number"},
                "max_score": {"type": "number", "minimum": 0},
                "status": {"enum": ["passed", "failed"]},
                "name": {"type": "string"},
                "name_format": FORMAT,
                "number": {"type": "string"},
                "output": {"type": "string"},
                "output_format": FORMAT,
                "tags": {"type": "array", "items": {"type": "string"}},
                "visibility": VISIBILITY,
                "extra_data": {"type": "object"},
            },
        }},
        "leaderboard": {"type": "array"},
    },
    "additionalProperties": False,
}


def _unzip_like_gradescope(archive: Path, root: Path) -> None:
    """Gradescope unpacks the autograder into /autograder/source and copies run_autograder up."""
    with zipfile.ZipFile(archive) as z:
        z.extractall(root / "source")
        for info in z.infolist():
            os.chmod(root / "source" / info.filename, (info.external_attr >> 16) & 0o777)
    shutil.copy2(root / "source" / "run_autograder", root / "run_autograder")


def _run_autograder(root: Path) -> dict:
    results = root / "results" / "results.json"
    results.unlink(missing_ok=True)
    env = {**ENV, "AUTOGRADER_ROOT": str(root), "COURSE_UNITS": "unit1", "COURSE_PYTHON": sys.executable}
    done = subprocess.run([str(root / "run_autograder")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(results.read_text())
    jsonschema.validate(data, RESULTS_SCHEMA)
    return data


def test_gradescope_autograder_on_a_simulated_tree(tmp_path):
    archive = tmp_path / "autograder.zip"
    write_gradescope_zip(COURSE, archive)
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in z.infolist()}
        setup = z.read("setup.sh").decode()
    assert modes["setup.sh"] == modes["run_autograder"] == 0o755
    assert {"course.yml", "requirements.txt", "autograder/runner.py", "exercises/unit1/test_autograd.py"} <= names
    assert any(n.startswith("autograder/hidden/unit1/") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    # The references the hidden tests compute with, and nothing else of solutions/ (no solution tests).
    references = {n for n in names if n.startswith("solutions/")}
    assert references == {f"solutions/{u.dir}/{f}" for u in COURSE.units for f in ("__init__.py", *u.files)
                          if (REPO_ROOT / "solutions" / u.dir / f).is_file()}, references
    assert f'"{torch_spec()}"' in setup and "bubblewrap" in setup

    root = tmp_path / "autograder"
    _unzip_like_gradescope(archive, root)
    solved = root / "submission" / "unit1"
    shutil.copytree(REPO_ROOT / "solutions" / "unit1", solved, ignore=shutil.ignore_patterns("test_*", "__pycache__"))
    data = _run_autograder(root)
    graded = [t for t in data["tests"] if t.get("status")]
    assert graded and all(t["status"] == "passed" for t in graded)
    total = sum(t["max_score"] for t in data["tests"])  # (each test's points are rounded)
    assert data["score"] == pytest.approx(total, abs=0.01) and data["score"] == COURSE.unit("unit1").points - 10  # no GPU
    hidden = [t for t in data["tests"] if "hidden/" in t["name"]]
    assert hidden and all(t["visibility"] == COURSE.hidden_visibility == "after_due_date" for t in hidden)
    assert all(t["visibility"] == "visible" for t in data["tests"] if t["name"].startswith("unit1 test_"))
    # Learner code may run as `nobody` only if `nobody` cannot read the course: run_autograder saw to it.
    assert (root / "source").stat().st_mode & 0o077 == 0 and (root / "results").stat().st_mode & 0o077 == 0
    if os.geteuid() == 0:
        peek = subprocess.run(["cat", str(root / "source" / "course.yml")], user=65534, group=65534, extra_groups=[],
                              capture_output=True, text=True)
        assert peek.returncode != 0 and "Permission denied" in peek.stderr

    # A broken submission, uploaded as loose files: graded for what works.
    shutil.rmtree(root / "submission")
    (root / "submission").mkdir()
    for name in ("layers.py", "fused.py"):
        shutil.copy(REPO_ROOT / "solutions" / "unit1" / name, root / "submission" / name)
    (root / "submission" / "autograd.py").write_text("class Value:\n    def __init__(self, data\n")
    data = _run_autograder(root)
    assert 0 < data["score"] < sum(t["max_score"] for t in data["tests"])
    notes = next(t for t in data["tests"] if t["name"] == "unit1 notes")
    assert "unit1/autograd.py:2: SyntaxError" in notes["output"] and notes["visibility"] == "visible"


def test_gradescope_finds_what_was_uploaded(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    pack_submission(REPO_ROOT / "exercises", COURSE, zipped / "submission.zip", "2026-01-01T00:00:00+00:00")
    assert locate_submission(zipped, COURSE, staging) == zipped / "submission.zip"
    nested = tmp_path / "nested"
    (nested / "exercises" / "unit3").mkdir(parents=True)
    assert locate_submission(nested, COURSE, staging) == nested / "exercises"
    loose = tmp_path / "loose"
    (loose / "my work").mkdir(parents=True)
    (loose / "my work" / "bpe.py").write_text("x = 1\n")
    (loose / "notes.py").write_text("y = 2\n")
    assert locate_submission(loose, COURSE, staging) == staging
    assert [p.relative_to(staging).as_posix() for p in staging.rglob("*.py")] == ["unit3/bpe.py"]


def test_github_classroom_workflow(tmp_path):
    release = tmp_path / "release"
    write_release(COURSE, release)
    workflow_path, notes = write_classroom(COURSE, release)
    workflow = yaml.safe_load(workflow_path.read_text())
    assert set(workflow["on"]) == {"push", "repository_dispatch"}
    steps = workflow["jobs"]["run-autograding-tests"]["steps"]
    graders = [s for s in steps if s.get("uses") == COMMAND_GRADER]
    assert [s["id"] for s in graders] == [u.id for u in COURSE.units]
    for step, unit in zip(graders, COURSE.units):
        assert step["with"]["max-score"] == unit.points and step["with"]["timeout"] > 0
        assert f"--unit {unit.id}" in step["with"]["command"] and step["with"]["test-name"].startswith(unit.id)
    assert sum(s["with"]["max-score"] for s in graders) == COURSE.points
    (reporter,) = [s for s in steps if s.get("uses") == REPORTER]
    assert reporter["with"]["runners"].split(",") == [u.id for u in COURSE.units]
    assert reporter["env"] == {f"{u.id.upper()}_RESULTS": f"${{{{steps.{u.id}.outputs.result}}}}" for u in COURSE.units}
    text = notes.read_text()
    assert "`.github/**`" in text and "`exercises/**/test_*.py`" in text

    # The unit's command, run in the release as the workflow runs it: non-zero on stubs, 0 when solved.
    command = shlex.split(graders[0]["with"]["command"])
    assert command[0] == ".venv/bin/python"
    command[0] = sys.executable
    stubs = subprocess.run(command, cwd=release, env=ENV, capture_output=True, text=True)
    assert stubs.returncode == 1, stubs.stdout[-2000:] + stubs.stderr[-2000:]
    for name in COURSE.unit("unit1").files:
        shutil.copy(REPO_ROOT / "solutions" / "unit1" / name, release / "exercises" / "unit1" / name)
    solved = subprocess.run(command, cwd=release, env=ENV, capture_output=True, text=True)
    assert solved.returncode == 0, solved.stdout[-2000:] + solved.stderr[-2000:]
    assert "hidden tests are not included" in " ".join(solved.stdout.split())


def test_gradescope_names_no_hidden_test_when_the_course_shows_none():
    from autograder.reporters import gradescope_results
    from autograder.scoring import Report, UnitResult
    from autograder.scoring import TestResult as Result

    unit = UnitResult("unit1", "U", tests=[Result("hidden/test_x_hidden.py::test_secret_case", "fused", "hidden", "failed",
                                                  "a hidden test failed"),
                                           Result("test_fused.py::test_shown", "fused", "visible", "passed")])
    silent = COURSE.model_copy(update={"hidden_feedback": "none"})
    names = [t["name"] for t in gradescope_results(Report("c", "1", [unit]), silent)["tests"]]
    assert names == ["unit1 hidden test 1", "unit1 test_fused.py::test_shown"]
    assert "test_secret_case" in gradescope_results(Report("c", "1", [unit]), COURSE)["tests"][0]["name"]
