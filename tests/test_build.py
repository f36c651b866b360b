"""Stubs are generated from the solutions, and exercises/ never drifts from them."""

import ast

import pytest

from autograder.build import MarkerError, drift, find_regions, make_stub

SOLUTION = '''
def area(r):
    """Mentions ### BEGIN SOLUTION in a docstring: not a marker."""
    # TODO: pi r^2
    ### BEGIN SOLUTION
    return 3.14159 * r * r
    ### END SOLUTION


class Shape:
    def grow(self, k):
        x = 1
        ### BEGIN SOLUTION
        self.k = k
        ### END SOLUTION
        return x
'''


def test_regions_and_owners():
    regions = find_regions(SOLUTION, "s.py")
    assert [(r.owner) for r in regions] == ["area", "Shape.grow"]


def test_stub_replaces_regions_with_a_todo_error():
    stub = make_stub(SOLUTION, "s.py", "exercises/unitX/s.py")
    ast.parse(stub)
    assert "3.14159" not in stub and "self.k = k" not in stub
    assert 'raise NotImplementedError("TODO: fill in area in exercises/unitX/s.py")' in stub
    assert '        raise NotImplementedError("TODO: fill in Shape.grow in exercises/unitX/s.py")' in stub
    assert "# TODO: pi r^2" in stub and "Mentions ### BEGIN SOLUTION" in stub


@pytest.mark.parametrize("text, message", [
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside the region opened at line 1"),
    ("x = 1\n### END SOLUTION\n", "END SOLUTION without a BEGIN"),
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
])
def test_bad_markers_are_refused_with_the_line(text, message):
    with pytest.raises(MarkerError, match=message):
        find_regions(text, "bad.py")


def test_exercises_match_the_solutions(course):
    assert drift(course) == [], "run `course build` (make build) and commit exercises/"


def test_every_learner_file_has_a_todo(course):
    from autograder.manifest import REPO_ROOT

    for unit in course.units:
        for name in unit.files:
            source = (REPO_ROOT / "solutions" / unit.dir / name).read_text()
            assert find_regions(source, name), f"{unit.dir}/{name} has no solution region"
