"""Start the learner's worker process in the strongest isolation this machine offers.

Levels, strongest first:

* ``bwrap``: bubblewrap namespaces.  The worker sees the submission copy (read-only), the Python
  environment, the worker half of the grader, the inputs the tests wrote for it (read-only), a
  few files of /etc, and a private, size-capped /tmp; no network, its own PID space, no
  capabilities, and no forbidden package of the unit (its folder is replaced at the mount level).
* ``user``: the grader runs as root without namespaces (a Gradescope container): the worker runs
  as an unprivileged user that cannot read the course files.
* ``none``: a plain subprocess.  Grading works, with a warning in the report.

Limits: a cgroup (v1 or v2) caps memory, processes and CPU where one can be made; the worker joins
it before its first instruction (a tiny launcher writes its own pid into the cgroup, then execs
bubblewrap or Python), so nothing the learner starts ever runs outside it.  The same cgroup is how
the trusted side measures the learner's code from outside: CPU time of the whole process tree and
peak memory, which a process cannot lower.  Without a cgroup the watchdog here polls the worker's
process tree in /proc.  Call time is enforced by the caller (``WorkerBackend``).

Every worker's folder and cgroup is recorded in the run's work folder, so ``cleanup_work_dir``
removes all of it after a unit, whatever happened to the trusted process.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from autograder.manifest import REPO_ROOT

LEVELS = ("bwrap", "user", "none")
NOBODY = 65534
GRADER_IN_SANDBOX = "/grader"
SUBMISSION_IN_SANDBOX = "/submission"
INPUTS_IN_SANDBOX = "/inputs"
TMP_BYTES = 512 << 20  # the sandbox's only writable space (a tmpfs, charged to the worker's memory)
_HEADER_SIZE = 16
# What the dynamic linker, time zones and Python need of /etc; nothing else of the host's /etc
# (shadow, keys, the grader's configuration) is visible in the sandbox.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives", "nsswitch.conf")
# /sys for CPU topology (torch, OpenMP); GPU machines also need the PCI tree for the driver.
SYS_CPU = ("/sys/devices/system/cpu", "/sys/devices/system/node")

# Runs first in the new process: join the cgroups, drop to the worker's user, ask to be killed with
# the trusted process, then become bubblewrap or Python.  Plain Python with no site, no imports of
# the course, so it is done in a few milliseconds.
LAUNCHER = r"""
import ctypes, json, os, sys
cfg = json.loads(sys.argv[1])
try:
    for procs in cfg["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL (after setuid)
    if os.getppid() != cfg["parent"]:
        os._exit(125)
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"the sandbox launcher failed: {exc}\n")
    os._exit(126)
"""


def dies_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run through the launcher: killed with the process (thread) that starts it, so a grading
    run never outlives the grader that waits for it."""
    launch = {"cgroup_procs": [], "uid": None, "parent": os.getpid()}
    return [sys.executable, "-S", "-E", "-c", LAUNCHER, json.dumps(launch), shutil.which(argv[0]) or argv[0], *argv[1:]]


def _python_prefixes() -> list[str]:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted(p for p in prefixes if p and not p.startswith("/usr"))


def _bwrap_base(extra_binds: list[tuple[str, str, bool]], gpu: bool = False) -> list[str]:
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--uid", "1000", "--gid", "1000", "--hostname", "sandbox",
           "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev",
           "--size", str(TMP_BYTES), "--tmpfs", "/tmp", "--dir", "/etc"]
    for name in ETC_FILES:
        cmd += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for path in (("/sys",) if gpu else SYS_CPU):
        cmd += ["--ro-bind-try", path, path]
    for name in ("lib", "lib64", "lib32", "bin", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), str(path)]
    for prefix in _python_prefixes():
        cmd += ["--ro-bind", prefix, prefix]
    if gpu:
        for device in sorted(Path("/dev").glob("nvidia*")):
            cmd += ["--dev-bind", str(device), str(device)]
    for src, dst, writable in extra_binds:
        cmd += ["--bind" if writable else "--ro-bind", src, dst]
    return cmd


