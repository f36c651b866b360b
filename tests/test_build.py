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


def _notebook(*cells):
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=list(cells))
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index}"  # fixed ids: the generated notebook must be byte-stable
    return notebook


def test_notebook_stub_is_the_same_stub_per_code_cell_without_outputs():
    import nbformat

    from autograder.build import make_notebook_stub

    solved = nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\n"
                                       "f(3)", execution_count=4,
                                       outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "6"})])
    source = nbformat.writes(_notebook(nbformat.v4.new_markdown_cell("### BEGIN SOLUTION in prose"), solved))
    stub = make_notebook_stub(source, "u.ipynb", "exercises/unitX/u.ipynb")
    notebook = nbformat.reads(stub, as_version=4)
    markdown, code = notebook.cells
    assert markdown.source == "### BEGIN SOLUTION in prose"  # markdown is never code
    assert "2 * x" not in code.source and code.source.endswith("f(3)")
    assert '    raise NotImplementedError("TODO: fill in f in exercises/unitX/u.ipynb")' in code.source
    assert code.outputs == [] and code.execution_count is None
    assert make_notebook_stub(source, "u.ipynb", "exercises/unitX/u.ipynb") == stub


def test_notebook_markers_are_checked_like_a_py_file():
    import nbformat

    from autograder.build import make_notebook_stub

    source = nbformat.writes(_notebook(nbformat.v4.new_code_cell("x = 1\n### END SOLUTION")))
    with pytest.raises(MarkerError, match=r"u.ipynb \(cell 0\):2: END SOLUTION without a BEGIN"):
        make_notebook_stub(source, "u.ipynb", "exercises/unitX/u.ipynb")


def test_notebook_drift_is_reported_and_build_strips_outputs(course, tmp_path):
    import shutil

    import nbformat

    from autograder.build import build
    from autograder.manifest import REPO_ROOT

    for tree in ("solutions", "exercises"):
        shutil.copytree(REPO_ROOT / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    solution = tmp_path / "solutions/unit1/unit1.ipynb"
    notebook = nbformat.read(solution, as_version=4)
    index, cell = next((i, c) for i, c in enumerate(notebook.cells) if c.cell_type == "code")
    cell.source += "\nprint('changed')"
    cell.outputs = [nbformat.v4.new_output("stream", text="changed\n")]
    nbformat.write(notebook, solution)
    assert drift(course, tmp_path) == ["exercises/unit1/unit1.ipynb: differs from its solution"]
    assert build(course, tmp_path) == [tmp_path / "exercises/unit1/unit1.ipynb"]
    learner = nbformat.read(tmp_path / "exercises/unit1/unit1.ipynb", as_version=4)
    assert "print('changed')" in learner.cells[index].source and learner.cells[index].outputs == []
    assert drift(course, tmp_path) == []
