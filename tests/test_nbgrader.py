"""`course nbgrader export` round trip with the real nbgrader: generate_assignment, a solved and an
unsolved submission, autograde; the gradebook holds the points `course grade` gives."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from autograder.build import find_regions
from autograder.manifest import REPO_ROOT
from autograder.nbgrading import export

UNIT = "unit1"  # the fastest unit to grade
GPU_GROUPS = {"fused_gpu"}  # its groups whose tests all need CUDA: no graded cell


@pytest.fixture(scope="module")
def course_dir(course, tmp_path_factory):
    out = tmp_path_factory.mktemp("nbgrader") / "course"
    export(course, out, [UNIT])
    return out


def nbgrader(course_dir: Path, *args: str) -> None:
    # nbgrader runs `alembic` for its database: the environment's scripts must be on the PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_export_writes_stubs_and_graded_cells(course, course_dir):
    unit = course.unit(UNIT)
    source = course_dir / "source" / unit.dir
    for path in source.rglob("*.py"):
        assert not find_regions(path.read_text(), str(path)), f"{path}: a solution body in a supporting file"
        if path.name in unit.files:
            assert "NotImplementedError" in path.read_text()
    config = (course_dir / "nbgrader_config.py").read_text()
    assert f"c.Autograde.exclude_overwriting = {{{unit.dir!r}: {list(unit.files)!r}}}" in config
    graded = [c.metadata.nbgrader for c in nbformat.read(source / f"{unit.dir}.ipynb", as_version=4).cells
              if c.metadata.get("nbgrader", {}).get("grade")]
    assert [(g["grade_id"], g["points"]) for g in graded] == \
        [(f"{UNIT}-{g.id}", g.points) for g in unit.groups if g.id not in GPU_GROUPS]


def test_nbgrader_round_trip_gives_the_points_course_grade_gives(course, course_dir, tmp_path):
    unit = course.unit(UNIT)
    nbgrader(course_dir, "generate_assignment", unit.dir)
    release = course_dir / "release" / unit.dir
    released = (release / f"{unit.dir}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in released and "group_score" not in released and "np.meshgrid(np.linspace" not in released

    submitted = course_dir / "submitted"
    shutil.copytree(release, submitted / "unsolved" / unit.dir)
    shutil.copytree(release, submitted / "solved" / unit.dir)
    for name in unit.files:
        shutil.copyfile(REPO_ROOT / "solutions" / unit.dir / name, submitted / "solved" / unit.dir / name)
    # `course grade` on the solved files, alongside nbgrader's autograde.
    grade_json = tmp_path / "grade.json"
    course_grade = subprocess.Popen([sys.executable, "-m", "autograder", "grade", str(submitted / "solved"),
                                     "--unit", UNIT, "--json", str(grade_json)], cwd=REPO_ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        nbgrader(course_dir, "autograde", unit.dir)
    finally:
        assert course_grade.wait(timeout=600) == 0
    graded = json.loads(grade_json.read_text())["units"][0]
    assert graded["score"] == graded["max_score"] > 0
    # GPU groups are graded by `course grade` only (and only where CUDA is found).
    want = {g["id"]: g["score"] for g in graded["groups"] if g["id"] not in GPU_GROUPS}

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gradebook:
        solved = gradebook.find_submission(unit.dir, "solved")
        unsolved = gradebook.find_submission(unit.dir, "unsolved")
        by_group = {g.name.removeprefix(f"{UNIT}-"): g.score for nb in solved.notebooks for g in nb.grades}
        assert by_group == pytest.approx(want)
        assert solved.score == solved.max_score == pytest.approx(sum(want.values()))
        assert (unsolved.score, unsolved.max_score) == (0, solved.max_score)
