"""The student release: the repository a learner clones.

It holds the stubs and visible tests (generated from solutions/ here, exactly as `course build`
writes them), the part of the engine that `pytest exercises/unitN`, `course grade` (visible tests
only) and `course submit` need, course.yml, and a learner's README and Makefile from
templates/release/.  Everything else stays behind: solutions/, the hidden suites, the course's own
tests and mutants, benchmarks (they import solutions), CI, and the instructor-only modules below.
"""

from __future__ import annotations

import re
from pathlib import Path

from autograder.build import SKIPPED_NAMES, planned_files
from autograder.manifest import REPO_ROOT, Course

TEMPLATES = REPO_ROOT / "templates"
# Modules that need solutions/ or the hidden suite: building stubs, releasing, batch grading, exports.
INSTRUCTOR_ONLY = {"build.py", "release.py", "batch.py", "export.py", "nbgrading.py", "hidden"}


class ReleaseError(Exception):
    """The release cannot be written (a non-empty target, a template that no longer matches)."""


def torch_spec(root: Path = REPO_ROOT) -> str:
    """The torch requirement the Makefile installs (one place to pin it, read by every export)."""
    found = re.search(r"^TORCH_SPEC \?= (\S+)\s*$", (root / "Makefile").read_text(), re.M)
    if not found:
        raise ReleaseError("Makefile: no `TORCH_SPEC ?= ...` line to take the torch pin from")
    return found.group(1)


def engine_files(root: Path = REPO_ROOT) -> dict[Path, bytes]:
    """The learner's part of autograder/, keyed by path relative to the repository."""
    files = {}
    for path in sorted((root / "autograder").rglob("*")):
        rel = path.relative_to(root / "autograder")
        if path.is_dir() or rel.parts[0] in INSTRUCTOR_ONLY or SKIPPED_NAMES & set(rel.parts):
            continue
        files[Path("autograder") / rel] = path.read_bytes()
    return files


def _template(name: str, **values: str) -> bytes:
    text = (TEMPLATES / "release" / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if leftover := re.findall(r"@[A-Z_]+@", text):
        raise ReleaseError(f"templates/release/{name}: no value for {', '.join(sorted(set(leftover)))}")
    return text.encode("utf-8")


def release_files(course: Course, root: Path = REPO_ROOT) -> dict[Path, bytes]:
    """Every file of the release, keyed by its path inside it."""
    files = {path.relative_to(root): data for path, data in planned_files(course, root).items()}
    files.update(engine_files(root))
    files[Path("course.yml")] = (root / "course.yml").read_bytes()
    pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    # There is no tests/ folder in the release; a bare `pytest` runs the visible tests.
    learner_pyproject = pyproject.replace('testpaths = ["tests"]', 'testpaths = ["exercises"]')
    if learner_pyproject == pyproject:
        raise ReleaseError('pyproject.toml: no `testpaths = ["tests"]` line to point at exercises/')
    files[Path("pyproject.toml")] = learner_pyproject.encode("utf-8")
    units = "\n".join(f"| {i} | {u.title} | `exercises/{u.dir}` |" for i, u in enumerate(course.units, 1))
    spec = torch_spec(root)
    files[Path("README.md")] = _template("README.md", TITLE=course.title, UNITS=units, TORCH_SPEC=spec)
    files[Path("Makefile")] = _template("Makefile", TORCH_SPEC=spec)
    files[Path(".gitignore")] = _template("gitignore")
    return files


def write_release(course: Course, out: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Write the release into ``out`` (new or empty); returns the files written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out} is not empty; give a new folder so nothing stale is shipped")
    written = []
    for rel, data in sorted(release_files(course, root).items()):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written
