"""`course release`: nothing secret leaves, and the release works on its own from a fresh copy."""

import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from autograder.build import find_regions
from autograder.manifest import REPO_ROOT, load_course
from autograder.release import write_release

COURSE = load_course()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "llm-parts"
    write_release(COURSE, out)
    return out


def _texts(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8", errors="replace")
            for p in root.rglob("*") if p.is_file()}


def _solution_sources():
    for path in sorted((REPO_ROOT / "solutions").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            text = path.read_text(encoding="utf-8")
            yield path, text.splitlines(), find_regions(text, str(path)) if path.suffix == ".py" else []


def _stripped(lines) -> set[str]:
    return {l.strip() for l in lines if l.strip()}


@functools.cache
def public_text() -> str:
    """What the course publishes on purpose: everything in solutions/ outside the solution regions
    (handouts, visible tests, given code) and the learner's part of the engine.  A solution line that
    also occurs there (a formula in a handout, a common idiom) is no secret."""
    parts = []
    for _, lines, regions in _solution_sources():
        inside = {n for r in regions for n in range(r.begin - 1, r.end)}
        parts += [l for n, l in enumerate(lines) if n not in inside]
    for path in (REPO_ROOT / "autograder").rglob("*.py"):
        if "hidden" not in path.relative_to(REPO_ROOT).parts:
            parts.append(path.read_text(encoding="utf-8"))
    for path in (REPO_ROOT / "exercises").rglob("*.py"):  # the stubs (a mutant may plant a stub's line)
        parts.append(path.read_text(encoding="utf-8"))
    return "\n".join(parts)


@functools.cache
def solution_lines() -> set[str]:
    """The non-trivial lines of the solution regions that the course does not publish elsewhere."""
    found = set()
    for _, lines, regions in _solution_sources():
        for region in regions:
            found |= {l for l in _stripped(lines[region.begin : region.end - 1]) if len(l) >= 24}
    public = public_text()
    return {l for l in found if l not in public}


@functools.cache
def hidden_test_names() -> set[str]:
    """Names of hidden tests, less those a visible test also has (those are public anyway)."""
    def names(folder):
        return {m for p in folder.rglob("*.py") for m in re.findall(r"def (test_\w+)", p.read_text())}
    return names(REPO_ROOT / "autograder" / "hidden") - names(REPO_ROOT / "solutions")


@functools.cache
def mutant_secrets() -> tuple[set[str], set[str]]:
    """(mutant names, lines of wrong code they plant that occur nowhere in solutions/ or the engine)."""
    names, planted = set(), set()
    for path in (REPO_ROOT / "tests" / "mutants").glob("unit*.yml"):  # not equivalent.yml: no wrong code
        for mutant in yaml.safe_load(path.read_text()):
            names.add(mutant["name"])
            planted |= {l for e in mutant["edits"] for l in _stripped(e["replace"].splitlines()) if len(l) >= 16}
    known = public_text() + "\n".join("\n".join(lines) for _, lines, _ in _solution_sources())
    return names, {l for l in planted if l not in known}


def find_leaks(root: Path) -> list[tuple[str, str]]:
    corpus = "\n".join(_texts(root).values())
    mutant_names, mutant_lines = mutant_secrets()
    lines = {"solution line": solution_lines(), "mutant code": mutant_lines}
    names = {"hidden test": hidden_test_names(), "mutant": mutant_names}
    assert all(len(found) > 20 for found in (*lines.values(), *names.values())), "too few secrets to look for"
    leaks = [(kind, s) for kind, found in lines.items() for s in sorted(found) if s in corpus]
    return leaks + [(kind, s) for kind, found in names.items() for s in sorted(found)
                    if re.search(rf"\b{re.escape(s)}\b", corpus)]


def test_nothing_secret_is_released(release):
    paths = set(_texts(release))
    assert {"README.md", "Makefile", "course.yml", "pyproject.toml", "autograder/cli.py"} <= paths
    assert {f"exercises/{u.dir}/{f}" for u in COURSE.units for f in u.files} <= paths
    for forbidden in ("solutions/", "tests/", "benchmarks/", "autograder/hidden/", ".ci/", "autograder/build.py"):
        assert not [p for p in paths if p.startswith(forbidden)], forbidden
    assert find_leaks(release) == []


def test_the_leak_check_catches_each_kind_of_leak(release, tmp_path):
    copy = tmp_path / "leaky"
    shutil.copytree(release, copy)
    planted = {"solution line": sorted(solution_lines())[0], "hidden test": sorted(hidden_test_names())[0],
               "mutant": sorted(mutant_secrets()[0])[0], "mutant code": sorted(mutant_secrets()[1])[0]}
    (copy / "exercises" / "unit1" / "notes.txt").write_text("\n".join(planted.values()))
    found = find_leaks(copy)
    assert {kind for kind, _ in found} == set(planted) and set(planted.values()) <= {s for _, s in found}


def _light_venv(where: Path) -> Path:
    """A new venv holding this environment's packages as hard links (seconds, nothing downloaded)
    but not this repository's editable install, so the release must install its own package."""
    venv = where / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    shutil.rmtree(purelib)
    shutil.copytree(sysconfig.get_paths()["purelib"], purelib, symlinks=True, copy_function=os.link,
                    ignore=shutil.ignore_patterns("__editable__*llm_parts_course*", "llm_parts_course-*.dist-info"))
    return venv


def test_release_works_from_a_fresh_copy(release, tmp_path):
    fresh = tmp_path / "clone"
    shutil.copytree(release, fresh)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "PIP_"))}

    tests = subprocess.run([sys.executable, "-m", "pytest", "exercises/unit1", "-q", "-p", "no:xdist"], cwd=fresh,
                           env=env, capture_output=True, text=True)
    assert tests.returncode == 1, tests.stdout + tests.stderr
    summary = tests.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=*\s*\d+ failed in [\d.]+s\s*=*", summary), summary  # failures, not errors
    assert "TODO: fill in" in tests.stdout and "error" not in summary

    for name in ("autograd.py", "layers.py", "fused.py"):
        shutil.copy(REPO_ROOT / "solutions" / "unit1" / name, fresh / "exercises" / "unit1" / name)
    venv = _light_venv(tmp_path)
    # The release's own set-up runs (an editable install of the release), from no index at all.
    grade = subprocess.run(["make", "grade", f"VENV={venv}", "UNIT=unit1"], cwd=fresh, capture_output=True, text=True,
                           env={**env, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"})
    assert grade.returncode == 0, grade.stdout[-3000:] + grade.stderr[-3000:]
    assert "-m pip install" in grade.stdout  # the set-up step ran
    total = re.search(r"total\W+([\d.]+) / ([\d.]+)", grade.stdout)
    assert total and float(total[1]) == float(total[2]) > 0, grade.stdout[-2000:]
    assert "hidden tests are not included" in " ".join(grade.stdout.split())
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import autograder; print(autograder.__file__)"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
    assert Path(imported.stdout.strip()) == fresh / "autograder" / "__init__.py", imported.stdout + imported.stderr

    python = str(venv / "bin" / "python")
    packed = subprocess.run([python, "-m", "autograder", "submit", "--skip-tests", "--out", "hand-in.zip"], cwd=fresh,
                            env=env, capture_output=True, text=True)
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert "unit1/autograd.py" in zipfile.ZipFile(fresh / "hand-in.zip").namelist()
    build = subprocess.run([python, "-m", "autograder", "build"], cwd=fresh, env=env, capture_output=True, text=True)
    assert build.returncode != 0 and "student release" in build.stderr
