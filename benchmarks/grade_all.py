"""Batch grading throughput: submissions per minute for `course grade-all` on this machine.

    python -m benchmarks.grade_all [--n 4] [--jobs 2] [--unit unit1 ...]

Generates N submissions (alternately the solutions and the untouched stubs, so both the passing and
the failing paths are timed), grades them with ``autograder.batch.grade_all`` into a fresh state
folder and prints the wall time and submissions per minute.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from autograder.batch import grade_all
from autograder.manifest import REPO_ROOT, load_course


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="submissions to generate")
    parser.add_argument("--jobs", type=int, default=2, help="submissions graded at once")
    parser.add_argument("--unit", action="append", help="only these units (default: all)")
    args = parser.parse_args()
    course = load_course()
    units = [course.unit(u) for u in args.unit] if args.unit else list(course.units)
    with tempfile.TemporaryDirectory(prefix="bench-grade-all-") as tmp:
        folder = Path(tmp) / "submissions"
        for i in range(args.n):
            source = REPO_ROOT / ("solutions" if i % 2 == 0 else "exercises")
            for unit in units:
                (folder / f"learner{i:03d}" / unit.dir).mkdir(parents=True)
                for name in unit.files:
                    shutil.copy(source / unit.dir / name, folder / f"learner{i:03d}" / unit.dir / name)
        started = time.monotonic()
        outcomes = grade_all(course, folder, Path(tmp) / "state", units=[u.id for u in units], jobs=args.jobs)
        seconds = time.monotonic() - started
    failed = [o.learner for o in outcomes if o.report is None]
    Console().print(f"{args.n} submissions ({', '.join(u.id for u in units)}), --jobs {args.jobs}: "
                    f"{seconds:.1f} s, {args.n / seconds * 60:.1f} submissions per minute"
                    + (f"; NOT graded: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
