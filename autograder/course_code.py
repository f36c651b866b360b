"""The course's own code, run on the trusted side: the provided modules of ``exercises/`` (corpus
generators, environments, training loops, the course GPT) and, for the hidden tests, the reference
solutions in ``solutions/``.

Tests make their secret inputs, their reference values and their course loops with these copies
(``learner.course("corpus")``, ``reference_module("unit5.finetune")``), never with the copies in
the learner's process, which learner code can patch.  They are loaded under private names
(``_course.unit3.corpus``, ``_reference.unit4.kvcache``), so they never collide with the learner's
modules in a learner's own in-process run, and the absolute imports between course packages inside
them (``from common.gpt import GPT``) resolve to the same private copies.  A provided module that
imports a learner file on the trusted side is a course bug: it raises, naming both.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from autograder.manifest import REPO_ROOT, load_course

COURSE, REFERENCE = "_course", "_reference"
SOURCES = {COURSE: REPO_ROOT / "exercises", REFERENCE: REPO_ROOT / "solutions"}


@functools.lru_cache(maxsize=None)
def _layout() -> tuple[frozenset[str], frozenset[str]]:
    """(course packages: unit and provided folders, learner modules: "unit3.bpe", ...)."""
    course = load_course()
    packages = {u.dir for u in course.units} | {p for u in course.units for p in u.provided}
    learner = {f"{u.dir}.{name[:-3]}" for u in course.units for name in u.files}
    return frozenset(packages), frozenset(learner)


def _private_name(prefix: str, name: str) -> str:
    """Where a course name lives on the trusted side: learner modules only among the references."""
    _, learner = _layout()
    if name in learner and prefix == COURSE:
        raise ImportError(f"course code imports the learner's module {name} on the trusted side; "
                          "pass the learner's functions in instead (a course bug, not the learner's)")
    return f"{REFERENCE if name in learner else COURSE}.{name}"


def _importer(prefix: str):
    """``__import__`` for modules loaded here: course packages go to the private copies."""
    packages, _ = _layout()

    def course_import(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.split(".")[0]
        if level or top not in packages:
            return builtins.__import__(name, globals, locals, fromlist, level)
        module = importlib.import_module(_private_name(prefix, name))
        if fromlist:
            return module
        return sys.modules[".".join(module.__name__.split(".")[:2])]  # `import common.gpt` binds `common`

    return course_import


class _Loader(importlib.machinery.SourceFileLoader):
    def exec_module(self, module: ModuleType) -> None:
        prefix = module.__name__.split(".")[0]
        module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": _importer(prefix)}
        super().exec_module(module)


class _Alias(importlib.abc.Loader):
    """A provided module asked for among the references: the one course copy, not a second one."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix not in SOURCES:
            return None
        if not rest:
            return importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        packages, learner = _layout()
        if rest.split(".")[0] not in packages:
            return None
        if prefix == COURSE and rest in learner:
            raise ImportError(_private_name(COURSE, rest))  # the message names the course bug
        if prefix == REFERENCE and rest not in learner and "." in rest:
            return importlib.machinery.ModuleSpec(fullname, _Alias(f"{COURSE}.{rest}"))
        base = SOURCES[prefix].joinpath(*rest.split("."))
        if (base / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(fullname, base / "__init__.py", loader=_Loader(fullname, str(base / "__init__.py")),
                                                          submodule_search_locations=[str(base)])
        file = base.with_suffix(".py")
        if file.is_file():
            return importlib.util.spec_from_file_location(fullname, file, loader=_Loader(fullname, str(file)))
        return None


_FINDER = _Finder()


def _ensure_finder() -> None:
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def course_module(name: str) -> ModuleType:
    """The course's copy of a provided module, on the trusted side: ``course_module("unit3.corpus")``,
    ``course_module("common.gpt")``."""
    _ensure_finder()
    if name in _layout()[1]:
        raise ImportError(f"{name} is a learner module: the trusted side uses reference_module({name!r})")
    return importlib.import_module(_private_name(COURSE, name))


def reference_module(name: str) -> ModuleType:
    """The reference solution of a learner module, on the trusted side (hidden tests only: the
    student release has no solutions): ``reference_module("unit5.finetune")``."""
    _ensure_finder()
    _, learner = _layout()
    if name not in learner:
        raise ImportError(f"{name} is not a learner module; use course_module for provided code")
    if not (SOURCES[REFERENCE] / Path(*name.split("."))).with_suffix(".py").is_file():
        raise ImportError(f"no reference solution for {name} here (a student release has none)")
    return importlib.import_module(f"{REFERENCE}.{name}")
