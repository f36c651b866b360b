"""The committed mutation table (tests/mutants/SCORES.md, made by `python -m benchmarks.mutation`)
describes the solutions as they are: each unit's solution regions still hash to the value its run
recorded, a row is the count of the committed results it was made from (tests/mutants/results/), a
finished run meets the goal, and every mutant listed as equivalent says why."""

import pytest

from autograder.manifest import load_course
from benchmarks.mutation import load_equivalent, read_scores, regions_hash, score_row, stored_results, tally

COURSE = load_course()
ROWS = read_scores()
GOAL = 0.95  # killed / (mutants - equivalent), per unit


@pytest.mark.parametrize("unit_id", sorted(ROWS))
def test_scores_row_is_current(unit_id):
    assert ROWS[unit_id]["hash"] == regions_hash(COURSE, unit_id), (
        f"{unit_id}'s solution regions changed after its mutation run: run python -m benchmarks.mutation --unit "
        f"{unit_id} --restart (and handle its survivors)")


@pytest.mark.parametrize("unit_id", sorted(u for u in ROWS if stored_results(u) is not None))
def test_scores_row_counts_the_committed_results(unit_id):
    # The equivalent list is read now: a mutant listed after the table was made moves from survived to
    # equivalent, and the row must be rebuilt (python -m benchmarks.mutation --report) to say so.
    expected = score_row(unit_id, tally(unit_id)[0])
    assert ROWS[unit_id]["line"] == expected, (
        f"{unit_id}'s row in SCORES.md is not the count of results/{unit_id}.jsonl and equivalent.yml:\n"
        f"  table:   {ROWS[unit_id]['line']}\n  results: {expected}\nrun python -m benchmarks.mutation --report")


@pytest.mark.parametrize("unit_id", sorted(u for u, row in ROWS.items() if row["pending"] == 0))
def test_finished_run_meets_the_goal(unit_id):
    score = float(ROWS[unit_id]["score"].rstrip("%")) / 100
    assert score >= GOAL, f"{unit_id}: mutation score {score:.1%} is under the {GOAL:.0%} goal"


def test_every_equivalent_mutant_has_a_reason():
    units = {u.id for u in COURSE.units}
    for entry in load_equivalent():
        assert {"unit", "file", "original", "mutated", "reason"} <= set(entry), entry
        assert entry["unit"] in units and entry["original"] != entry["mutated"], entry
        assert len(entry["reason"].split()) >= 4, f"say why this mutant breaks no promise: {entry}"
