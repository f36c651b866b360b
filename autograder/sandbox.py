"""Start the learner's worker process in the strongest isolation this machine offers.

Levels, strongest first:

* ``bwrap``: bubblewrap namespaces.  The worker sees the submission copy, the Python environment,
  the worker half of the grader and a private /tmp; no network, its own PID space, no
  capabilities.
* ``user``: the grader runs as root without namespaces (a Gradescope container): the worker runs
  as an unprivileged user that cannot read the course files.
* ``none``: a plain subprocess.  Grading works, with a warning in the report.

Limits: a cgroup caps memory and processes where one can be made; otherwise the watchdog here
polls the worker's process tree.  Call time is enforced by the caller (``WorkerBackend``).
"""

from __future__ import annotations

import collections
import functools
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
from pathlib import Path

from autograder.manifest import REPO_ROOT
from autograder.worker.protocol import MAX_MESSAGE_BYTES, ProtocolError

LEVELS = ("bwrap", "user", "none")
NOBODY = 65534
GRADER_IN_SANDBOX = "/grader"
SUBMISSION_IN_SANDBOX = "/submission"
_HEADER_SIZE = 16


def _python_prefixes() -> list[str]:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted(p for p in prefixes if p and not p.startswith("/usr"))


def _bwrap_base(extra_binds: list[tuple[str, str, bool]]) -> list[str]:
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--uid", "1000", "--gid", "1000", "--hostname", "sandbox",
           "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
           "--ro-bind-try", "/etc", "/etc", "--ro-bind-try", "/sys", "/sys"]
    for name in ("lib", "lib64", "lib32", "bin", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), str(path)]
    for prefix in _python_prefixes():
        cmd += ["--ro-bind", prefix, prefix]
    for device in sorted(Path("/dev").glob("nvidia*")):
        cmd += ["--dev-bind", str(device), str(device)]
    for src, dst, writable in extra_binds:
        cmd += ["--bind" if writable else "--ro-bind", src, dst]
    return cmd


@functools.lru_cache(maxsize=None)
def probe_level(wanted: str = "auto") -> tuple[str, str]:
    """The isolation level to use and, where it is weaker than bwrap, why."""
    if wanted not in ("auto", *LEVELS):
        raise ValueError(f"unknown isolation level {wanted!r}; use one of auto, {', '.join(LEVELS)}")
    reasons = []
    if wanted in ("auto", "bwrap"):
        if shutil.which("bwrap") is None:
            reasons.append("bubblewrap is not installed")
        else:
            try:
                done = subprocess.run(_bwrap_base([]) + [sys.executable, "-S", "-c", "pass"],
                                      capture_output=True, timeout=30)
                if done.returncode == 0:
                    return "bwrap", ""
                reasons.append("bubblewrap cannot make namespaces here: " + done.stderr.decode(errors="replace").strip()[:200])
            except (OSError, subprocess.TimeoutExpired) as exc:
                reasons.append(f"bubblewrap failed: {exc}")
        if wanted == "bwrap":
            raise RuntimeError("; ".join(reasons))
    if wanted in ("auto", "user"):
        if os.geteuid() != 0:
            reasons.append("not running as root, so the worker cannot be moved to another user")
        else:
            probe = subprocess.run([sys.executable, "-S", "-c", f"open({str(REPO_ROOT / 'course.yml')!r}).read()"],
                                   capture_output=True, user=NOBODY, group=NOBODY, extra_groups=[], timeout=30)
            python_ok = subprocess.run([sys.executable, "-S", "-c", "pass"], capture_output=True,
                                       user=NOBODY, group=NOBODY, extra_groups=[], timeout=30).returncode == 0
            if python_ok and probe.returncode != 0:
                return "user", "; ".join(reasons)
            reasons.append("an unprivileged user could read the course files" if python_ok
                           else "an unprivileged user cannot run this Python")
        if wanted == "user":
            raise RuntimeError("; ".join(reasons))
    return "none", "; ".join(reasons) or "isolation switched off"


