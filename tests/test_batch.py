"""`course grade-all`: a class of submissions, one unit, in parallel; resuming; the GPU pass merge."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from autograder import batch
from autograder.manifest import REPO_ROOT, load_course
from autograder.reporters import feedback_markdown
from autograder.scoring import Report, UnitResult, score_unit
from autograder.scoring import TestResult as Result  # (not a pytest test class)
from autograder.submission import pack_submission

COURSE = load_course()
UNIT1 = COURSE.unit("unit1")


def _unit1(folder: Path, source: Path = REPO_ROOT / "solutions") -> Path:
    (folder / "unit1").mkdir(parents=True)
    for name in UNIT1.files:
        shutil.copy(source / "unit1" / name, folder / "unit1" / name)
    return folder


def _report(unit_id: str, tests: list[Result]) -> dict:
    unit = score_unit(COURSE, COURSE.unit(unit_id), UnitResult(unit_id, COURSE.unit(unit_id).title, tests=tests))
    return Report(COURSE.course, COURSE.version, [unit], "bwrap").to_json()


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["learner"]: row for row in csv.DictReader(f)}


def test_grade_all_one_unit_end_to_end(tmp_path):
    subs = tmp_path / "submissions"
    _unit1(subs / "solved" / "exercises")  # a clone of the learner's repository
    broken = _unit1(subs / "broken")
    (broken / "unit1" / "autograd.py").write_text("class Value:\n    def __init__(self, data\n")
    hostile = _unit1(subs / "hostile", REPO_ROOT / "exercises")
    # The worker dies the moment it imports fused.py (each of its tests restarts it: few tests, kept short).
    (hostile / "unit1" / "fused.py").write_text("import os\nos._exit(0)\n")
    pack_submission(REPO_ROOT / "exercises", COURSE, subs / "stub.zip", "2026-01-01T00:00:00+00:00")
    with zipfile.ZipFile(subs / "unsafe.zip", "w") as archive:
        archive.writestr("/etc/evil.py", "x")
    _unit1(subs / "resumed", REPO_ROOT / "exercises")
    state = tmp_path / "grades.csv.d"
    state.mkdir()
    done_before = _report("unit1", [Result("test_autograd.py::test_add_and_mul", "value_ops", "visible", "passed")])
    (state / "resumed.json").write_text(json.dumps(done_before))  # an interrupted batch had graded this one

    cmd = [sys.executable, "-m", "autograder", "grade-all", str(subs), "--csv", str(tmp_path / "grades.csv"),
           "--jobs", "2", "--unit", "unit1", "--feedback", str(tmp_path / "feedback")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed: done before" in done.stdout
    rows = _rows(tmp_path / "grades.csv")
    assert list(rows) == ["broken", "hostile", "resumed", "solved", "stub", "unsafe"]
    assert list(rows["solved"]) == ["learner", "unit1", "total", "max", "note"]
    full = float(rows["solved"]["max"])
    assert float(rows["solved"]["unit1"]) == float(rows["solved"]["total"]) == full == UNIT1.points - 10  # GPU part ungraded
    assert 0 < float(rows["broken"]["total"]) < full
    assert float(rows["hostile"]["total"]) == float(rows["stub"]["total"]) == 0
    assert float(rows["resumed"]["total"]) == done_before["score"] == 15  # not regraded: a stub would score 0
    assert float(rows["unsafe"]["total"]) == 0 and "absolute path" in rows["unsafe"]["note"]
    assert {p.stem for p in state.glob("*.json")} == set(rows)

    feedback = {p.stem: p.read_text() for p in (tmp_path / "feedback").glob("*.md")}
    assert set(feedback) == set(rows)
    assert f"Total: {full:g} / {full:g}" in feedback["solved"]
    assert "unit1/autograd.py:2: SyntaxError" in feedback["broken"]
    assert "exited with code 0" in feedback["hostile"] or "os._exit" in feedback["hostile"]
    assert "hidden/test_" in feedback["stub"]  # course.yml's hidden_feedback is "summary": names, one line each

    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("done before") == len(rows), again.stdout
    assert _rows(tmp_path / "grades.csv") == rows

    # The same stored report, with hidden_feedback "none": no hidden test named, counts only.
    stub = json.loads((state / "stub.json").read_text())
    silent = feedback_markdown(stub, COURSE.model_copy(update={"hidden_feedback": "none"}), "stub")
    hidden_names = [t["name"].split("::")[-1] for t in stub["units"][0]["tests"] if t["visibility"] == "hidden"]
    assert hidden_names and "hidden/" not in silent
    assert not [n for n in hidden_names if re.search(rf"(?<![\w\[]){re.escape(n)}(?![\w\[])", silent)]
    assert "hidden test(s) failed; the course does not show which" in silent


def test_a_grader_failure_is_recorded_and_retried(tmp_path, monkeypatch):
    subs = tmp_path / "subs"
    for learner in ("ann", "bob"):
        (subs / learner / "unit1").mkdir(parents=True)
        (subs / learner / "unit1" / "autograd.py").write_text(f"# {learner}\n")
    calls = []

    def fake_grade(course, intake, units, **kwargs):
        learner = (intake.root / "unit1" / "autograd.py").read_text()[2:].strip()  # the packed file says whose
        calls.append(learner)
        if learner == "bob":
            raise RuntimeError("out of disk")
        unit = UnitResult("unit1", "t", tests=[Result("t.py::a", "value_ops", "visible", "passed")])
        return Report(course.course, course.version, [score_unit(course, UNIT1, unit)])

    monkeypatch.setattr(batch, "grade_intake", fake_grade)
    state = tmp_path / "state"
    outcomes = {o.learner: o for o in batch.grade_all(COURSE, subs, state, units=["unit1"], jobs=2)}
    assert outcomes["ann"].report["score"] == 15 and not outcomes["ann"].error
    assert outcomes["bob"].report is None and "RuntimeError: out of disk" in outcomes["bob"].error
    assert [p.stem for p in state.glob("*.json")] == ["ann"]
    batch.write_gradebook(COURSE, list(outcomes.values()), tmp_path / "g.csv", ["unit1"])
    assert "out of disk" in _rows(tmp_path / "g.csv")["bob"]["note"]
    batch.grade_all(COURSE, subs, state, units=["unit1"], jobs=2)
    assert sorted(calls) == ["ann", "bob", "bob"]  # ann was done; bob is tried again


def test_gpu_pass_merges_into_stored_reports(tmp_path, monkeypatch):
    cpu = [Result("test_fused.py::test_forward_matches_torch", "fused", "visible", "passed"),
           Result("hidden/test_fused_hidden.py::test_bf16", "fused_gpu", "hidden", "not_graded"),
           Result("hidden/test_fused_hidden.py::test_memory", "fused_gpu", "hidden", "not_graded")]
    stored = _report("unit1", cpu)
    fused_gpu = next(g for g in stored["units"][0]["groups"] if g["id"] == "fused_gpu")
    assert fused_gpu["max_score"] == 0
    gpu = _report("unit1", [Result("hidden/test_fused_hidden.py::test_bf16", "fused_gpu", "hidden", "passed"),
                            Result("hidden/test_fused_hidden.py::test_memory", "fused_gpu", "hidden", "failed",
                                       "peak memory 3x the input")])
    merged = batch.merge_gpu(COURSE, stored, gpu)
    groups = {g["id"]: g for g in merged["units"][0]["groups"]}
    assert groups["fused_gpu"]["max_score"] == 10 and groups["fused_gpu"]["score"] == 5
    assert groups["fused"]["score"] == 20  # the CPU results are kept
    tests = {t["name"]: t for t in merged["units"][0]["tests"]}
    assert tests["hidden/test_fused_hidden.py::test_memory"]["output"] == "peak memory 3x the input"
    assert merged["score"] == stored["score"] + 5 and merged["max_score"] == stored["max_score"] + 10
    assert merged["gpu_pass"]

    # Through grade_all: GPU-only grading, merged and stored; a second GPU pass skips the learner.
    for learner in ("ann", "cid"):
        (tmp_path / "subs" / learner / "unit1").mkdir(parents=True)
        (tmp_path / "subs" / learner / "unit1" / "autograd.py").write_text(f"# {learner}\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / "ann.json").write_text(json.dumps(stored))
    seen = []

    def fake_grade(course, intake, units, extra_args=None, **kwargs):
        seen.append(((intake.root / "unit1" / "autograd.py").read_text()[2:].strip(), extra_args))
        units_ = [UnitResult(u["id"], u["title"]) for u in gpu["units"]]
        for unit, data in zip(units_, gpu["units"]):
            unit.tests = [Result(t["name"], t["group"], t["visibility"], t["status"], t["output"]) for t in data["tests"]]
            score_unit(course, UNIT1, unit)
        return Report(course.course, course.version, units_)

    monkeypatch.setattr(batch, "grade_intake", fake_grade)
    outcomes = {o.learner: o for o in batch.grade_all(COURSE, tmp_path / "subs", state, jobs=1, only_gpu=True)}
    assert seen == [("ann", batch.GPU_ARGS)]  # cid has no CPU report to merge into: not graded
    assert "grade the batch without --only gpu first" in outcomes["cid"].error
    assert json.loads((state / "ann.json").read_text())["score"] == merged["score"]
    batch.grade_all(COURSE, tmp_path / "subs", state, jobs=1, only_gpu=True)
    assert len(seen) == 1


def test_gpu_pass_fails_loudly_without_a_gpu(tmp_path):
    (tmp_path / "subs").mkdir()
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also a machine without one where there is one
    done = subprocess.run([sys.executable, "-m", "autograder", "grade-all", str(tmp_path / "subs"), "--csv",
                           str(tmp_path / "g.csv"), "--only", "gpu"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=no_gpu)
    assert done.returncode != 0 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "g.csv").exists()
