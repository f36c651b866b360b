"""Forbidden shortcuts, enforced at run time inside the learner's process: best effort.

These guards run in the same process as the learner's code, so a determined learner can undo
them; the absolute protections are outside the process (the sandbox's mounts hide a forbidden
package's files altogether, see ``autograder.sandbox``).  What the guards do:

* A forbidden function is replaced, at the names torch exposes it under (``torch.ops.aten`` and
  its overloads, ``torch._C._nn``, ``torch``, ``torch.nn.functional``), by a wrapper that raises
  ``ForbiddenShortcut`` when learner code is on the call stack (course code, such as a provided
  model, may still use it).  The wrapper does not expose the original.  A torch operator is also
  refused where no name can be replaced (``torch._C._VariableFunctions``, an op overload reached
  some other way): a ``TorchFunctionMode`` in the worker sees every call of a torch function by
  the operator's name.
* A forbidden module cannot be imported from learner code, including through ``eval``/``exec``.
* Learner code is every frame that is not a real file of the Python installation, of the grader
  or of the course: code compiled under another file's name is refused at ``compile``.
"""

from __future__ import annotations

import builtins
import importlib
import os
import sys
from pathlib import Path


class ForbiddenShortcut(RuntimeError):
    """Learner code called something course.yml forbids in this unit."""


class _Classifier:
    """Tells learner frames from trusted ones by their code's file name (cached per name)."""

    def __init__(self, trusted_roots: list[str], course_files: list[str]):
        self.roots = tuple(os.path.join(os.path.realpath(r), "") for r in trusted_roots)
        self.course_files = {os.path.realpath(f) for f in course_files}
        self.cache: dict[str, bool] = {}

    def trusted_file(self, filename: str) -> bool:
        known = self.cache.get(filename)
        if known is None:
            if filename.startswith("<frozen "):
                known = True
            else:
                real = os.path.realpath(filename)
                known = os.path.isfile(real) and (real in self.course_files or real.startswith(self.roots))
            self.cache[filename] = known
        return known

    def is_learner(self, frame) -> bool:
        return not self.trusted_file(frame.f_code.co_filename)

    def learner_on_stack(self, frame, depth_limit: int = 200) -> bool:
        for _ in range(depth_limit):
            if frame is None:
                return False
            if self.is_learner(frame):
                return True
            frame = frame.f_back
        return True  # deeper than any honest library call chain: treat as the learner's


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


def _guard(target, refuse):
    """A callable that refuses when learner code is on the stack, else calls ``target``.  Attribute
    access (an aten packet's overloads: ``.default``) is guarded the same way."""
    if not callable(target):
        return target

    class Guarded:
        __slots__ = ()
        __doc__ = getattr(target, "__doc__", None)

        def __call__(self, *args, **kwargs):
            refuse(sys._getframe(1))
            return target(*args, **kwargs)

        def __getattr__(self, attr):
            value = getattr(target, attr)
            return _guard(value, refuse) if callable(value) and not isinstance(value, type) else value

        def __repr__(self):
            return f"<guarded {getattr(target, '__name__', 'function')}>"

    if isinstance(target, type):  # a class (torch.nn.MultiheadAttention): guard construction
        def make(*args, **kwargs):
            refuse(sys._getframe(1))
            return target(*args, **kwargs)

        make.__name__ = make.__qualname__ = target.__name__
        return make
    return Guarded()


def _aliases(name: str) -> list[tuple[object, str]]:
    """Other places torch exposes the same operator as the forbidden ``...``.``last``."""
    last = name.rsplit(".", 1)[-1]
    if not name.startswith("torch"):
        return []
    try:
        import torch
    except ImportError:
        return []
    owners = [torch, torch.nn.functional, torch._C._VariableFunctions, torch._C._nn]
    found = [(owner, last) for owner in owners if last in getattr(owner, "__dict__", {}) or hasattr(owner, last)]
    try:
        if hasattr(torch.ops.aten, last):
            found.append((torch.ops.aten, last))
    except (RuntimeError, AttributeError):
        pass
    return found


