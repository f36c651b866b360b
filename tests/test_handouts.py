"""Every hint a handout names is one a test can produce: the handouts quote hints as
`` `Hint: <text>` `` (or as a ``Hint: <text>`` line in a code block), and each quoted text must be a
string in the unit's visible or hidden tests, or in the engine's checks."""

import ast
import re
from pathlib import Path

import pytest

from autograder.manifest import REPO_ROOT, load_course

COURSE = load_course()
QUOTED = re.compile(r"`Hint: ([^`]+)`")
IN_BLOCK = re.compile(r"^\s*Hint: (.+?)\s*$", re.M)


def handout_hints(unit_dir: str) -> list[str]:
    text = (REPO_ROOT / "solutions" / unit_dir / "README.md").read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"```.*?\n(.*?)```", text, re.S))
    return sorted({h.strip() for h in QUOTED.findall(text)} | {h.strip() for h in IN_BLOCK.findall(blocks)})


def test_strings(unit) -> list[str]:
    """The string constants (f-string parts included) of every test file and helper a unit's tests use."""
    files = [*sorted((REPO_ROOT / "solutions" / unit.dir).glob("*.py")),
             *sorted((REPO_ROOT / "autograder" / "hidden" / unit.id).glob("*.py")),
             REPO_ROOT / "autograder" / "checks.py", REPO_ROOT / "autograder" / "testing.py"]
    found = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(" ".join(node.value.split()))
    return found


test_strings.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("unit", COURSE.units, ids=[u.id for u in COURSE.units])
def test_every_hint_a_handout_names_is_produced_by_a_test(unit):
    strings = test_strings(unit)
    missing = [h for h in handout_hints(unit.dir) if not any(" ".join(h.split()) in s for s in strings)]
    assert not missing, (f"solutions/{unit.dir}/README.md names hints that no test of {unit.id} produces "
                         f"(quote them exactly as the tests write them): {missing}")
