"""benchmarks.mutation resumes in a new checkout: what one session graded (written to
tests/mutants/results/) comes back into a fresh session, mutant by mutant, while the learner files are
unchanged, and nothing comes back once they changed."""

import json
import shutil

import pytest
from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import TestOutcome as Outcome, WorkerOutcome, WorkResult

from autograder.manifest import REPO_ROOT, load_course
from benchmarks import mutation

UNIT = "unit5"  # the smallest unit: cosmic-ray's init of its files takes a second or two
COURSE = load_course()
DIFF = "--- mutation diff ---\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-    a = b + c\n+    a = b - c\n"
GRADED = [WorkResult(worker_outcome=WorkerOutcome.NORMAL, test_outcome=Outcome.KILLED,
                     output="hidden/test_lora_hidden.py::test_merge: failed: merged weights differ\nmore"),
          WorkResult(worker_outcome=WorkerOutcome.NORMAL, test_outcome=Outcome.SURVIVED, diff=DIFF),
          WorkResult(worker_outcome=WorkerOutcome.ABNORMAL, test_outcome=Outcome.INCOMPETENT, output="timeout")]


@pytest.fixture
def sessions(tmp_path, monkeypatch):
    monkeypatch.setattr(mutation, "STATE", tmp_path / "state")
    monkeypatch.setattr(mutation, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(REPO_ROOT)  # new_session works from the course root; put the cwd back after

    def open_new():
        folder = tmp_path / "state" / UNIT
        folder.mkdir(parents=True, exist_ok=True)
        return use_db(str(folder / "session.sqlite"))
    return tmp_path, open_new


def _graded(db):
    return {mutation._key(item): (r.worker_outcome, r.test_outcome, r.diff) for item, r in db.completed_work_items
            if r.worker_outcome != WorkerOutcome.SKIPPED}


def test_a_new_session_gets_back_what_an_earlier_one_graded(sessions):
    tmp_path, open_new = sessions
    with open_new() as db:
        assert mutation.new_session(COURSE, UNIT, db, restore=True) == 0.0  # nothing stored yet
        first = sorted(db.pending_work_items, key=mutation._key)[:len(GRADED)]
        for item, result in zip(first, GRADED):
            db.set_result(item.job_id, result)
        graded, pending = _graded(db), len(list(db.pending_work_items))
    (tmp_path / "state" / UNIT / "meta.json").write_text(json.dumps(
        {"regions_hash": mutation.regions_hash(COURSE, UNIT), "seconds": 90.0}))
    mutation.save_results(COURSE, UNIT)
    counts, survivors = mutation.tally(UNIT)
    assert (counts.killed, counts.survived, counts.pending, counts.mutants) == (2, 1, pending, pending + 3)
    assert survivors[0]["original"] == "a = b + c" and survivors[0]["mutated"] == "a = b - c"

    shutil.rmtree(tmp_path / "state")  # a new checkout: the results file, and no session
    with open_new() as db:
        assert mutation.new_session(COURSE, UNIT, db, restore=True) == 90.0
        assert _graded(db) == graded
        assert len(list(db.pending_work_items)) == pending


def test_nothing_comes_back_once_the_learner_files_changed(sessions, monkeypatch):
    tmp_path, open_new = sessions
    with open_new() as db:
        mutation.new_session(COURSE, UNIT, db, restore=True)
        item = next(iter(db.pending_work_items))
        db.set_result(item.job_id, GRADED[0])
    (tmp_path / "state" / UNIT / "meta.json").write_text(json.dumps(
        {"regions_hash": mutation.regions_hash(COURSE, UNIT), "seconds": 5.0}))
    mutation.save_results(COURSE, UNIT)
    shutil.rmtree(tmp_path / "state")
    # cosmic-ray numbers a file's mutants through the whole file: an edit anywhere renumbers them
    monkeypatch.setattr(mutation, "files_hash", lambda course, unit_id: "edited")
    with open_new() as db:
        assert mutation.new_session(COURSE, UNIT, db, restore=True) == 0.0
        assert _graded(db) == {}