def _is_torch_operator(name: str) -> bool:
    """Is ``torch....last`` an operator of torch's dispatcher (there is an ``aten::last``)?  Plain
    Python functions such as ``torch.cuda.max_memory_allocated`` never reach a TorchFunctionMode."""
    if not name.startswith("torch."):
        return False
    try:
        import torch

        return hasattr(torch.ops.aten, name.rsplit(".", 1)[-1])
    except (ImportError, RuntimeError, AttributeError):
        return False


def _refuse_operators(operators: dict) -> None:
    """Every call of a torch function passes through this mode: a forbidden operator is refused
    whatever name it was reached by (``__name__`` is "layer_norm", "native_layer_norm.default").
    Installed only in units that forbid an operator: it costs about a microsecond per torch call."""
    import torch
    from torch.overrides import TorchFunctionMode

    compiling = torch.compiler.is_dynamo_compiling

    class ForbiddenOperators(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not compiling():  # dynamo traces the call itself; the eager call is guarded
                name = getattr(func, "__name__", "")
                refuse = operators.get(name.partition(".")[0])
                if refuse is not None:
                    refuse(sys._getframe(1))
            return func(*args, **(kwargs or {}))

    ForbiddenOperators().__enter__()  # for the life of the worker


def install(forbidden: list[dict], course_files: list[str] | None = None, trusted_roots: list[str] | None = None) -> list[str]:
    """Install guards; returns the names that could not be guarded (not installed here)."""
    if trusted_roots is None:
        here = Path(__file__).resolve().parent
        trusted_roots = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, str(here)})
    classifier = _Classifier(trusted_roots, course_files or [])
    modules: dict[str, str] = {}
    operators: dict = {}  # torch operator name -> its refuse()
    unguarded = []
    for item in forbidden:
        name, reason = item["name"], item["reason"]
        try:
            parents, attrs = _resolve(name)
        except (ImportError, AttributeError):
            # Not installed here (or hidden by the sandbox): nothing to call, but block the import by name.
            modules[name] = reason
            unguarded.append(name)
            continue
        if not attrs:
            modules[name] = reason
            continue

        def refuse(frame, __name=name, __reason=reason):
            # Anywhere on the stack: a library helper that calls the shortcut is the same shortcut.
            if classifier.learner_on_stack(frame):
                raise ForbiddenShortcut(f"{__name} is forbidden in this unit: {__reason}")

        owner = parents[-2]
        if _is_torch_operator(name):
            operators[attrs[-1]] = refuse
        places = [(owner, attrs[-1])] + [p for p in _aliases(name) if p != (owner, attrs[-1])]
        for place, attr in places:
            try:
                current = getattr(place, attr)
                setattr(place, attr, _guard(current, refuse))
            except (AttributeError, TypeError, RuntimeError):
                continue

    if operators:
        _refuse_operators(operators)

    real_compile = builtins.compile

    def guarded_compile(source, filename, mode, *args, **kwargs):
        # Code compiled under the name of a real course or library file would pass for trusted code.
        name = os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else ""
        if name and classifier.trusted_file(name) and classifier.is_learner(sys._getframe(1)):
            raise ForbiddenShortcut(f"compiling code under the name of {name!r} is not allowed in graded code")
        return real_compile(source, filename, mode, *args, **kwargs)

    builtins.compile = guarded_compile

    if modules:
        real_import = builtins.__import__
        real_import_module = importlib.import_module

        def check(module_name: str, frame) -> None:
            # Only the frame that runs the import: libraries may import what they like.
            if not classifier.is_learner(frame):
                return
            for blocked, reason in modules.items():
                if module_name == blocked or module_name.startswith(blocked + "."):
                    raise ForbiddenShortcut(f"importing {blocked} is forbidden in this unit: {reason}")

        def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0:
                check(name, sys._getframe(1))
            return real_import(name, globals, locals, fromlist, level)

        def guarded_import_module(name, package=None):
            check(name, sys._getframe(1))
            return real_import_module(name, package)

        builtins.__import__ = guarded_import
        importlib.import_module = guarded_import_module
    return unguarded
