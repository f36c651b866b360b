"""The trusted side of the boundary: the one way tests reach learner code.

Tests get a ``Learner`` (the ``learner`` fixture) and call ``learner.module("autograd")``.  What
comes back is a ``Proxy``: attribute access, calls and operators on it become requests to a
backend, and results come back through the safe protocol as plain data or as more proxies.

Two backends serve the same requests:

* ``InProcessBackend`` for a learner's own ``pytest exercises/unitN``: learner code runs in the
  test process, so tracebacks point into it and ``pdb`` works, but every value still makes the
  round trip through the protocol, so a test that relies on anything else fails here first.
* ``WorkerBackend`` for ``course grade``: learner code runs in a sandboxed worker process
  (``autograder.sandbox``); a crash, a hang or a memory bomb fails only the call in flight.

The rule both keep: **the learner's process computes only what the learner's functions compute;
every secret input, every reference value, every course-provided loop, every measurement and every
verdict belongs to this, the trusted side.**  So a test makes its inputs here (``learner.course``
gives the course's own copy of a provided module, ``learner.put_file`` hands the worker a file
written here), calls the learner's function there, and checks the answer here.  What a call cost
is read from outside the worker (``learner.measure``: the worker's cgroup, else /proc), never from
a helper in the learner's process.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from autograder.worker import harness as local_harness
from autograder.worker.objects import ObjectTable, serve
from autograder.worker.protocol import Handle, ProtocolError, pack, unpack


class LearnerError(Exception):
    """An exception raised by learner code, rebuilt from plain data.

    Subclasses also inherit from the builtin exception of the same name, so
    ``pytest.raises(ValueError)`` works across the boundary.
    """

    def __init__(self, type_name: str, message: str, frames: list, call: str = ""):
        self.type_name, self.message, self.frames, self.call = type_name, message, frames, call
        super().__init__(self.render())

    @property
    def learner_frame(self) -> list | None:
        mine = [f for f in self.frames if f[4]]
        return mine[-1] if mine else None

    @property
    def is_todo(self) -> bool:
        return self.type_name == "NotImplementedError" and self.message.startswith("TODO")

    def render(self) -> str:
        where = self.learner_frame
        place = f" at {where[0]}:{where[1]} in {where[2]}" if where else ""
        if self.is_todo:
            text = f"{self.message} (not written yet{place})"
        else:
            text = f"your code raised {self.type_name}: {self.message}{place}"
            if where and where[3]:
                text += f"\n    {where[3].strip()}"
        return f"{self.call}: {text}" if self.call else text


def is_todo(error: BaseException) -> bool:
    """A stub's TODO: the learner's function is not written yet (in a worker or in this process)."""
    return ((isinstance(error, LearnerError) and error.is_todo)
            or (isinstance(error, NotImplementedError) and str(error).startswith("TODO")))


class WorkerDied(LearnerError):
    """The worker process ended in the middle of a call (crash, os._exit, a limit)."""


class CallTimeout(WorkerDied):
    """A call into learner code ran past its time limit."""


class WorkerStartFailed(WorkerDied):
    """A new worker did not come up (the machine, not the learner's code)."""


_ERROR_TYPES: dict[str, type] = {}


def learner_error(info: dict, call: str) -> LearnerError:
    name = info.get("type", "Exception")
    base = getattr(builtins, name, None) if info.get("builtin") else None
    if not (isinstance(base, type) and issubclass(base, Exception)) or base in (LearnerError,):
        base = None
    if base is None:
        cls = LearnerError
    else:
        cls = _ERROR_TYPES.get(name)
        if cls is None:
            cls = _ERROR_TYPES[name] = type(f"Learner{name}", (LearnerError, base), {})
    error = cls.__new__(cls)
    LearnerError.__init__(error, name, str(info.get("message", "")), list(info.get("frames", [])), call)
    return error


NAMED_KINDS = ("function", "type", "module", "method", "builtin_function_or_method", "ABCMeta", "FunctionMeta")


class Proxy:
    """A learner object that stays on the learner's side."""

    __slots__ = ("_backend", "_handle", "_generation", "__weakref__")

    def __init__(self, backend: "Backend", handle: Handle, generation: int):
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_generation", generation)

    # attribute access and calls
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._backend.request({"op": "getattr", "target": self, "name": name}, lambda: f"{self._label}.{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._backend.request({"op": "setattr", "target": self, "name": name, "value": value},
                              lambda: f"{self._label}.{name} = {describe_value(value)}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._backend.request({"op": "call", "target": self, "args": list(args), "kwargs": kwargs},
                                     lambda: f"{self._label}({describe_args(args, kwargs)})")

    @property
    def _label(self) -> str:
        named = self._handle.type_name in NAMED_KINDS
        return self._handle.text if named else self._handle.type_name

    def __repr__(self) -> str:
        return f"<learner {self._handle.type_name}: {self._handle.text}>"

    def __del__(self) -> None:
        try:
            object.__getattribute__(self, "_backend").forget(self)
        except Exception:
            pass

    def _op(self, name: str, *args: Any) -> Any:
        return self._backend.request({"op": "operator", "name": name, "args": list(args)},
                                     lambda: f"{name}({describe_args(args, {})})")

    # operators learner objects are expected to support (Value arithmetic, indexing, len)
    def __add__(self, other): return self._op("add", self, other)
    def __radd__(self, other): return self._op("add", other, self)
    def __sub__(self, other): return self._op("sub", self, other)
    def __rsub__(self, other): return self._op("sub", other, self)
    def __mul__(self, other): return self._op("mul", self, other)
    def __rmul__(self, other): return self._op("mul", other, self)
    def __truediv__(self, other): return self._op("truediv", self, other)
    def __rtruediv__(self, other): return self._op("truediv", other, self)
    def __pow__(self, other): return self._op("pow", self, other)
    def __rpow__(self, other): return self._op("pow", other, self)
    def __matmul__(self, other): return self._op("matmul", self, other)
    def __neg__(self): return self._op("neg", self)
    def __getitem__(self, key): return self._op("getitem", self, key)
    def __setitem__(self, key, value): return self._op("setitem", self, key, value)
    def __contains__(self, item): return self._op("contains", self, item)
    def __len__(self): return self._op("len", self)
    def __iter__(self): return iter(self._op("list", self))
    # Equality and hashing stay local on purpose: a learner object never decides a comparison.
    __eq__ = object.__eq__
    __hash__ = object.__hash__


def describe_value(value: Any) -> str:
    """Short description of an argument: shape and dtype for arrays, type for the rest."""
    if isinstance(value, Proxy):
        return value._handle.type_name
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        dims = ",".join(str(d) for d in shape)
        kind = "tensor" if type(value).__module__.startswith("torch") else "array"
        return f"{kind}[{dims}] {str(dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe_value(v) for v in list(value)[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"[{inner}{more}]" if isinstance(value, list) else f"({inner}{more})"
    if isinstance(value, (int, float, bool)) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) < 30 else value[:27] + "...")
    if isinstance(value, bytes):
        return f"bytes[{len(value)}]"
    return type(value).__name__