def _runs(argv: list[str], **kwargs) -> tuple[bool, str]:
    """Does this command run and exit 0?  (ok, why not), never an exception."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, **kwargs)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return done.returncode == 0, done.stderr.decode(errors="replace").strip()[:200]


@functools.lru_cache(maxsize=None)
def probe_level(wanted: str = "auto") -> tuple[str, str]:
    """The isolation level to use and, where it is weaker than bwrap, why.

    Never raises for a probe that fails: each failure becomes a reason and the next level is tried.
    Only an explicit request for a level this machine cannot give is an error."""
    if wanted not in ("auto", *LEVELS):
        raise ValueError(f"unknown isolation level {wanted!r}; use one of auto, {', '.join(LEVELS)}")
    reasons = []
    if wanted in ("auto", "bwrap"):
        if shutil.which("bwrap") is None:
            reasons.append("bubblewrap is not installed")
        else:
            ok, why = _runs(_bwrap_base([]) + [sys.executable, "-S", "-c", "pass"])
            if ok:
                return "bwrap", ""
            reasons.append("bubblewrap cannot make namespaces here: " + why)
        if wanted == "bwrap":
            raise RuntimeError("; ".join(reasons))
    if wanted in ("auto", "user"):
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            reasons.append("not running as root, so the worker cannot be moved to another user")
        else:
            as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
            python_ok, why = _runs([sys.executable, "-S", "-c", "pass"], **as_nobody)
            reads_course, _ = _runs([sys.executable, "-S", "-c", f"open({str(REPO_ROOT / 'course.yml')!r}).read()"],
                                    **as_nobody)
            if python_ok and not reads_course:
                return "user", "; ".join(reasons)
            reasons.append("an unprivileged user could read the course files" if python_ok
                           else f"an unprivileged user cannot run this Python ({why or 'permission denied'})")
        if wanted == "user":
            raise RuntimeError("; ".join(reasons))
    return "none", "; ".join(reasons) or "isolation switched off"


# --- cgroups ---------------------------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")


def _own_v1_paths() -> dict[str, str]:
    """controller -> this process's cgroup path in that v1 hierarchy ("/" when at the root)."""
    paths = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                paths[controller] = path
    except (OSError, ValueError):
        pass
    return paths


