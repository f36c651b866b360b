"""The object table and the requests both backends serve (in-process and sandboxed worker)."""

from __future__ import annotations

import importlib
import operator
import sys
import traceback
from pathlib import Path
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any

from autograder.worker.protocol import Handle

# Operators a test may apply to learner objects (a + b, -a, x[i], len(x), ...).
OPERATORS = {
    name: getattr(operator, name)
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs",
                 "lt", "le", "gt", "ge", "getitem", "setitem", "delitem", "contains", "invert")
}
OPERATORS.update({"len": len, "list": list, "iter_list": list, "str": str, "repr": repr, "float": float,
                  "int": int, "bool": bool, "type_name": lambda obj: type(obj).__name__})


class ObjectTable:
    """Objects that stay on the learner's side; the other side holds their ids."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.next_id = 1

    def to_handle(self, obj: Any) -> Handle:
        hid = self.next_id
        self.next_id += 1
        self.objects[hid] = obj
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
        if isinstance(obj, (type, ModuleType, FunctionType, MethodType, BuiltinFunctionType)) and isinstance(name, str):
            text = name
        else:
            try:
                text = repr(obj)
            except Exception as exc:  # a learner __repr__ may raise
                text = f"<repr failed: {type(exc).__name__}>"
        return Handle(hid, type(obj).__name__, text[:300])

    def from_handle(self, handle: Handle) -> Any:
        try:
            return self.objects[handle.id]
        except KeyError:
            raise LookupError(f"handle #{handle.id} is gone (the worker was restarted or the object released)") from None

    def release(self, ids: list[int]) -> None:
        for hid in ids:
            self.objects.pop(hid, None)


def serve(request: dict, helpers: dict) -> Any:
    """Carry out one decoded request (``helpers``: the harness functions by name, a table made
    before learner code ran); learner exceptions propagate to the caller."""
    op = request["op"]
    if op == "import":
        return importlib.import_module(request["module"])
    if op == "getattr":
        return getattr(request["target"], request["name"])
    if op == "setattr":
        setattr(request["target"], request["name"], request["value"])
        return None
    if op == "call":
        return request["target"](*request["args"], **request["kwargs"])
    if op == "operator":
        return OPERATORS[request["name"]](*request["args"])
    if op == "harness":
        helper = helpers.get(request["name"])
        if helper is None:
            raise ValueError(f"no harness helper {request['name']!r}")
        return helper(*request["args"], **request["kwargs"])
    raise ValueError(f"unknown request {op!r}")


def describe_exception(exc: BaseException, learner_root: Path | None) -> dict:
    """Type, message and the learner's own frames of an exception, as plain data."""
    frames = []
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        shown = frame.filename
        mine = False
        if learner_root is not None:
            try:
                shown = path.resolve().relative_to(learner_root).as_posix()
                mine = True
            except ValueError:
                pass
        frames.append([shown, frame.lineno or 0, frame.name, frame.line or "", mine])
    if isinstance(exc, SyntaxError) and exc.filename:
        shown = exc.filename
        if learner_root is not None:
            try:
                shown = Path(exc.filename).resolve().relative_to(learner_root).as_posix()
            except ValueError:
                pass
        frames.append([shown, exc.lineno or 0, "<module>", (exc.text or "").rstrip(), True])
    try:
        message = str(exc)
    except Exception:
        message = "<the exception's message could not be read>"
    return {"type": type(exc).__name__, "builtin": type(exc).__module__ == "builtins" and type(exc).__name__ in dir(sys.modules["builtins"]),
            "message": message[:4000], "frames": frames[-30:]}
