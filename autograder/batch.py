"""Grading a whole class: a folder of submissions, in parallel, resumable, into a gradebook.

Each submission (a zip from `course submit` or a folder laid out like exercises/; the learner id is
its name without the suffix) is taken in here and packed as bytes (``pack``), then graded by one task,
``grade_packed``, in the same sandbox as `course grade`, so learner code only ever runs in a sandboxed
worker and a crash or a hostile submission costs only its own tests.  Tasks run on a local thread
pool, or on a Dask cluster (``cluster_executor``): the per-learner task is the same.  Each finished
learner's JSON report is written atomically to the state folder; a rerun skips learners whose
report is there, so an interrupted batch resumes where it stopped.  A submission that cannot be
graded at all (an unsafe zip) is stored with its reason and 0 points; an unexpected failure of the
grader itself is recorded in the gradebook but not stored, so the next run tries it again.

The GPU pass (``only_gpu``) grades just the GPU-marked tests and merges them into the stored
reports: the "not graded" GPU tests are replaced and the units rescored with ``score_unit``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import zipfile
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autograder.manifest import Course, load_course
from autograder.runner import grade_intake
from autograder.scoring import NOT_GRADED, Report, score_unit, unit_from_json
from autograder.submission import Intake, SubmissionError, take_in

GPU_ARGS = ["-m", "gpu", "--gpu", "require"]


@dataclass
class Outcome:
    learner: str
    report: dict | None  # the course's JSON report (Report.to_json), None when grading failed
    error: str = ""  # why there is no report, or why it scores 0
    skipped: bool = False  # already done by an earlier run


def find_submissions(folder: Path) -> dict[str, Path]:
    """learner id -> zip or folder, sorted by id."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not (path.is_dir() or path.suffix == ".zip"):
            continue  # a symlinked entry is kept here and refused, with its reason, at intake
        learner = path.stem if path.is_file() else path.name
        if learner in found:
            raise SubmissionError(f"two submissions for {learner!r}: {found[learner].name} and {path.name}")
        found[learner] = path
    return found


def load_state(state_dir: Path, learner: str) -> dict | None:
    try:
        return json.loads((state_dir / f"{learner}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # not done yet, or cut off mid-write by an old crash
        return None


def save_state(state_dir: Path, learner: str, report: dict) -> None:
    target = state_dir / f"{learner}.json"
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=1), encoding="utf-8")
    os.replace(partial, target)  # a run killed mid-write never leaves half a report behind


def _refused(course: Course, units: list[str], reason: str) -> dict:
    """The report of a submission that could not be taken in: every unit at 0 of its points."""
    chosen = [course.unit(u) for u in units] if units else list(course.units)
    return {"score": 0.0, "max_score": sum(u.points for u in chosen), "course": course.course,
            "version": course.version, "refused": reason,
            "units": [{"id": u.id, "title": u.title, "score": 0.0, "max_score": u.points, "notes": [reason],
                       "error": None, "tests": [], "groups": []} for u in chosen]}


def merge_gpu(course: Course, stored: dict, gpu: dict) -> dict:
    """``stored`` with its not-graded GPU tests replaced by those ``gpu`` graded, units rescored."""
    merged = json.loads(json.dumps(stored))
    gpu_units = {u["id"]: u for u in gpu["units"]}
    units = []
    for data in merged["units"]:
        result = unit_from_json(data)
        graded = {t["name"]: t for t in gpu_units.get(result.id, {}).get("tests", []) if t["status"] != NOT_GRADED}
        for test in result.tests:
            if test.status == NOT_GRADED and test.name in graded:
                test.status, test.output = graded[test.name]["status"], graded[test.name].get("output", "")
        score_unit(course, course.unit(result.id), result)
        units.append(result)
    rescored = Report(stored["course"], stored["version"], units, stored.get("isolation", ""),
                      stored.get("isolation_note", ""), stored.get("seconds", 0.0)).to_json()
    rescored["gpu_pass"] = True
    return rescored


NOTES = "intake-notes.json"


def pack(course: Course, path: Path, units: list[str] | None) -> bytes:
    """Take a submission in here, where it lies (every intake check: unsafe zips, symbolic links,
    sizes, syntax, forbidden names), and pack what the grader reads, with the intake's notes, as
    bytes: what reaches a grading node, never a path on a filesystem the learner could write to."""
    chosen = [course.unit(u) for u in units] if units else list(course.units)
    intake = take_in(path, course, chosen)
    try:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(intake.root.rglob("*")):
                if file.is_file():
                    archive.write(file, file.relative_to(intake.root).as_posix())
            archive.writestr(NOTES, json.dumps(intake.notes))
        return buffer.getvalue()
    finally:
        intake.cleanup()


