"""Course integrity: the solutions earn full marks, the stubs earn nothing, every TODO region
is needed, and every mutant (a plausible wrong solution) is caught by the hidden suite."""

import pytest

from autograder.manifest import REPO_ROOT, load_course
from autograder.runner import grade
from autograder.scoring import NOT_GRADED
from tests.course_checks import (all_regions, apply_mutant, copy_solutions, failing_tests, load_mutants,
                                 stub_one_region)

COURSE = load_course()


@pytest.mark.parametrize("unit_id", [u.id for u in COURSE.units])
def test_solutions_score_full_marks(course, unit_id):
    report = grade(course, REPO_ROOT / "solutions", [unit_id])
    unit = report.units[0]
    assert unit.error is None, unit.error
    wrong = [f"{t.name}: {t.status}: {t.output}" for t in unit.tests if t.status not in ("passed", NOT_GRADED)]
    assert not wrong, "the solution fails:\n" + "\n".join(wrong)
    assert unit.score == pytest.approx(unit.max_score) and unit.max_score > 0
    assert report.isolation in ("bwrap", "user"), f"grading ran without a sandbox: {report.isolation_note}"
    assert unit.unplanned_restarts == 0, ("a test calls learner.restart() without @pytest.mark.fresh_worker, so "
                                          "it waits for a whole worker start-up instead of finding one started ahead")


@pytest.mark.parametrize("unit_id", [u.id for u in COURSE.units])
def test_stubs_score_zero_on_every_graded_test(course, unit_id):
    unit = grade(course, REPO_ROOT / "exercises", [unit_id]).units[0]
    assert unit.error is None, unit.error
    passing = [t.name for t in unit.tests if t.status == "passed"]
    assert not passing, f"these tests pass on the untouched stubs: {passing}"
    assert unit.score == 0
    unit_cfg = course.unit(unit_id)
    tested = {t.group for t in unit.tests}
    assert tested == {g.id for g in unit_cfg.groups}, "every course.yml group needs tests, and only those"


@pytest.mark.parametrize("unit_id, name, index, owner", all_regions(COURSE),
                         ids=[f"{u}-{n}-{o}" for u, n, _, o in all_regions(COURSE)])
def test_every_todo_region_is_exercised(course, tmp_path, unit_id, name, index, owner):
    root = copy_solutions(tmp_path)
    unit = course.unit(unit_id)
    file = root / unit.dir / name
    file.write_text(stub_one_region(file.read_text(), index, name))
    failed = failing_tests(course, root, unit_id)
    assert failed, f"no test fails when only {owner} in {unit.dir}/{name} is left as a TODO"


def test_in_process_checks_grade_the_copy_not_the_exercises(course, tmp_path):
    """The region and mutant checks grade in-process, where pytest has already imported the visible
    tests as part of exercises/unit4: the copy under test must still be what the learner fixture
    imports (else every check fails on the stubs and proves nothing)."""
    report = grade(course, copy_solutions(tmp_path), ["unit4"], isolation="inprocess",
                   extra_args=["-k", "decode_step_matches_full_model"])
    (test,) = report.units[0].tests
    assert test.visibility == "visible" and test.status == "passed", test.output


@pytest.mark.parametrize("unit_id, mutant", load_mutants(COURSE), ids=[f"{u}-{m['name']}" for u, m in load_mutants(COURSE)])
def test_hidden_suite_catches_mutant(course, tmp_path, unit_id, mutant):
    """Caught; and where the mutant names its ``hint``, the (summarised) hidden failure says it."""
    root = copy_solutions(tmp_path)
    apply_mutant(root, course.unit(unit_id).dir, mutant)
    failed = failing_tests(course, root, unit_id, visible=False)
    assert failed, f"mutant {mutant['name']!r} survived the hidden suite of {unit_id}: {mutant['description']}"
    if "hint" in mutant:
        assert any(mutant["hint"] in t.output for t in failed), (
            f"mutant {mutant['name']!r} is caught, but the hint {mutant['hint']!r} is not in what the learner sees:\n"
            + failed[0].output)


VISIBLE = [(u, m) for u, m in load_mutants(COURSE) if "visible_hint" in m]


@pytest.mark.parametrize("unit_id, mutant", VISIBLE, ids=[f"{u}-{m['name']}" for u, m in VISIBLE])
def test_visible_tests_name_the_mistake(course, tmp_path, unit_id, mutant):
    """A mistake the handout promises the visible tests catch: ``pytest exercises/unitN`` fails on it,
    with the hint the handout names (``visible_hint``)."""
    root = copy_solutions(tmp_path)
    apply_mutant(root, course.unit(unit_id).dir, mutant)
    failed = failing_tests(course, root, unit_id, hidden=False)
    assert failed, f"mutant {mutant['name']!r} passes the visible tests of {unit_id}: {mutant['description']}"
    assert any(mutant["visible_hint"] in t.output for t in failed), (
        f"the visible tests catch {mutant['name']!r} without the hint {mutant['visible_hint']!r}:\n" + failed[0].output)


@pytest.mark.parametrize("unit_id", [u.id for u in COURSE.units])
def test_enough_mutants(unit_id):
    names = [m["name"] for u, m in load_mutants(COURSE) if u == unit_id]
    assert len(names) >= 6 and len(set(names)) == len(names)


def test_gpu_mutants_apply_to_the_solutions(tmp_path):
    """The GPU mutants are graded on a GPU machine (benchmarks/gpu_mutants.py); here, on any
    machine, each must still apply to the current solutions so that run cannot go stale."""
    from benchmarks.gpu_mutants import GPU_MUTANTS, apply

    import yaml

    mutants = yaml.safe_load(GPU_MUTANTS.read_text())
    assert {m["unit"] for m in mutants} >= {"unit1", "unit2", "unit4", "unit5", "unit6"}
    for mutant in mutants:
        root = copy_solutions(tmp_path / mutant["name"])
        apply(root, COURSE.unit(mutant["unit"]).dir, mutant)


@pytest.mark.parametrize("unit_id", [u.id for u in COURSE.units])
def test_no_visible_test_shares_a_name_with_a_hidden_one(unit_id):
    """With hidden_feedback "none" a report names no hidden test; a visible test of the same name
    would name it anyway."""
    import ast

    from autograder.runner import HIDDEN_ROOT

    def names(paths):
        return {node.name for path in paths for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}

    unit = COURSE.unit(unit_id)
    shared = names((REPO_ROOT / "solutions" / unit.dir).glob("test_*.py")) & names((HIDDEN_ROOT / unit_id).glob("test_*.py"))
    assert not shared, f"{unit_id}: visible and hidden tests share the names {sorted(shared)}"
