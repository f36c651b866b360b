"""course.yml is validated on load, with errors that say where."""

import textwrap

import pytest

from autograder.manifest import ManifestError, load_course

GOOD = """
course: c
title: T
version: "1"
units:
  - id: unit1
    title: U
    dir: unit1
    files: [a.py]
    groups:
      - {id: g, title: G, points: 10}
"""


def write(tmp_path, text):
    path = tmp_path / "course.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_course_manifest_loads(course):
    assert course.units and all(u.points > 0 for u in course.units)
    assert course.points == sum(u.points for u in course.units)


def test_a_minimal_manifest(tmp_path):
    course = load_course(write(tmp_path, GOOD))
    assert course.unit("unit1").points == 10
    assert course.limits_for(course.unit("unit1")).call_timeout == 30


@pytest.mark.parametrize("change, expected", [
    (("points: 10", "points: -1"), "units[0] (unit1).groups[0] (g).points"),
    (("files: [a.py]", "files: [../a.py]"), "units[0] (unit1).files"),
    (("dir: unit1", "dir: Unit 1"), "units[0] (unit1).dir"),
    (("title: U\n", "title: U\n    colour: red\n"), "units[0] (unit1).colour"),
    (("course: c\n", ""), "course: Field required"),
])
def test_errors_name_the_place(tmp_path, change, expected):
    with pytest.raises(ManifestError) as info:
        load_course(write(tmp_path, GOOD.replace(*change)))
    assert expected in str(info.value)


def test_unknown_unit_lists_the_known_ones(course):
    with pytest.raises(ManifestError, match="unit1"):
        course.unit("nope")


def test_not_yaml(tmp_path):
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_course(write(tmp_path, "units: [\n"))


def test_duplicate_units(tmp_path):
    text = GOOD + GOOD[GOOD.index("  - id: unit1"):]
    with pytest.raises(ManifestError, match="unit ids repeat"):
        load_course(write(tmp_path, text))
