"""Shared fixtures of the course's own tests."""

import shutil
from pathlib import Path

import pytest

from autograder.manifest import REPO_ROOT, load_course


@pytest.fixture(scope="session")
def course():
    return load_course()


@pytest.fixture
def solved(tmp_path: Path) -> Path:
    """A copy of the solutions laid out as a submission."""
    target = tmp_path / "solved"
    shutil.copytree(REPO_ROOT / "solutions", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target
