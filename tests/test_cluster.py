"""`course grade-all --cluster`: a real Dask scheduler and two real worker processes on loopback,
started here and stopped at the end.  The cluster gives the same gradebook as the local pool, a
worker killed mid-batch costs a retry (never a lost or doubled row), an interrupted batch resumes,
and GPU tasks go only to a node that declares a GPU."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from autograder import batch
from autograder.manifest import REPO_ROOT, load_course
from autograder.submission import pack_submission

COURSE = load_course()
UNIT1 = COURSE.unit("unit1")
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


@pytest.fixture
def cluster():
    """(scheduler address, {worker name: its process}): worker "gpu" declares the resource GPU=1."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = {"scheduler": _start([*DASK, "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"])}
    for name, resources in (("cpu", []), ("gpu", ["--resources", "GPU=1"])):
        processes[name] = _start([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
                                  "--nthreads", "1", "--no-nanny", "--no-dashboard", *resources])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout="5s") as client:
                    if len(client.scheduler_info()["workers"]) == 2:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Dask cluster did not come up within 120 s"
            time.sleep(0.5)
        yield address, processes
    finally:
        for process in processes.values():
            _stop(process)


def _unit1(folder: Path, source: Path = REPO_ROOT / "solutions") -> Path:
    (folder / "unit1").mkdir(parents=True)
    for name in UNIT1.files:
        shutil.copy(source / "unit1" / name, folder / "unit1" / name)
    return folder


def _class(tmp_path: Path) -> Path:
    """Solved, unsolved, broken, hostile and unsafe submissions."""
    subs = tmp_path / "submissions"
    _unit1(subs / "solved")
    broken = _unit1(subs / "broken")
    (broken / "unit1" / "autograd.py").write_text("class Value:\n    def __init__(self, data\n")
    hostile = _unit1(subs / "hostile", REPO_ROOT / "exercises")
    (hostile / "unit1" / "fused.py").write_text("import os\nos._exit(0)\n")
    pack_submission(REPO_ROOT / "exercises", COURSE, subs / "stub.zip", "2026-01-01T00:00:00+00:00")
    with zipfile.ZipFile(subs / "unsafe.zip", "w") as archive:
        archive.writestr("/etc/evil.py", "x")
    return subs


def _gradebook(outcomes, path: Path) -> list[dict]:
    batch.write_gradebook(COURSE, outcomes, path, ["unit1"])
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_cluster_gives_the_local_gradebook(tmp_path, cluster):
    address, _ = cluster
    subs = _class(tmp_path)
    local = batch.grade_all(COURSE, subs, tmp_path / "local.d", units=["unit1"], jobs=2)
    executor, _, client = batch.cluster_executor(address)
    try:
        remote = batch.grade_all(COURSE, subs, tmp_path / "cluster.d", units=["unit1"], executor=executor)
    finally:
        client.close()
    assert _gradebook(remote, tmp_path / "cluster.csv") == _gradebook(local, tmp_path / "local.csv")
    rows = {r["learner"]: r for r in _gradebook(remote, tmp_path / "cluster.csv")}
    assert float(rows["solved"]["total"]) == float(rows["solved"]["max"]) > 0
    assert float(rows["stub"]["total"]) == float(rows["hostile"]["total"]) == 0
    assert "absolute path" in rows["unsafe"]["note"]


def test_a_worker_killed_mid_batch_costs_a_retry(tmp_path, cluster):
    """The scheduler gives the dead node's task to the other one: every learner gets one row."""
    from distributed import Client

    address, processes = cluster
    subs = tmp_path / "submissions"
    for k in range(4):
        _unit1(subs / f"learner{k}", REPO_ROOT / ("solutions" if k % 2 == 0 else "exercises"))
    executor, _, client = batch.cluster_executor(address)
    killed = threading.Event()

    def kill_when_busy():
        with Client(address, timeout="10s") as watcher:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = {watcher.scheduler_info()["workers"][w]["name"]: tasks for w, tasks in watcher.processing().items()}
                if busy.get("cpu"):
                    _stop(processes["cpu"])  # SIGKILL, mid-task
                    killed.set()
                    return
                time.sleep(0.1)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        outcomes = batch.grade_all(COURSE, subs, tmp_path / "state", units=["unit1"], executor=executor)
    finally:
        killer.join()
        client.close()
    assert killed.is_set(), "no task ever ran on the worker to kill"
    rows = _gradebook(outcomes, tmp_path / "grades.csv")
    assert [r["learner"] for r in rows] == [f"learner{k}" for k in range(4)]
    assert all(r["note"] == "" for r in rows), rows
    assert [float(r["total"]) for r in rows] == [float(rows[0]["max"]), 0.0] * 2
    assert sorted(p.stem for p in (tmp_path / "state").glob("*.json")) == [f"learner{k}" for k in range(4)]


def test_an_interrupted_cluster_batch_resumes(tmp_path, cluster):
    address, _ = cluster
    subs = tmp_path / "submissions"
    for k in range(3):
        _unit1(subs / f"learner{k}", REPO_ROOT / "exercises")
    state = tmp_path / "state"

    class Stop(Exception):
        pass

    def stop_after_first(outcome):
        raise Stop(outcome.learner)

    executor, _, client = batch.cluster_executor(address)
    try:
        with pytest.raises(Stop) as first:
            batch.grade_all(COURSE, subs, state, units=["unit1"], executor=executor, on_done=stop_after_first)
        outcomes = batch.grade_all(COURSE, subs, state, units=["unit1"], executor=executor)
    finally:
        client.close()
    by_learner = {o.learner: o for o in outcomes}
    assert by_learner[str(first.value)].skipped  # stored by the first run, not graded again
    assert sorted(by_learner) == [f"learner{k}" for k in range(3)]
    assert all(o.report is not None and o.report["score"] == 0 for o in outcomes)


def test_gpu_tasks_go_only_to_a_node_with_a_gpu(cluster):
    address, _ = cluster
    _node_name = lambda: __import__("distributed").get_worker().name  # noqa: E731  (sent by value)
    executor, _, client = batch.cluster_executor(address, gpu=True)
    try:
        assert {executor.submit(_node_name).result(60) for _ in range(6)} == {"gpu"}
    finally:
        client.close()
    executor, _, client = batch.cluster_executor(address)
    try:
        names = {f.result(60) for f in [executor.submit(_node_name) for _ in range(12)]}
    finally:
        client.close()
    assert names <= {"cpu", "gpu"}