def grade_packed(payload: bytes, course_data: dict, units: list[str] | None, extra_args: list[str],
                 isolation: str) -> dict:
    """Grade one packed submission on this machine (a node of the cluster, or the local pool), in
    the same sandbox as `course grade`; the report comes back as data.  The one per-learner task."""
    local = load_course()
    if local.version != course_data["version"]:
        raise RuntimeError(f"this grading node has course version {local.version}, the batch {course_data['version']}: "
                           "install the same course everywhere")
    course = Course.model_validate(course_data)
    chosen = [course.unit(u) for u in units] if units else list(course.units)
    learner_files = {f"{u.dir}/{name}" for u in chosen for name in u.files}
    with tempfile.TemporaryDirectory(prefix="course-packed-") as tmp:
        root = Path(tmp) / "submission"
        for unit in chosen:
            (root / unit.dir).mkdir(parents=True)
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            notes = json.loads(archive.read(NOTES))
            for name in archive.namelist():
                if name in learner_files:  # the packer wrote only these; anything else is not ours
                    (root / name).write_bytes(archive.read(name))
        report = grade_intake(course, Intake(root=root, notes=notes), chosen, isolation=isolation, extra_args=extra_args)
    return report.to_json()


def _already_done(state_dir: Path, learner: str, only_gpu: bool) -> tuple[dict | None, Outcome | None]:
    """(the stored report, an outcome if nothing is left to do for this learner)."""
    stored = load_state(state_dir, learner)
    if only_gpu:
        if stored is None:
            return None, Outcome(learner, None, "no CPU report to merge into: grade the batch without --only gpu first")
        if stored.get("gpu_pass") or stored.get("refused"):
            return stored, Outcome(learner, stored, skipped=True)
    elif stored is not None:
        return stored, Outcome(learner, stored, skipped=True)
    return stored, None


def _finish(course: Course, state_dir: Path, learner: str, stored: dict | None, future, only_gpu: bool) -> Outcome:
    try:
        report = future.result()
    except Exception as exc:  # noqa: BLE001  (the batch goes on; the next run retries this learner)
        return Outcome(learner, None, f"the grader failed: {type(exc).__name__}: {exc}")
    if any(u.get("error") for u in report["units"]):
        # A course-side failure (e.g. an overloaded machine): report it, retry it on the next run.
        return Outcome(learner, report, "a unit could not be graded; rerun to retry")
    if only_gpu:
        report = merge_gpu(course, stored, report)
    save_state(state_dir, learner, report)
    return Outcome(learner, report)


def grade_all(course: Course, folder: Path, state_dir: Path, *, units: list[str] | None = None, jobs: int = 2,
              only_gpu: bool = False, isolation: str = "auto", executor: Executor | None = None,
              on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Grade every submission in ``folder``; returns outcomes sorted by learner.

    Each learner still to grade becomes one ``grade_packed`` task on ``executor``: a local thread
    pool of ``jobs`` (the default), or a cluster's (``cluster_executor``).  Submissions are packed
    here and reports stored here as tasks finish, so an interrupted run resumes, and a task that is
    retried elsewhere (a node that died) still gives one row."""
    submissions = find_submissions(folder)
    state_dir.mkdir(parents=True, exist_ok=True)
    extra = GPU_ARGS if only_gpu else []
    outcomes: list[Outcome] = []

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)

    own_pool = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        pending = {}
        for learner, path in submissions.items():
            stored, done = _already_done(state_dir, learner, only_gpu)
            if done is not None:
                record(done)
                continue
            if path.is_dir() and (path / "exercises").is_dir():
                path = path / "exercises"  # a clone of the learner's repository (GitHub Classroom)
            try:
                payload = pack(course, path, units)
            except SubmissionError as exc:
                report = _refused(course, units or [], f"could not grade this submission: {exc}")
                save_state(state_dir, learner, report)
                record(Outcome(learner, report))
                continue
            future = pool.submit(grade_packed, payload, course.model_dump(mode="json"), units, extra, isolation)
            pending[future] = (learner, stored)
        for future in as_completed(pending):
            learner, stored = pending[future]
            record(_finish(course, state_dir, learner, stored, future, only_gpu))
    finally:
        if own_pool:
            pool.shutdown()
    return sorted(outcomes, key=lambda o: o.learner)


def cluster_executor(address: str, gpu: bool = False):
    """(an Executor whose tasks run on the Dask cluster at ``address``, its dashboard address or None).

    GPU tasks ask for the resource ``GPU``: they go only to nodes started with ``--resources GPU=1``;
    CPU tasks run anywhere.  ``pure=False``: two learners with the same files are still two tasks."""
    from distributed import Client

    client = Client(address, timeout="30s")
    kwargs = {"resources": {"GPU": 1}} if gpu else {}
    dashboard = client.dashboard_link if client.scheduler_info().get("services", {}).get("dashboard") else None
    return client.get_executor(pure=False, **kwargs), dashboard, client


def write_gradebook(course: Course, outcomes: list[Outcome], path: Path, units: list[str] | None = None) -> None:
    """learner, points per unit, total, max, note."""
    unit_ids = units or [u.id for u in course.units]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["learner", *unit_ids, "total", "max", "note"])
        for outcome in outcomes:
            report = outcome.report
            if report is None:
                writer.writerow([outcome.learner, *[""] * len(unit_ids), "", "", outcome.error])
                continue
            score = {u["id"]: u["score"] for u in report["units"]}
            writer.writerow([outcome.learner, *[_num(score[u]) if u in score else "" for u in unit_ids],
                             _num(report["score"]), _num(report["max_score"]),
                             outcome.error or report.get("refused", "")])


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")