def describe_args(args: tuple | list, kwargs: dict) -> str:
    parts = [describe_value(a) for a in args] + [f"{k}={describe_value(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


@dataclass
class Cost:
    """What one call of learner code cost, measured outside the learner's code.

    ``cpu_seconds``: CPU time of every process and thread on the learner's side during the call
    (forked helpers included); load elsewhere on the machine does not change it.
    ``peak_bytes``: the highest memory during the call above the memory when it started.
    ``peak_since_ready``: the highest memory since the worker became ready, above its memory then;
    after ``learner.restart()`` that covers the learner's import too, which no earlier allocation
    can hide.  ``held_at_start``: the worker's memory when the call started, above its memory when
    it became ready.  ``kept_bytes``: anonymous memory (heap, tensors; no library pages) after the
    call minus before it: what the call's results and records keep alive (may be negative).
    ``source``: "cgroup", "/proc" (no cgroup here) or "in-process" (a learner's own run)."""

    cpu_seconds: float
    wall_seconds: float
    peak_bytes: int
    peak_since_ready: int
    source: str
    held_at_start: int = 0
    kept_bytes: int = 0

    def describe(self) -> str:
        return (f"{self.cpu_seconds * 1e3:.1f} ms CPU, {self.wall_seconds * 1e3:.1f} ms wall, peak "
                f"{self.peak_bytes / 2**20:.1f} MiB above the start (measured by {self.source})")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Backend:
    """Common part of both backends: encoding, handles, the request API."""

    isolation = "in-process"

    def __init__(self) -> None:
        self.generation = 0
        self.pending_release: list[int] = []
        self.lock = threading.RLock()

    # proxies ----------------------------------------------------------------
    def _make_proxy(self, handle: Handle) -> Proxy:
        return Proxy(self, handle, self.generation)

    def _handle_of(self, value: Any) -> Handle:
        if isinstance(value, Proxy):
            if value._backend is not self:
                raise ProtocolError("a learner object from another unit cannot be passed here")
            if value._generation != self.generation:
                raise WorkerDied("StaleHandle", "this object belonged to a worker that was restarted; make it again", [])
            return value._handle
        raise TypeError(f"a {type(value).__name__} cannot be sent to learner code; send plain data (tensors, arrays, numbers, strings, lists, dicts)")

    def forget(self, proxy: Proxy) -> None:
        if proxy._generation == self.generation:
            self.pending_release.append(proxy._handle.id)

    def request(self, request: dict, call: Callable[[], str]) -> Any:
        """Carry out one request; ``call`` describes it (lazily) for error messages."""
        raise NotImplementedError

    def measure(self, request: dict, call: Callable[[], str]) -> tuple[Any, Cost]:
        """Carry out one request and say what it cost, measured from outside the learner's code."""
        raise NotImplementedError

    def restart(self) -> None:
        """Start the next request in a fresh learner process (no-op where there is none)."""

    def input_dir(self) -> tuple[Path, str]:
        """(where this side writes inputs for the learner, where the learner's side reads them)."""
        raise NotImplementedError

    def published(self, path: Path) -> None:
        """A file was written into the inputs folder: make it readable on the learner's side."""


class InProcessBackend(Backend):
    """Learner code in this process; values still round-trip through the protocol."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root).resolve()
        self.table = ObjectTable()
        self.helpers = local_harness.helpers()
        self.inputs: Path | None = None
        self.in_flight: Callable[[], str] | None = None
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        self._claim_packages()

    def _claim_packages(self) -> None:
        """Make the learner's packages (unit folders, provided course code) load from this root.
        pytest's importlib mode imports a visible test file as part of its package, so by now
        ``unit4`` may already be exercises/unit4 while this root is a submission: forget those."""
        tops = {p.name for p in self.root.iterdir() if (p / "__init__.py").exists()}
        for name in [n for n in sys.modules if n.split(".")[0] in tops]:
            file = getattr(sys.modules[name], "__file__", None)
            if not file or not Path(file).resolve().is_relative_to(self.root):
                del sys.modules[name]

    def request(self, request: dict, call: Callable[[], str]) -> Any:
        # Arguments: trusted side -> wire -> learner side.
        data = pack({**request}, self._handle_of)
        header, blob = _split(data)
        decoded = unpack(header, blob, self.table.from_handle, device_ok=lambda d: d)
        self.table.release(self.pending_release)
        self.pending_release = []
        self.in_flight = call  # left set if the call never returns: the plugin names it when a time limit stops the test
        result = serve(decoded, self.helpers)  # learner exceptions propagate with their traceback
        self.in_flight = None
        # Result: learner side -> wire -> trusted side.
        header, blob = _split(pack(result, self.table.to_handle))
        return unpack(header, blob, self._make_proxy, device_ok=trusted_device)

    def measure(self, request: dict, call: Callable[[], str]) -> tuple[Any, Cost]:
        """In a learner's own run the code shares this process: CPU time of the whole process, and
        the peak resident memory (Linux: the high-water mark reset just before the call)."""
        linux = Path("/proc/self/clear_refs").exists()
        if linux:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            before, anonymous = _status_kib("VmRSS"), _status_kib("RssAnon")
        cpu, wall = time.process_time(), time.perf_counter()
        value = self.request(request, call)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        peak = max(0, _status_kib("VmHWM") - before) if linux else 0
        kept = _status_kib("RssAnon") - anonymous if linux else 0
        return value, Cost(cpu, wall, peak, peak, "in-process", kept_bytes=kept)

    def input_dir(self) -> tuple[Path, str]:
        if self.inputs is None:
            self.inputs = Path(tempfile.mkdtemp(prefix="course-inputs-"))
        return self.inputs, str(self.inputs)

    def close(self) -> None:
        self.table = ObjectTable()
        if self.inputs is not None:
            import shutil

            shutil.rmtree(self.inputs, ignore_errors=True)
            self.inputs = None


def _split(data: bytes) -> tuple[bytes, bytes]:
    import struct

    header_len, blob_len = struct.unpack_from("<QQ", data)
    return data[16 : 16 + header_len], data[16 + header_len :]


def trusted_device(device: str) -> str:
    """Where a tensor from the learner's side lands here: on the device it came from (a CUDA
    result stays a CUDA tensor, so autograd and device checks see what the learner returned),
    or on the CPU where this process has no such device."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return device
    return "cpu"


