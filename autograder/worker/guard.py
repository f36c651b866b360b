"""Forbidden shortcuts, enforced at run time inside the learner's process.

A forbidden function is replaced by a wrapper that raises ``ForbiddenShortcut`` when learner code
is on the call stack (course code, such as a provided model, may still use it).  A forbidden module
cannot be imported from learner code.  The static scan in ``autograder.submission`` reports the
same names before anything runs.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import sys
from pathlib import Path


class ForbiddenShortcut(RuntimeError):
    """Learner code called something course.yml forbids in this unit."""


def _stack_has(roots: tuple[str, ...], frame, depth_limit: int) -> bool:
    for _ in range(depth_limit):
        if frame is None:
            return False
        if frame.f_code.co_filename.startswith(roots):
            return True
        frame = frame.f_back
    return False


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        parents = [obj]
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
            parents.append(obj)
        return parents, parts[cut:]
    raise ImportError(dotted)


def install(forbidden: list[dict], learner_roots: list[str]) -> list[str]:
    """Install guards; returns the names that could not be guarded (not installed here)."""
    roots = tuple(str(Path(r).resolve()) + "/" for r in learner_roots)
    modules: dict[str, str] = {}
    unguarded = []
    for item in forbidden:
        name, reason = item["name"], item["reason"]
        try:
            parents, attrs = _resolve(name)
        except (ImportError, AttributeError):
            # Not installed here: nothing to call, but block the import by name all the same.
            modules[name] = reason
            unguarded.append(name)
            continue
        if not attrs:
            modules[name] = reason
            continue
        owner, target = parents[-2], parents[-1]

        def guarded(*args, __target=target, __name=name, __reason=reason, **kwargs):
            # Anywhere on the stack: a library helper that calls the shortcut is the same shortcut.
            if _stack_has(roots, sys._getframe(1), 80):
                raise ForbiddenShortcut(f"{__name} is forbidden in this unit: {__reason}")
            return __target(*args, **kwargs)

        try:
            functools.update_wrapper(guarded, target)
        except (AttributeError, TypeError):
            pass
        setattr(owner, attrs[-1], guarded)

    if modules:
        real_import = builtins.__import__
        real_import_module = importlib.import_module

        def check(module_name: str) -> None:
            # Only the frame that runs the import: libraries may import what they like.
            if not _stack_has(roots, sys._getframe(2), 1):
                return
            for blocked, reason in modules.items():
                if module_name == blocked or module_name.startswith(blocked + "."):
                    raise ForbiddenShortcut(f"importing {blocked} is forbidden in this unit: {reason}")

        def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0:
                check(name)
            return real_import(name, globals, locals, fromlist, level)

        def guarded_import_module(name, package=None):
            check(name)
            return real_import_module(name, package)

        builtins.__import__ = guarded_import
        importlib.import_module = guarded_import_module
    return unguarded
