"""`course grade` end to end: reports, bad input, zips, the submit round trip."""

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from autograder.manifest import REPO_ROOT, load_course
from autograder.reporters import gradescope_results
from autograder.runner import grade
from autograder.submission import SubmissionError, pack_submission, take_in

COURSE = load_course()
FAST = ["-k", "test_autograd or test_fused"]


def solved(tmp_path: Path) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_cli_grades_and_writes_both_reports(tmp_path):
    out, gs = tmp_path / "report.json", tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "autograder", "grade", str(solved(tmp_path)), "--unit", "unit1",
                           "--json", str(out), "--gradescope", str(gs)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unit1: Backpropagation" in done.stdout and "isolation:" in done.stdout
    report = json.loads(out.read_text())
    assert set(report) >= {"score", "max_score", "units"}
    (unit,) = report["units"]
    assert set(unit) >= {"id", "title", "score", "max_score", "tests"}
    assert all(set(t) >= {"name", "score", "max_score", "status", "visibility", "output"} for t in unit["tests"])
    assert report["score"] == report["max_score"] == unit["max_score"] > 0
    results = json.loads(gs.read_text())
    assert results["score"] == report["score"]
    for test in results["tests"]:
        assert test["visibility"] in ("hidden", "after_due_date", "after_published", "visible")
        assert test.get("status", "passed") in ("passed", "failed")
    hidden = [t for t in results["tests"] if "hidden/" in t["name"]]
    assert hidden and all(t["visibility"] == COURSE.hidden_visibility for t in hidden)


def test_broken_files_are_graded_for_what_works(tmp_path):
    root = solved(tmp_path)
    (root / "unit1" / "autograd.py").write_text("class Value:\n    def __init__(self, data\n")
    fused = root / "unit1" / "fused.py"
    source = fused.read_text()
    fused.write_text(source + "raise RuntimeError('broken on import')\n")
    raise_line = source.count("\n") + 1
    report = grade(COURSE, root, ["unit1"], extra_args=["-k", "test_autograd or test_fused or test_layers"])
    unit = report.units[0]
    assert any("unit1/autograd.py:2: SyntaxError" in n for n in unit.notes), unit.notes
    groups = {g.id: g for g in unit.groups}
    assert groups["value_ops"].score == 0 and groups["fused"].score == 0
    assert groups["layers"].score == groups["layers"].max_score > 0
    import_failure = next(t for t in unit.tests if t.group == "fused" and t.visibility == "visible")
    assert "RuntimeError" in import_failure.output and f"unit1/fused.py:{raise_line}" in import_failure.output


def test_missing_file_and_missing_function(tmp_path):
    root = solved(tmp_path)
    (root / "unit1" / "fused.py").unlink()
    layers = root / "unit1" / "layers.py"
    layers.write_text(layers.read_text().replace("def softmax_cross_entropy(", "def renamed("))
    report = grade(COURSE, root, ["unit1"], extra_args=["-k", "test_fused or test_layers"])
    unit = report.units[0]
    assert any("unit1/fused.py: missing" in n for n in unit.notes)
    groups = {g.id: g for g in unit.groups}
    assert groups["fused"].score == 0 and groups["loss"].score == 0
    assert groups["layers"].score == groups["layers"].max_score
    loss_test = next(t for t in unit.tests if t.group == "loss" and t.visibility == "visible")
    assert "softmax_cross_entropy" in loss_test.output


def _zip(tmp_path, entries):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, data)
    return path


@pytest.mark.parametrize("entries, message", [
    ([("/etc/evil.py", b"x", 0o644)], "absolute path"),
    ([("unit1/../../evil.py", b"x", 0o644)], "climbs out"),
    ([("unit1/autograd.py", b"/etc/passwd", stat.S_IFLNK | 0o777)], "symbolic link"),
    ([("unit1/autograd.py", b"x" * (600 << 10), 0o644)], "are refused"),
])
def test_unsafe_zips_are_refused(tmp_path, entries, message):
    outside = tmp_path.parent / "evil.py"
    with pytest.raises(SubmissionError, match=message):
        take_in(_zip(tmp_path, entries), COURSE, COURSE.units)
    assert not outside.exists() and not Path("/etc/evil.py").exists()


