"""Grading time per unit: isolated (the sandboxed worker) against in-process, in the same run.

    python -m benchmarks.grading [--unit unit1] [--submission solutions]

Prints, per unit, the seconds each takes and their ratio (the isolation overhead), then the totals.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from autograder.manifest import REPO_ROOT, load_course
from autograder.runner import grade


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", action="append", help="only these units")
    parser.add_argument("--submission", default=str(REPO_ROOT / "solutions"))
    args = parser.parse_args()
    course = load_course()
    units = args.unit or [u.id for u in course.units]
    table = Table(title=f"Grading time, {args.submission}", title_justify="left")
    for column in ("unit", "isolated s", "in-process s", "ratio", "score"):
        table.add_column(column, justify="left" if column == "unit" else "right")
    totals = [0.0, 0.0]
    for unit_id in units:
        timings = {}
        for mode in ("auto", "inprocess"):
            start = time.perf_counter()
            report = grade(course, args.submission, [unit_id], isolation=mode)
            timings[mode] = (time.perf_counter() - start, report)
        isolated, inproc = timings["auto"][0], timings["inprocess"][0]
        totals[0] += isolated
        totals[1] += inproc
        rep = timings["auto"][1]
        table.add_row(f"{unit_id} ({rep.isolation})", f"{isolated:.1f}", f"{inproc:.1f}", f"{isolated / inproc:.2f}x",
                      f"{rep.score:g}/{rep.max_score:g}")
    table.add_row("all", f"{totals[0]:.1f}", f"{totals[1]:.1f}", f"{totals[0] / totals[1]:.2f}x", "")
    Console().print(table)


if __name__ == "__main__":
    main()
