"""Every unit's notebook runs end to end in a real Jupyter kernel: the solution notebook with its
plots, and the learner's (with every stub unfilled) without a traceback, pointing at the TODOs."""

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from autograder.manifest import REPO_ROOT, load_course

UNITS = [unit.dir for unit in load_course().units]
WHICH_ENVIRONMENT = "import sys; print(sys.prefix)"


def notebook_of(tree: str, unit: str) -> Path:
    path = REPO_ROOT / tree / unit / f"{unit}.ipynb"
    assert path.is_file(), f"{path.relative_to(REPO_ROOT)}: every unit has a notebook"
    return path


def execute(path: Path, extra_cells: list[str] = ()) -> nbformat.NotebookNode:
    """Run the notebook as Jupyter would (its own folder as the working directory); raises
    CellExecutionError, with the cell and the traceback, on the first cell that fails."""
    notebook = nbformat.read(path, as_version=4)
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in extra_cells]
    NotebookClient(notebook, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook


def outputs(notebook, output_type: str) -> list:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type == output_type]


def printed(notebook) -> str:
    return "".join(out.text for out in outputs(notebook, "stream"))


@pytest.mark.parametrize("unit", UNITS)
def test_solution_notebook_runs_and_plots(unit):
    notebook = execute(notebook_of("solutions", unit), [WHICH_ENVIRONMENT])
    # The kernel runs in the project's environment (its venv), not in whatever python3 is on the PATH.
    assert notebook.cells[-1].outputs[0].text.strip() == sys.prefix
    text = printed(notebook)
    assert "TODO" not in text and "Skipped" not in text, f"the solution notebook skipped a step:\n{text}"
    plots = [out for out in outputs(notebook, "display_data") if "image/png" in out.data]
    assert plots, f"{unit}.ipynb draws no plot"


@pytest.mark.parametrize("unit", UNITS)
def test_learner_notebook_points_at_the_todos_without_a_traceback(unit):
    path = notebook_of("exercises", unit)
    assert not any(outputs(nbformat.read(path, as_version=4), kind) for kind in ("stream", "display_data", "error")), \
        "exercises/ notebooks are committed without outputs"
    text = printed(execute(path))
    assert "TODO: fill in" in text and f"exercises/{unit}/" in text, text
