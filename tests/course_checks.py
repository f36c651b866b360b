"""Helpers of the integrity tests: grading a variant of the solutions."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from autograder.build import find_regions, make_stub
from autograder.manifest import REPO_ROOT, Course
from autograder.runner import grade
from autograder.scoring import NOT_GRADED

MUTANTS_DIR = Path(__file__).parent / "mutants"


def load_mutants(course: Course) -> list[tuple[str, dict]]:
    found = []
    for unit in course.units:
        path = MUTANTS_DIR / f"{unit.id}.yml"
        if path.exists():
            found += [(unit.id, m) for m in yaml.safe_load(path.read_text())]
    return found


def apply_mutant(root: Path, unit_dir: str, mutant: dict) -> None:
    file = root / unit_dir / mutant["file"]
    text = file.read_text()
    for edit in mutant["edits"]:
        count = text.count(edit["find"])
        assert count == 1, f"mutant {mutant['name']}: its edit matches {count} places in {unit_dir}/{mutant['file']}"
        text = text.replace(edit["find"], edit["replace"])
    file.write_text(text)


def all_regions(course: Course) -> list[tuple[str, str, int, str]]:
    """(unit id, file, region index, owner) for every TODO region of every learner file."""
    out = []
    for unit in course.units:
        for name in unit.files:
            source = (REPO_ROOT / "solutions" / unit.dir / name).read_text()
            out += [(unit.id, name, i, r.owner) for i, r in enumerate(find_regions(source, name))]
    return out


def stub_one_region(source: str, index: int, filename: str) -> str:
    """The solution with only region ``index`` replaced by its TODO."""
    regions = find_regions(source, filename)
    drop = {line for i, r in enumerate(regions) if i != index for line in (r.begin, r.end)}
    kept = "".join(line for n, line in enumerate(source.splitlines(keepends=True), start=1) if n not in drop)
    return make_stub(kept, filename, filename)


def copy_solutions(tmp: Path) -> Path:
    target = tmp / "submission"
    shutil.copytree(REPO_ROOT / "solutions", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def failing_tests(course: Course, root: Path, unit_id: str, *, visible: bool = True, hidden: bool = True) -> list:
    """Grade one unit, stopping at the first failure; returns the failed tests.

    In-process: the verdicts are the same as isolated grading (the same tests on the same code),
    and these runs are many; isolation itself is tested in test_isolation and test_adversarial."""
    report = grade(course, root, [unit_id], visible=visible, hidden=hidden, isolation="inprocess", extra_args=["-x"])
    unit = report.units[0]
    assert unit.error is None, unit.error
    return [t for t in unit.tests if t.status not in ("passed", NOT_GRADED, "not_run")]