class Cgroup:
    """One worker's cgroup (v1 or v2): caps memory, processes and CPU, and reads what the worker
    used: CPU time of every process in it and its peak memory, from outside the worker."""

    def __init__(self, memory_bytes: int, max_pids: int, cpus: float):
        self.dirs: list[Path] = []
        name = f"course-grader-{uuid.uuid4().hex[:12]}"
        self.peak_file = None
        try:
            if (CGROUP_ROOT / "cgroup.controllers").exists():
                self.kind = "v2"
                path = CGROUP_ROOT / name
                try:
                    (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory +pids +cpu")
                except OSError:
                    pass
                path.mkdir()
                self.dirs.append(path)
                self.memory = self.pids_dir = self.cpu = self.cpuacct = path
                (path / "memory.max").write_text(str(memory_bytes))
                (path / "memory.swap.max").write_text("0")
                (path / "pids.max").write_text(str(max_pids))
                (path / "cpu.max").write_text(f"{int(cpus * 100_000)} 100000")
            else:
                self.kind = "v1"
                own = _own_v1_paths()
                made: dict[str, Path] = {}
                for controller in V1_CONTROLLERS:
                    mount = CGROUP_ROOT / controller
                    if not mount.is_dir():
                        raise OSError(f"no cgroup v1 {controller} hierarchy")
                    parent = mount / own.get(controller, "/").lstrip("/")
                    path = (parent if parent.is_dir() else mount) / name
                    real = path.resolve() if path.exists() else path
                    if real not in made.values():  # cpu and cpuacct are often one hierarchy
                        path.mkdir()
                        self.dirs.append(path)
                    made[controller] = path
                self.memory, self.pids_dir, self.cpu, self.cpuacct = (made[c] for c in V1_CONTROLLERS)
                (self.memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
                if (self.memory / "memory.memsw.limit_in_bytes").exists():
                    (self.memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                (self.pids_dir / "pids.max").write_text(str(max_pids))
                (self.cpu / "cpu.cfs_period_us").write_text("100000")
                (self.cpu / "cpu.cfs_quota_us").write_text(str(int(cpus * 100_000)))
        except OSError:
            self.remove()
            raise

    @property
    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.dirs]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.dirs:
            try:
                found |= {int(p) for p in (path / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return found

    # measurements ---------------------------------------------------------------------------------
    def cpu_ns(self) -> int:
        """CPU time, user and system, of every process that ever ran in this cgroup."""
        if self.kind == "v1":
            return int((self.cpuacct / "cpuacct.usage").read_text())
        for line in (self.cpu / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) * 1000
        raise OSError("cpu.stat has no usage_usec")

    def memory_now(self) -> int:
        name = "memory.usage_in_bytes" if self.kind == "v1" else "memory.current"
        return int((self.memory / name).read_text())

    def anonymous_now(self) -> int:
        """Anonymous memory only (the heap, tensors): what the worker's objects hold, without the
        file pages of the libraries it loaded."""
        key = "rss" if self.kind == "v1" else "anon"
        for line in (self.memory / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == key:
                return int(value)
        raise OSError(f"memory.stat has no {key}")

    def memory_peak(self, reset: bool = False) -> int:
        """The peak since the last reset (v1, and v2 where memory.peak can be reset) or since the
        cgroup was made.  Only the trusted side can reset it: the file is not writable in the
        sandbox."""
        if self.kind == "v1":
            file = self.memory / "memory.max_usage_in_bytes"
            peak = int(file.read_text())
            if reset:
                file.write_text("0")  # v1: the peak restarts from the current usage
            return peak
        if self.peak_file is None:  # v2 (Linux >= 6.12): a write resets the peak seen through this fd
            self.peak_file = open(self.memory / "memory.peak", "r+")
        self.peak_file.seek(0)
        peak = int(self.peak_file.read().split()[0])
        if reset:
            try:
                self.peak_file.seek(0)
                self.peak_file.write("reset\n")
                self.peak_file.flush()
            except OSError:
                pass
        return peak

    def hit_memory_limit(self) -> bool:
        for path in self.dirs:
            for name, marker in (("memory.failcnt", None), ("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
                file = path / name
                try:
                    text = file.read_text()
                except OSError:
                    continue
                if marker is None and text.strip() not in ("", "0"):
                    return True
                if marker and any(line.split()[0] == marker and line.split()[1] != "0" for line in text.splitlines()
                                  if len(line.split()) == 2):
                    return True
        return False

    def kill_all(self) -> None:
        for _ in range(20):  # a process may fork while we kill: repeat until the cgroup is empty
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        if self.peak_file is not None:
            self.peak_file.close()
            self.peak_file = None
        for path in self.dirs:
            _rmdir_cgroup(path)
        self.dirs = []


def _rmdir_cgroup(path: Path) -> None:
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


# --- the process tree, from /proc (where there is no cgroup) ----------------------------------------

def _tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                children[int(fields[1])].append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    found, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _hwm_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident memory (it can reset it through clear_refs: best effort)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_ns_of(pid: int) -> int:
    """CPU time of every thread of a process (schedstat: nanoseconds on a CPU)."""
    total = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task.name}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        pass
    return total


# --- measuring the worker from outside ----------------------------------------------------------------

@dataclass
class Usage:
    """What the worker's processes used, read from outside: by the cgroup, or by /proc."""
    cpu_ns: int
    memory: int
    anonymous: int
    source: str


def _anonymous_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Meter:
    """Reads the worker's CPU time and memory from outside it (the cgroup, else /proc).

    ``life_peak`` is the highest memory the worker ever reached, kept here across per-call resets."""

    def __init__(self, worker: "Worker"):
        self.worker = worker
        self.life_peak = 0
        self.sampled_peak = 0  # the watchdog's RSS samples, for machines without a cgroup

    @property
    def source(self) -> str:
        return "cgroup" if self.worker.cgroup is not None else "/proc"

    def now(self) -> Usage:
        cgroup = self.worker.cgroup
        if cgroup is not None:
            return Usage(cgroup.cpu_ns(), cgroup.memory_now(), cgroup.anonymous_now(), "cgroup")
        pids = _tree(self.worker.process.pid)
        return Usage(sum(_cpu_ns_of(p) for p in pids), sum(_rss_bytes(p) for p in pids),
                     sum(_anonymous_bytes(p) for p in pids), "/proc")

    def peak(self, reset: bool = False) -> int:
        cgroup = self.worker.cgroup
        if cgroup is not None:
            value = cgroup.memory_peak(reset)
        else:
            pids = _tree(self.worker.process.pid)
            value = max(self.sampled_peak, sum(_hwm_bytes(p) for p in pids), sum(_rss_bytes(p) for p in pids))
            if reset:
                self.sampled_peak = 0
        self.life_peak = max(self.life_peak, value)
        return value


class Worker:
    """One running worker process and its channels."""

    def __init__(self, argv: list[str], env: dict, cwd: str, memory_bytes: int, max_pids: int, cpus: float,
                 user: int | None, cgroup_ok: bool, registry: Path | None = None):
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        config = json.loads(argv[-1])
        config["fds"] = [req_r, rep_w]
        argv = argv[:-1] + [json.dumps(config)]
        self.memory_bytes, self.max_pids = memory_bytes, max_pids
        self.reason: str | None = None
        self.cgroup = None
        self.registry = registry
        if cgroup_ok:
            try:
                self.cgroup = Cgroup(memory_bytes, max_pids, cpus)
            except OSError:
                self.cgroup = None
        if self.cgroup is not None:
            _record(registry, "cgroup", *map(str, self.cgroup.dirs))
        launch = {"cgroup_procs": self.cgroup.procs_files if self.cgroup else [], "uid": user, "parent": os.getpid()}
        program = shutil.which(argv[0]) or argv[0]
        self.process = subprocess.Popen([sys.executable, "-S", "-E", "-c", LAUNCHER, json.dumps(launch), program, *argv[1:]],
                                        stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, env=env, cwd=cwd,
                                        pass_fds=(req_r, rep_w), start_new_session=True)
        _record(registry, "pgid", str(self.process.pid))
        for fd in (req_r, rep_w, out_w):
            os.close(fd)
        self.meter = Meter(self)
        self.ready = False
        self.ready_memory = 0
        self.peak_at_end = 0
        self.memory_hit = False
        self._output = collections.deque(maxlen=200)
        self._output_bytes = 0
        self._drain = threading.Thread(target=self._drain_output, args=(out_r,), daemon=True)
        self._drain.start()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, daemon=True)
        self._watch.start()

    # output -------------------------------------------------------------------
    def _drain_output(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                if self._output_bytes < 1 << 20:
                    self._output.append(chunk)
                self._output_bytes += len(chunk)

    def output(self) -> str:
        text = b"".join(self._output).decode("utf-8", errors="replace")
        return text[-4000:]

    # limits -------------------------------------------------------------------
    def _watchdog(self) -> None:
        while not self._stop.wait(0.1):
            if self.process.poll() is not None:
                return
            pids = sorted(self.cgroup.pids()) if self.cgroup else _tree(self.process.pid)
            if len(pids) > self.max_pids:
                self.reason = f"it started more than {self.max_pids} processes"
                self.kill()
                return
            if self.cgroup is None:
                rss = sum(_rss_bytes(pid) for pid in pids)
                self.meter.sampled_peak = max(self.meter.sampled_peak, rss)
                if rss > self.memory_bytes:
                    self.reason = f"it used more than {self.memory_bytes >> 20} MB of memory"
                    self.kill()
                    return

    def _read_memory_outcome(self) -> None:
        """Whether the cgroup stopped the worker for memory, and the peak it reached (kept for
        the report, since the cgroup is removed with the worker)."""
        if self.cgroup is None:
            return
        try:
            self.peak_at_end = max(self.peak_at_end, self.meter.life_peak, self.cgroup.memory_peak())
            self.memory_hit = self.memory_hit or self.cgroup.hit_memory_limit()
        except OSError:
            pass

    def alive(self) -> bool:
        return self.process.poll() is None and self.reason is None

    def death_reason(self) -> str:
        if self.reason:
            return self.reason
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        self._read_memory_outcome()
        if self.memory_hit:
            return f"it used more than {self.memory_bytes >> 20} MB of memory (stopped at {self.peak_at_end >> 20} MB)"
        if code == 126 and "sandbox launcher failed" in self.output():
            return self.output().strip().splitlines()[-1]
        if code > 128 and code - 128 in signal.valid_signals():
            code = 128 - code  # bwrap reports its child's fatal signal as 128 + signal number
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (a crash in native code)" if name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL") else ""
            return f"killed by {name}{hint}"
        return f"it exited with code {code} (sys.exit or os._exit in your code?)"

    # the channel ---------------------------------------------------------------
    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            _, writable, _ = select.select([], [self.req_w], [], left)
            if writable:
                try:
                    view = view[os.write(self.req_w, view[: 1 << 16]) :]
                except BrokenPipeError:
                    raise EOFError from None

    def _read(self, size: int, deadline: float) -> bytearray:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            readable, _, _ = select.select([self.rep_r], [], [], min(left, 0.5))
            if not readable:
                if self.reason is not None:
                    raise EOFError
                continue
            count = os.readv(self.rep_r, [view[got : got + (1 << 20)]])
            if not count:
                raise EOFError
            got += count
        return buffer

    def call(self, data: bytes, timeout: float, send: bool = True, max_bytes: int | None = None) -> tuple[bytes, bytes]:
        # Imported here: the protocol needs torch, and a process that only starts graders (course
        # grade, a mutant's grade) should not pay seconds of CPU to import it.
        from autograder.worker.protocol import MAX_HEADER_BYTES, MAX_REPLY_BYTES, ProtocolError

        max_bytes = MAX_REPLY_BYTES if max_bytes is None else max_bytes
        deadline = time.monotonic() + timeout
        if send:
            self._write(data, deadline)
        header = self._read(_HEADER_SIZE, deadline)
        header_len = int.from_bytes(header[:8], "little")
        blob_len = int.from_bytes(header[8:], "little")
        if header_len > MAX_HEADER_BYTES:
            raise ProtocolError(f"the worker's reply has a {header_len >> 20} MiB header, over the {MAX_HEADER_BYTES >> 20} MiB limit")
        if header_len + blob_len > max_bytes:
            raise ProtocolError(f"the worker's reply of {(header_len + blob_len) >> 20} MiB is over the "
                                f"{max_bytes >> 20} MiB limit for one result")
        return self._read(header_len, deadline), self._read(blob_len, deadline)

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has imported its half of the grader and is ready for calls."""
        try:
            self.call(b"", timeout, send=False)
        except TimeoutError:
            self.reason = self.reason or f"it did not start within {timeout:g} s (is the machine overloaded?)"
            raise EOFError from None
        self.ready = True
        try:
            self.ready_memory = self.meter.now().memory
            self.meter.peak(reset=True)
        except OSError:
            self.ready_memory = 0

    def kill(self) -> None:
        self._stop.set()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.cgroup is not None:
            self.cgroup.kill_all()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._read_memory_outcome()
        for fd in (self.req_w, self.rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.req_w = self.rep_r = -1
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None


# --- the work folder: everything a unit's workers leave behind ------------------------------------------

REGISTRY = "registry.txt"


def _record(registry: Path | None, kind: str, *values: str) -> None:
    if registry is None:
        return
    with open(registry, "a", encoding="utf-8") as f:
        for value in values:
            f.write(f"{kind} {value}\n")


def cleanup_work_dir(work: Path) -> None:
    """Kill every process and remove every cgroup and file the unit's workers had, whatever state
    the trusted process died in (called by the runner after the unit's pytest has ended)."""
    work = Path(work)
    try:
        lines = (work / REGISTRY).read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    cgroups = [Path(line.split(" ", 1)[1]) for line in lines if line.startswith("cgroup ")]
    for pgid in [int(line.split()[1]) for line in lines if line.startswith("pgid ")]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
    for _ in range(20):
        alive = False
        for path in cgroups:
            try:
                pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            except OSError:
                continue
            for pid in pids:
                alive = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not alive:
            break
        time.sleep(0.05)
    for path in cgroups:
        _rmdir_cgroup(path)
    shutil.rmtree(work, ignore_errors=True)


# --- what the worker sees -------------------------------------------------------------------------------

def grading_tree(submission_root: Path, unit_dir: str, learner_files: list[str], provided: list[str],
                 parent: Path | None = None) -> Path:
    """A fresh folder with what the learner's code may see: the course's files of the unit (its
    __init__.py, data, provided folders such as common/) and the learner's own files."""
    root = Path(tempfile.mkdtemp(prefix="course-worker-", dir=parent)) / "submission"
    root.mkdir()
    course_files = shutil.ignore_patterns("__pycache__", "test_*.py", "*.ipynb", *learner_files)
    for name in [unit_dir, *provided]:
        source = REPO_ROOT / "exercises" / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=course_files)
    for name in learner_files:
        source = submission_root / unit_dir / name
        if source.is_file() and not source.is_symlink():
            shutil.copy2(source, root / unit_dir / name)
    return root


def hidden_package_binds(forbidden: list[dict], stubs: Path) -> list[tuple[str, str, bool]]:
    """Mount-level hiding of forbidden packages: each installed package's folder (or module file)
    is replaced in the sandbox by a stub whose import fails with the course's reason."""
    binds = []
    for item in forbidden:
        name = item["name"]
        if "." in name:
            continue  # a function: guarded at run time (best effort), not hidden
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue  # not installed: nothing to hide
        message = f"{name} is not available in this unit: {item['reason']}"
        source = f"raise ModuleNotFoundError({message!r}, name={name!r})\n"
        locations = list(spec.submodule_search_locations or [])
        if locations:
            stub = stubs / name
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "__init__.py").write_text(source)
            binds += [(str(stub), location, False) for location in locations]
        elif spec.origin and os.path.isfile(spec.origin):
            stub = stubs / f"{name}{Path(spec.origin).suffix}"
            if stub.suffix == ".py":
                stub.write_text(source)
            else:  # an extension module: an empty file cannot be loaded
                stub.write_bytes(b"")
            binds.append((str(stub), spec.origin, False))
    return binds


class Spawner:
    """Makes workers for one unit: copies the submission, picks the level, builds the command."""

    def __init__(self, submission_root: Path, unit_dir: str, learner_files: list[str], provided: list[str],
                 forbidden: list[dict], memory_mb: int, max_processes: int, max_file_kb: int, level: str = "auto",
                 work_dir: Path | None = None, gpu: bool = False):
        self.level, self.weaker_because = probe_level(level)
        self.registry = (Path(work_dir) / REGISTRY) if work_dir else None
        self.root = grading_tree(Path(submission_root), unit_dir, learner_files, provided, parent=work_dir)
        self.workdir = self.root.parent
        _record(self.registry, "dir", str(self.workdir))
        self.inputs = self.workdir / "inputs"
        self.inputs.mkdir()
        self.tmp = self.workdir / "tmp"
        self.tmp.mkdir()
        self.gpu = gpu
        if self.level != "bwrap":
            # The worker imports its half of the grader from a copy, never from the course tree.
            self.grader_copy = self.workdir / "grader" / "autograder"
            shutil.copytree(REPO_ROOT / "autograder" / "worker", self.grader_copy / "worker",
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(REPO_ROOT / "autograder" / "__init__.py", self.grader_copy / "__init__.py")
        self.hidden = hidden_package_binds(forbidden, self.workdir / "hidden") if self.level == "bwrap" else []
        (self.workdir / "etc").mkdir()
        (self.workdir / "etc" / "passwd").write_text("learner:x:1000:1000::/tmp:/usr/sbin/nologin\n")
        (self.workdir / "etc" / "group").write_text("learner:x:1000:\n")
        self.unit_dir = unit_dir
        self.learner_files = learner_files
        self.forbidden = forbidden
        self.memory_bytes = memory_mb << 20
        self.max_processes = max_processes
        self.file_bytes = max(max_file_kb << 10, 64 << 20)
        # The worker may use all cores but one: the trusted side, which times baselines and decides
        # verdicts, always keeps a core of its own.
        self.cpus = max(1, (os.cpu_count() or 1) - 1)
        if self.level == "user":
            # Root owns the copy, readable by all: the worker's user reads it and cannot change it;
            # only tmp/ is its own.
            for path in [self.workdir, *self.workdir.rglob("*")]:
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            os.chown(self.tmp, NOBODY, NOBODY)

    def inputs_path(self) -> str:
        """Where the worker sees the inputs folder."""
        return INPUTS_IN_SANDBOX if self.level == "bwrap" else str(self.inputs)

    def publish_input(self, path: Path) -> None:
        """Make a file the trusted side wrote into the inputs folder readable by the worker."""
        if self.level == "user":
            os.chmod(path, 0o644)

    def __call__(self) -> Worker:
        inside_root = SUBMISSION_IN_SANDBOX if self.level == "bwrap" else str(self.root)
        grader_path = GRADER_IN_SANDBOX if self.level == "bwrap" else str(self.workdir / "grader")
        learner = {self.root / self.unit_dir / name for name in self.learner_files}
        course_files = [f"{inside_root}/{p.relative_to(self.root).as_posix()}" for p in sorted(self.root.rglob("*.py"))
                        if p not in learner]
        config = {
            "root": inside_root,
            "course_files": course_files,
            "forbidden": self.forbidden,
            "limits": {"file_bytes": self.file_bytes, "max_processes": self.max_processes,
                       "address_bytes": self.memory_bytes + (8 << 30)},
            "fds": [],
        }
        bootstrap = (f"import sys; sys.path[:0] = [{grader_path!r}]; "
                     "from autograder.worker.main import main; sys.exit(main())")
        python = [sys.executable, "-E", "-s", "-c", bootstrap, json.dumps(config)]
        tmp = "/tmp" if self.level == "bwrap" else str(self.tmp)
        threads = str(int(self.cpus))
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "USER": "learner", "LOGNAME": "learner",
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
               # glibc serves blocks of 128 KiB and more by mmap and gives them back when freed (it
               # raises this threshold up to 32 MiB by itself otherwise): memory measured from
               # outside then shows what the learner's objects hold, not what the allocator kept.
               "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
        for key in ("CUDA_VISIBLE_DEVICES", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LD_LIBRARY_PATH"):
            if key in os.environ:
                env[key] = os.environ[key]
        user = None
        if self.level == "bwrap":
            binds = [(str(REPO_ROOT / "autograder" / "__init__.py"), f"{GRADER_IN_SANDBOX}/autograder/__init__.py", False),
                     (str(REPO_ROOT / "autograder" / "worker"), f"{GRADER_IN_SANDBOX}/autograder/worker", False),
                     (str(self.root), SUBMISSION_IN_SANDBOX, False),
                     (str(self.inputs), INPUTS_IN_SANDBOX, False),
                     (str(self.workdir / "etc" / "passwd"), "/etc/passwd", False),
                     (str(self.workdir / "etc" / "group"), "/etc/group", False),
                     *self.hidden]
            argv = _bwrap_base(binds, self.gpu) + ["--chdir", SUBMISSION_IN_SANDBOX] + python
        else:
            argv = python
            if self.level == "user":
                user = NOBODY
        return Worker(argv, env, str(self.root), self.memory_bytes, self.max_processes, self.cpus, user,
                      cgroup_ok=hasattr(os, "geteuid") and os.geteuid() == 0, registry=self.registry)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