# Generous: a cold start imports torch (and transformers in later units) on a busy machine.
STARTUP_TIMEOUT = 180.0
# Crashes or hangs of one function after which it is not called again.
STRIKES = 2


def _function_of(described: str) -> str:
    """The function a request description names: "mul(Value, Value)" -> "mul"."""
    return described.split("(", 1)[0]


class WorkerBackend(Backend):
    """Learner code in a sandboxed worker process, restarted after any failure."""

    def __init__(self, spawn, call_timeout: float):
        super().__init__()
        self.spawn = spawn  # () -> autograder.sandbox.Worker
        self.call_timeout = call_timeout
        self.worker = None
        self.standby = None  # a fresh worker started ahead of the next restart()
        self.todo_seen = False  # a stub's fresh-worker tests stop at their TODO (testing.todo_first)
        self.restarts = 0
        self.unplanned_restarts = 0  # restart() calls that found no standby: a test not marked fresh_worker
        # Imports that killed or hung the worker: a module that does so at import will do so again,
        # so later tests fail at once with the same reason instead of restarting the worker each time.
        self.fatal_imports: dict[str, LearnerError] = {}
        # Likewise a function that crashed or hung the worker STRIKES times is not called again, so
        # one endless loop cannot use up the unit's time that the rest of the submission needs.
        self.strikes: dict[str, int] = {}
        self.last_failure: dict[str, LearnerError] = {}

    @property
    def isolation(self) -> str:  # type: ignore[override]
        return self.spawn.level

    @contextlib.contextmanager
    def time_limit(self, seconds: float):
        old, self.call_timeout = self.call_timeout, seconds
        try:
            yield
        finally:
            self.call_timeout = old

    def _ensure_worker(self):
        if self.worker is None or not self.worker.alive():
            if self.worker is not None:
                self.worker.kill()
                self.generation += 1
                self.pending_release = []
                self.restarts += 1
            self.worker = self.spawn()
        if not self.worker.ready:
            try:
                self.worker.wait_ready(STARTUP_TIMEOUT)
            except (EOFError, OSError):
                reason = self.worker.death_reason()
                raise WorkerStartFailed("WorkerDied", f"the worker process could not start: {reason}", []) from None
        return self.worker

    def request(self, request: dict, call: Callable[[], str]) -> Any:
        importing = request.get("op") == "import" and request.get("module")
        if importing in self.fatal_imports:
            self._refuse(self.fatal_imports[importing], f"at an earlier import of {importing}", call())
        if self.strikes:  # describing every call costs time; only needed once something has failed
            described = call()
            function = _function_of(described)
            if self.strikes.get(function, 0) >= STRIKES:
                self._refuse(self.last_failure[function], f"{function} crashed or hung the worker {STRIKES} times already",
                             described)
        try:
            return self._request(request, call)
        except WorkerStartFailed:
            raise
        except WorkerDied as exc:
            if importing:
                self.fatal_imports[importing] = exc
            function = _function_of(exc.call)
            self.strikes[function] = self.strikes.get(function, 0) + 1
            self.last_failure[function] = exc
            raise

    @staticmethod
    def _refuse(first: LearnerError, why: str, described: str):
        raise type(first)(first.type_name, f"{first.message} ({why}; not called again)", [], described)

    def measure(self, request: dict, call: Callable[[], str]) -> tuple[Any, Cost]:
        """CPU time and memory of the worker's cgroup (else its /proc tree), read here before and
        after the call: every process the learner's code started counts, and nothing it does can
        lower the peak.  Wall time by this process's clock."""
        with self.lock:
            worker = self._ensure_worker()
            meter = worker.meter
            meter.peak(reset=True)
            start = meter.now()
            wall = time.perf_counter()
            value = self.request(request, call)
            wall = time.perf_counter() - wall
            if worker is not self.worker:  # restarted: the call failed, and raised
                raise WorkerDied("WorkerDied", "the worker was restarted during a measured call", [], call())
            end = meter.now()
            peak = meter.peak()
            cost = Cost((end.cpu_ns - start.cpu_ns) / 1e9, wall, max(0, peak - start.memory),
                        max(0, meter.life_peak - worker.ready_memory), meter.source,
                        held_at_start=max(0, start.memory - worker.ready_memory),
                        kept_bytes=end.anonymous - start.anonymous)
            return value, cost

    def start_ahead(self) -> None:
        """Start the fresh worker that the next restart() will take, while other tests run (the
        plugin calls this one test before each test marked fresh_worker).  Not for a submission
        that has shown a TODO: its fresh-worker tests stop at the TODO first, and each start-up
        costs about a second of CPU."""
        with self.lock:
            if self.standby is None and not self.todo_seen:
                self.standby = self.spawn()

    def restart(self) -> None:
        with self.lock:
            if self.worker is not None:
                self.worker.kill()
                self.worker = None
                self.generation += 1
                self.pending_release = []
            # The standby has been idle since its start-up, so it is still fresh.
            if self.standby is None and not self.todo_seen:
                self.unplanned_restarts += 1
            self.worker, self.standby = self.standby or self.spawn(), None

    def input_dir(self) -> tuple[Path, str]:
        return self.spawn.inputs, self.spawn.inputs_path()

    def published(self, path: Path) -> None:
        self.spawn.publish_input(path)

    def _request(self, request: dict, call: Callable[[], str]) -> Any:
        with self.lock:
            worker = self._ensure_worker()
            message = dict(request)
            if self.pending_release:
                message["release"], self.pending_release = self.pending_release, []
            data = pack(message, self._handle_of)
            try:
                header, blob = worker.call(data, self.call_timeout)
            except ProtocolError as exc:  # a reply over the size limit
                worker.kill()
                self.generation += 1
                raise WorkerDied("ProtocolError", f"the worker's reply was refused: {exc}; it was restarted", [], call()) from None
            except TimeoutError:
                worker.kill()
                self.generation += 1
                raise CallTimeout("Timeout", f"no answer within {self.call_timeout:g} s (an endless loop, or far too slow?); the worker was restarted",
                                  [], call()) from None
            except (EOFError, OSError):
                reason = worker.death_reason()
                worker.kill()
                self.generation += 1
                raise WorkerDied("WorkerDied", f"the worker process died during this call: {reason}; it was restarted", [], call()) from None
            try:
                reply = unpack(header, blob, self._make_proxy, device_ok=trusted_device)
                if type(reply) is not dict or len(reply) != 1 or not ({"ok", "error"} & reply.keys()):
                    raise ProtocolError("malformed reply from the worker")
                if "error" in reply and type(reply["error"]) is not dict:
                    raise ProtocolError("malformed error from the worker")
            except ProtocolError as exc:
                # A reply that is not ours to decode (forged, or out of step): never read the next
                # one from the same channel.
                worker.kill()
                self.generation += 1
                raise WorkerDied("ProtocolError", f"the worker's reply was refused: {exc}; it was restarted", [], call()) from None
            if "error" in reply:
                error = learner_error(reply["error"], call())
                self.todo_seen = self.todo_seen or error.is_todo
                raise error
            return reply["ok"]

    def output(self) -> str:
        return self.worker.output() if self.worker else ""

    def close(self) -> None:
        for worker in (self.worker, self.standby):
            if worker is not None:
                worker.kill()
        self.worker = self.standby = None