class Cgroup:
    """A cgroup (v1 or v2) with memory and process caps, if this machine lets us make one."""

    def __init__(self, memory_bytes: int, max_pids: int):
        self.dirs: list[Path] = []
        name = f"course-grader-{uuid.uuid4().hex[:12]}"
        unified = Path("/sys/fs/cgroup/cgroup.controllers")
        try:
            if unified.exists():
                path = Path("/sys/fs/cgroup") / name
                path.mkdir()
                self.dirs.append(path)
                (path / "memory.max").write_text(str(memory_bytes))
                (path / "memory.swap.max").write_text("0")
                (path / "pids.max").write_text(str(max_pids))
                self.kind = "v2"
            else:
                for controller, settings in (("memory", {"memory.limit_in_bytes": memory_bytes}),
                                             ("pids", {"pids.max": max_pids})):
                    path = Path("/sys/fs/cgroup") / controller / name
                    path.mkdir()
                    self.dirs.append(path)
                    for key, value in settings.items():
                        (path / key).write_text(str(value))
                self.kind = "v1"
        except OSError:
            self.remove()
            raise

    def attach(self, pid: int) -> None:
        for path in self.dirs:
            (path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.dirs:
            try:
                found |= {int(p) for p in (path / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return found

    def hit_memory_limit(self) -> bool:
        for path in self.dirs:
            for name, marker in (("memory.failcnt", None), ("memory.events", "oom_kill")):
                file = path / name
                if not file.exists():
                    continue
                text = file.read_text()
                if marker is None and text.strip() not in ("", "0"):
                    return True
                if marker and any(line.split()[0] == marker and line.split()[1] != "0" for line in text.splitlines() if line.strip()):
                    return True
        return False

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        for path in self.dirs:
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
        self.dirs = []


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


class Worker:
    """One running worker process and its channels."""

    def __init__(self, argv: list[str], env: dict, cwd: str, memory_bytes: int, max_pids: int,
                 preexec_user: int | None, cgroup_ok: bool):
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        config = json.loads(argv[-1])
        config["fds"] = [req_r, rep_w]
        argv = argv[:-1] + [json.dumps(config)]
        self.memory_bytes, self.max_pids = memory_bytes, max_pids
        self.reason: str | None = None
        self.cgroup = None
        if cgroup_ok:
            try:
                self.cgroup = Cgroup(memory_bytes, max_pids)
            except OSError:
                self.cgroup = None
        user_kwargs = {"user": preexec_user, "group": preexec_user, "extra_groups": []} if preexec_user is not None else {}
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, env=env, cwd=cwd,
                                        pass_fds=(req_r, rep_w), start_new_session=True, **user_kwargs)
        if self.cgroup is not None:
            try:
                self.cgroup.attach(self.process.pid)
            except OSError:
                self.cgroup.remove()
                self.cgroup = None
        for fd in (req_r, rep_w, out_w):
            os.close(fd)
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
                if rss > self.memory_bytes:
                    self.reason = f"it used more than {self.memory_bytes >> 20} MB of memory"
                    self.kill()
                    return

    def alive(self) -> bool:
        return self.process.poll() is None and self.reason is None

    def death_reason(self) -> str:
        if self.reason:
            return self.reason
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        if self.cgroup is not None and self.cgroup.hit_memory_limit():
            return f"it used more than {self.memory_bytes >> 20} MB of memory"
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

    def _read(self, size: int, deadline: float) -> bytes:
        buffer = bytearray()
        while len(buffer) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            readable, _, _ = select.select([self.rep_r], [], [], min(left, 0.5))
            if not readable:
                if self.reason is not None:
                    raise EOFError
                continue
            chunk = os.read(self.rep_r, min(size - len(buffer), 1 << 20))
            if not chunk:
                raise EOFError
            buffer += chunk
        return bytes(buffer)

    def call(self, data: bytes, timeout: float, send: bool = True) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        if send:
            self._write(data, deadline)
        header = self._read(_HEADER_SIZE, deadline)
        header_len = int.from_bytes(header[:8], "little")
        blob_len = int.from_bytes(header[8:], "little")
        if header_len + blob_len > MAX_MESSAGE_BYTES:
            raise ProtocolError("reply over the size limit")
        return self._read(header_len, deadline), self._read(blob_len, deadline)

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has imported its half of the grader and is ready for calls."""
        try:
            self.call(b"", timeout, send=False)
        except TimeoutError:
            self.reason = self.reason or f"it did not start within {timeout:g} s (is the machine overloaded?)"
            raise EOFError from None

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
        for fd in (self.req_w, self.rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.req_w = self.rep_r = -1
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None


def grading_tree(submission_root: Path, unit_dir: str, learner_files: list[str], provided: list[str]) -> Path:
    """A fresh folder with what the learner's code may see: the course's files of the unit (its
    __init__.py, data, provided folders such as common/) and the learner's own files."""
    root = Path(tempfile.mkdtemp(prefix="course-worker-")) / "submission"
    root.mkdir()
    course_files = shutil.ignore_patterns("__pycache__", "test_*.py", "*.ipynb", *learner_files)
    for name in [unit_dir, *provided]:
        source = REPO_ROOT / "exercises" / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=course_files)
    for name in learner_files:
        source = submission_root / unit_dir / name
        if source.is_file():
            shutil.copy2(source, root / unit_dir / name)
    return root


class Spawner:
    """Makes workers for one unit: copies the submission, picks the level, builds the command."""

    def __init__(self, submission_root: Path, unit_dir: str, learner_files: list[str], provided: list[str],
                 forbidden: list[dict], memory_mb: int, max_processes: int, max_file_kb: int, level: str = "auto"):
        self.level, self.weaker_because = probe_level(level)
        self.root = grading_tree(Path(submission_root), unit_dir, learner_files, provided)
        self.workdir = self.root.parent
        if self.level != "bwrap":
            # The worker imports its half of the grader from a copy, never from the course tree.
            self.grader_copy = self.workdir / "grader" / "autograder"
            shutil.copytree(REPO_ROOT / "autograder" / "worker", self.grader_copy / "worker",
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(REPO_ROOT / "autograder" / "__init__.py", self.grader_copy / "__init__.py")
        self.unit_dir = unit_dir
        self.forbidden = forbidden
        self.memory_bytes = memory_mb << 20
        self.max_processes = max_processes
        self.file_bytes = max(max_file_kb << 10, 64 << 20)
        if self.level == "user":
            for path in [self.workdir, *self.workdir.rglob("*")]:
                os.chown(path, NOBODY, NOBODY)

    def __call__(self) -> Worker:
        inside_root = SUBMISSION_IN_SANDBOX if self.level == "bwrap" else str(self.root)
        grader_path = GRADER_IN_SANDBOX if self.level == "bwrap" else str(self.workdir / "grader")
        config = {
            "root": inside_root,
            "learner_dirs": [self.unit_dir],
            "forbidden": self.forbidden,
            "limits": {"file_bytes": self.file_bytes, "max_processes": self.max_processes,
                       "address_bytes": self.memory_bytes + (8 << 30)},
            "fds": [],
        }
        bootstrap = (f"import sys; sys.path[:0] = [{grader_path!r}]; "
                     "from autograder.worker.main import main; sys.exit(main())")
        python = [sys.executable, "-E", "-s", "-c", bootstrap, json.dumps(config)]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 8)))}
        for key in ("CUDA_VISIBLE_DEVICES", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LD_LIBRARY_PATH"):
            if key in os.environ:
                env[key] = os.environ[key]
        preexec_user = None
        if self.level == "bwrap":
            binds = [(str(REPO_ROOT / "autograder" / "__init__.py"), f"{GRADER_IN_SANDBOX}/autograder/__init__.py", False),
                     (str(REPO_ROOT / "autograder" / "worker"), f"{GRADER_IN_SANDBOX}/autograder/worker", False),
                     (str(self.root), SUBMISSION_IN_SANDBOX, True)]
            argv = _bwrap_base(binds) + ["--chdir", SUBMISSION_IN_SANDBOX, "--setenv", "HOME", "/tmp"] + python
        else:
            argv = python
            if self.level == "user":
                preexec_user = NOBODY
        return Worker(argv, env, str(self.root), self.memory_bytes, self.max_processes, preexec_user,
                      cgroup_ok=os.geteuid() == 0)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