def test_cli_refuses_a_bad_zip_with_a_message(tmp_path):
    bad = _zip(tmp_path, [("/abs.py", b"x", 0o644)])
    done = subprocess.run([sys.executable, "-m", "autograder", "grade", str(bad)], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "absolute path" in done.stderr


def test_submit_zip_round_trip(tmp_path):
    root = solved(tmp_path)
    out = tmp_path / "submission.zip"
    manifest = pack_submission(root, COURSE, out, "2026-01-01T00:00:00+00:00")
    names = set(zipfile.ZipFile(out).namelist())
    expected = {f"{u.dir}/{f}" for u in COURSE.units for f in u.files}
    assert names == expected | {"MANIFEST.json"} and set(manifest["files"]) == expected
    unit = grade(COURSE, out, ["unit1"], extra_args=FAST).units[0]
    ran = [g for g in unit.groups if g.total]
    assert ran and all(g.score == pytest.approx(g.max_score) for g in ran)


def test_stubs_grade_to_zero_with_every_unit_listed(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "autograder", "grade", "exercises", "--json", str(out), "--jobs", "2"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["score"] == 0 and report["max_score"] > 0
    assert [u["id"] for u in report["units"]] == [u.id for u in COURSE.units]
    for line in ("total", "0 / "):
        assert line in done.stdout


def test_gradescope_marks_ungraded_gpu_tests():
    from autograder.scoring import Report, TestResult, UnitResult

    unit = UnitResult("unit1", "U", tests=[TestResult("t_gpu", "fused_gpu", "hidden", "not_graded"),
                                         TestResult("t", "fused", "visible", "passed", score=1, max_score=1)])
    results = gradescope_results(Report("c", "1", [unit], "bwrap"), COURSE)
    gpu, ok = results["tests"]
    assert "status" not in gpu and gpu["max_score"] == 0 and "needs a CUDA GPU" in gpu["output"]
    assert ok["status"] == "passed" and ok["visibility"] == "visible"


@pytest.mark.parametrize("feedback", ["summary", "none"])
def test_passing_tests_report_what_they_measured(tmp_path, feedback):
    course = COURSE.model_copy(update={"hidden_feedback": feedback})
    report = grade(course, solved(tmp_path), ["unit4"], isolation="inprocess", extra_args=["-k", "cached_decode"])
    outputs = {t.visibility: t.output for t in report.units[0].tests if t.status == "passed"}
    assert set(outputs) == {"visible", "hidden"}, [(t.name, t.status) for t in report.units[0].tests]
    assert "256 new tokens" in outputs["visible"] and "x)" in outputs["visible"]
    # A course that shows nothing of its hidden tests shows nothing of what they measured either.
    assert ("256 new tokens" in outputs["hidden"]) == (feedback != "none")


def test_a_todo_stops_a_hypothesis_test_at_its_first_example(tmp_path):
    """Shrinking examples that all stop at the same TODO costs a stub hundreds of calls into its
    worker and teaches nothing: the plugin ends the test at the first one, reported as the TODO."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_todo.py").write_text(
        "from hypothesis import given, strategies as st\n"
        "CALLS = []\n"
        "@given(st.text())\n"
        "def test_stub(text):\n"
        "    CALLS.append(text)\n"
        "    raise NotImplementedError('TODO: fill in tokenize')\n"
        "@given(st.integers())\n"
        "def test_wrong(x):\n"
        "    assert x < 100\n"
        "def test_one_example_ran():\n"
        "    assert len(CALLS) == 1, CALLS\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "autograder.plugin", "-p", "no:cacheprovider", "-q",
                          "test_todo.py"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert "2 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    assert "TODO: fill in tokenize (not written yet: test_todo.py line 6)" in run.stdout, run.stdout
    # A real failure is still shrunk to its smallest example.
    assert "x=100" in run.stdout, run.stdout