class InputStream:
    """The writing end of ``Learner.put_stream``, on the trusted side (a thread feeds the pipe)."""

    def __init__(self, fifo: Path, path: str, data: bytes, hold_seconds: float):
        self.fifo, self.path, self.data, self.hold = fifo, path, data, hold_seconds
        self.ended = False
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)

    def _feed(self) -> None:
        try:
            with open(self.fifo, "wb") as pipe:  # blocks until the learner's side opens it
                pipe.write(self.data)
                pipe.flush()
                self._release.wait(self.hold)
                self.ended = True
        except OSError:
            self.ended = True

    def __enter__(self) -> "InputStream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        if self._thread.is_alive():  # nobody opened the pipe: open it here, so the writer's open returns
            try:
                os.close(os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
        self._thread.join(5)


class Learner:
    """What a test holds: the learner's unit, reachable only through a backend."""

    def __init__(self, backend: Backend, unit_dir: str):
        self.backend, self.unit_dir = backend, unit_dir

    def module(self, name: str) -> Proxy:
        """A learner module of this unit (``"autograd"``), or a course module (``"common.gpt"``)."""
        full = name if "." in name else f"{self.unit_dir}.{name}"
        return self.backend.request({"op": "import", "module": full}, lambda: f"import {full}")

    def lib(self, name: str) -> Proxy:
        """Any installed module, imported on the learner's side (to build objects there)."""
        return self.backend.request({"op": "import", "module": name}, lambda: f"import {name}")

    def harness(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A helper of ``autograder.worker.harness``, run on the learner's side.  Its answer is
        only ever compared with something this side computed: helpers compute, they never judge."""
        return self.backend.request({"op": "harness", "name": name, "args": list(args), "kwargs": kwargs},
                                    lambda: f"{name}({describe_args(args, kwargs)})")

    def course(self, name: str) -> ModuleType:
        """The course's own copy of a provided module, on this side: ``learner.course("corpus")``
        (a module of the unit) or ``learner.course("common.gpt")``.  Secret inputs, references
        and course loops come from here, never from the copy in the learner's process."""
        from autograder.course_code import course_module

        return course_module(name if "." in name else f"{self.unit_dir}.{name}")

    def measure(self, fn: Proxy, *args: Any, **kwargs: Any) -> tuple[Any, Cost]:
        """Call ``fn(*args, **kwargs)`` on the learner's side: (its result, what it cost)."""
        return self.backend.measure({"op": "call", "target": fn, "args": list(args), "kwargs": kwargs},
                                    lambda: f"{fn._label}({describe_args(args, kwargs)})")

    def measure_harness(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, Cost]:
        """A harness helper on the learner's side (e.g. ``drain`` over a learner generator): (its
        result, what the call cost, measured from outside as ``measure`` does)."""
        return self.backend.measure({"op": "harness", "name": name, "args": list(args), "kwargs": kwargs},
                                    lambda: f"{name}({describe_args(args, kwargs)})")

    def restart(self) -> None:
        """The next call starts a fresh learner process (every object made so far is gone): for
        measurements that must cover nothing but the learner's import and its call."""
        self.backend.restart()

    def put_stream(self, data: str | bytes, hold_seconds: float = 10.0) -> "InputStream":
        """A named pipe the learner's code can open and read: ``data`` is written at once, and the
        input ends (EOF) only when the ``with`` block ends or after ``hold_seconds``.  The stream's
        ``ended`` says whether the input had ended: code that yields before ``ended`` did not wait
        for the whole input (laziness, measured here, not counted in the learner's process)."""
        here, there = self.backend.input_dir()
        path = Path(here) / f"stream-{uuid.uuid4().hex[:12]}"
        os.mkfifo(path, 0o644)
        self.backend.published(path)
        return InputStream(path, f"{there}/{path.name}", data.encode("utf-8") if isinstance(data, str) else data,
                           hold_seconds)

    def put_file(self, data: str | bytes, suffix: str = ".txt") -> str:
        """Write ``data`` (text as UTF-8) to a new file that the learner's code can read (not
        change); returns its path as the learner's side sees it."""
        here, there = self.backend.input_dir()
        fd, path = tempfile.mkstemp(suffix=suffix, prefix="input-", dir=here)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        self.backend.published(Path(path))
        return f"{there}/{Path(path).name}"

    @contextlib.contextmanager
    def time_limit(self, seconds: float):
        """Allow one slow call (a training loop) more time than course.yml's call_timeout."""
        if isinstance(self.backend, WorkerBackend):
            with self.backend.time_limit(seconds):
                yield
        else:
            yield

    @property
    def isolation(self) -> str:
        return self.backend.isolation
