"""Batch grading throughput: submissions per minute for `course grade-all` on this machine.

    python -m benchmarks.grade_all [--n 4] [--jobs 2] [--unit unit1 ...]
    python -m benchmarks.grade_all --cluster [--n 4] [--jobs 2]

Generates N submissions (alternately the solutions and the untouched stubs, so both the passing and
the failing paths are timed), grades them with ``autograder.batch.grade_all`` into a fresh state
folder and prints the wall time and submissions per minute.  With ``--cluster`` it grades the same
submissions twice in one run: on the local pool of ``--jobs`` threads, and as tasks on a Dask
cluster of ``--jobs`` local worker processes (one thread each); and it prints the cluster's own
overhead per task (an empty task's round trip) and the time to pack one submission.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autograder.batch import grade_all, pack
from autograder.manifest import REPO_ROOT, load_course


def _submissions(folder: Path, n: int, units) -> None:
    for i in range(n):
        source = REPO_ROOT / ("solutions" if i % 2 == 0 else "exercises")
        for unit in units:
            (folder / f"learner{i:03d}" / unit.dir).mkdir(parents=True)
            for name in unit.files:
                shutil.copy(source / unit.dir / name, folder / f"learner{i:03d}" / unit.dir / name)


def _timed_batch(course, folder: Path, state: Path, units, **kwargs) -> tuple[float, list]:
    started = time.monotonic()
    outcomes = grade_all(course, folder, state, units=[u.id for u in units], **kwargs)
    return time.monotonic() - started, [o.learner for o in outcomes if o.report is None]


def _cluster_overhead(executor, folder: Path, course, units) -> tuple[float, float]:
    """(median seconds of an empty task's round trip, median seconds to pack one submission)."""
    trips = []
    for _ in range(20):
        start = time.perf_counter()
        executor.submit(int).result()
        trips.append(time.perf_counter() - start)
    packs = []
    for path in sorted(folder.iterdir()):
        start = time.perf_counter()
        pack(course, path, [u.id for u in units])
        packs.append(time.perf_counter() - start)
    return statistics.median(trips), statistics.median(packs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="submissions to generate")
    parser.add_argument("--jobs", type=int, default=2, help="submissions graded at once (cluster: worker processes)")
    parser.add_argument("--unit", action="append", help="only these units (default: all)")
    parser.add_argument("--cluster", action="store_true", help="also grade on a local Dask cluster, in the same run")
    args = parser.parse_args()
    course = load_course()
    units = [course.unit(u) for u in args.unit] if args.unit else list(course.units)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-grade-all-") as tmp:
        folder = Path(tmp) / "submissions"
        _submissions(folder, args.n, units)
        rows = [("local pool", f"--jobs {args.jobs}", *_timed_batch(course, folder, Path(tmp) / "local", units, jobs=args.jobs))]
        if args.cluster:
            from distributed import Client, LocalCluster

            with LocalCluster(n_workers=args.jobs, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                executor = client.get_executor(pure=False)
                trip, packing = _cluster_overhead(executor, folder, course, units)
                rows.append(("Dask cluster", f"{args.jobs} worker processes",
                             *_timed_batch(course, folder, Path(tmp) / "cluster", units, executor=executor)))
    table = Table(title=f"{args.n} submissions ({', '.join(u.id for u in units)})", title_justify="left")
    for column in ("where", "workers", "seconds", "learners per minute", "not graded"):
        table.add_column(column)
    for where, workers, seconds, failed in rows:
        table.add_row(where, workers, f"{seconds:.1f}", f"{args.n / seconds * 60:.2f}", ", ".join(failed) or "-")
    console.print(table)
    if args.cluster:
        console.print(f"cluster overhead per task: {trip * 1e3:.1f} ms (an empty task's round trip, median of 20); "
                      f"packing one submission: {packing * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
