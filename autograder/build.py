"""Generate the learner's stubs from the solutions (the single source of truth).

Solution code sits between two lines that hold exactly ``### BEGIN SOLUTION`` and
``### END SOLUTION`` (nothing else on the line, so a docstring that mentions the marker text
never opens a region).  A region becomes ``raise NotImplementedError`` with a message naming the
function to fill in, indented like the BEGIN line, as nbgrader's ClearSolutions does.

Notebooks (``.ipynb``) go through the same code path cell by cell: each code cell's regions become
the same stubs, and outputs and execution counts are dropped, so exercises/ holds clean notebooks.
Code cells are parsed like a .py file, so they hold plain Python (no ``%magics``)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from autograder.manifest import REPO_ROOT, Course

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
SKIPPED_NAMES = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".hypothesis"}


class MarkerError(Exception):
    """A solution file's markers are unbalanced or nested."""


@dataclass(frozen=True)
class Region:
    begin: int  # 1-based line of the BEGIN marker
    end: int  # 1-based line of the END marker
    owner: str  # qualified name of the enclosing function, or "<module>"


def _enclosing_names(tree: ast.AST) -> list[tuple[int, int, str]]:
    spans: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    spans.append((child.lineno, child.end_lineno or child.lineno, name))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return spans


def find_regions(source: str, filename: str) -> list[Region]:
    lines = source.splitlines()
    try:
        spans = _enclosing_names(ast.parse(source, filename))
    except SyntaxError as exc:
        raise MarkerError(f"{filename}:{exc.lineno}: solution does not parse: {exc.msg}") from None
    regions, open_at = [], None
    for number, line in enumerate(lines, start=1):
        marker = line.strip()
        if marker == BEGIN:
            if open_at is not None:
                raise MarkerError(f"{filename}:{number}: BEGIN SOLUTION inside the region opened at line {open_at}")
            open_at = number
        elif marker == END:
            if open_at is None:
                raise MarkerError(f"{filename}:{number}: END SOLUTION without a BEGIN SOLUTION")
            owners = [(b, name) for b, e, name in spans if b < open_at <= e]
            owner = max(owners)[1] if owners else "<module>"
            regions.append(Region(open_at, number, owner))
            open_at = None
    if open_at is not None:
        raise MarkerError(f"{filename}:{open_at}: BEGIN SOLUTION is never closed by END SOLUTION")
    return regions


def make_stub(source: str, filename: str, display_path: str) -> str:
    """The learner's version of one solution file."""
    regions = find_regions(source, filename)
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    cursor = 0
    for region in regions:
        out.extend(lines[cursor : region.begin - 1])
        begin_line = lines[region.begin - 1]
        indent = begin_line[: len(begin_line) - len(begin_line.lstrip())]
        what = region.owner if region.owner != "<module>" else "this part"
        out.append(f"{indent}# YOUR CODE HERE\n")
        out.append(f'{indent}raise NotImplementedError("TODO: fill in {what} in {display_path}")\n')
        cursor = region.end
    out.extend(lines[cursor:])
    stub = "".join(out)
    try:
        ast.parse(stub, filename)
    except SyntaxError as exc:
        raise MarkerError(f"{filename}: the generated stub does not parse (line {exc.lineno}: {exc.msg})") from None
    return stub


def make_notebook_stub(source: str, filename: str, display_path: str) -> str:
    """The learner's version of one solution notebook: every code cell through ``make_stub``, and
    no outputs, execution counts or execution timings."""
    import nbformat  # here: every grading process imports this module, and nbformat costs seconds

    notebook = nbformat.reads(source, as_version=nbformat.NO_CONVERT)
    for index, cell in enumerate(notebook.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        stub = make_stub(cell.source, f"{filename} (cell {index})", display_path)
        cell.source = stub if cell.source.endswith("\n") else stub.removesuffix("\n")
        cell.outputs = []
        cell.execution_count = None
    return nbformat.writes(notebook) + "\n"


STUBBERS = {".py": make_stub, ".ipynb": make_notebook_stub}


def _copy_tree(src: Path, dst: Path, display_prefix: str, written: dict[Path, bytes]) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in SKIPPED_NAMES for part in rel.parts) or path.is_dir():
            continue
        data = path.read_bytes()
        stubber = STUBBERS.get(path.suffix)
        if stubber:
            data = stubber(data.decode("utf-8"), str(path), f"{display_prefix}/{rel.as_posix()}").encode("utf-8")
        written[dst / rel] = data


def planned_files(course: Course, root: Path = REPO_ROOT) -> dict[Path, bytes]:
    """Every file `course build` writes under exercises/, with its content."""
    written: dict[Path, bytes] = {}
    dirs = {u.dir for u in course.units} | {p for u in course.units for p in u.provided}
    for name in sorted(dirs):
        src = root / "solutions" / name
        if not src.is_dir():
            raise MarkerError(f"solutions/{name}: folder named in course.yml does not exist")
        _copy_tree(src, root / "exercises" / name, f"exercises/{name}", written)
    return written


def _managed_dirs(course: Course, root: Path) -> list[Path]:
    dirs = {u.dir for u in course.units} | {p for u in course.units for p in u.provided}
    return [root / "exercises" / d for d in sorted(dirs)]


def drift(course: Course, root: Path = REPO_ROOT) -> list[str]:
    """Files under exercises/ that differ from what `course build` would write."""
    planned = planned_files(course, root)
    problems = []
    for path, data in planned.items():
        rel = path.relative_to(root).as_posix()
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.read_bytes() != data:
            problems.append(f"{rel}: differs from its solution")
    for folder in _managed_dirs(course, root):
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            rel_parts = path.relative_to(folder).parts
            if path.is_file() and path not in planned and not any(p in SKIPPED_NAMES for p in rel_parts):
                problems.append(f"{path.relative_to(root).as_posix()}: not generated from solutions/")
    return problems


def build(course: Course, root: Path = REPO_ROOT) -> list[Path]:
    """Write the stubs; returns the files that changed."""
    planned = planned_files(course, root)
    changed = []
    for folder in _managed_dirs(course, root):
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            rel_parts = path.relative_to(folder).parts
            if path.is_file() and path not in planned and not any(p in SKIPPED_NAMES for p in rel_parts):
                path.unlink()
                changed.append(path)
    for path, data in planned.items():
        if path.exists() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        changed.append(path)
    return changed
