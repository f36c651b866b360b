"""Does correct code get full marks whatever the secret seed?  Grades solutions/ many times.

    python -m benchmarks.seeds                    # every unit, 10 gradings each
    python -m benchmarks.seeds --unit unit2 --runs 50
    python -m benchmarks.seeds --unit unit7 --runs 100 -k bf16_autocast   # one test, many seeds

Every grading run draws a fresh secret seed, and the hidden tests draw their inputs from it: a
tolerance that is right for most inputs but not all of them fails a correct submission now and
then, which a single CI run only sometimes sees.  This command grades the solutions' hidden suites
(in-process, GPU tests left out) with ``--runs`` fresh seeds per unit and prints, for each test that
ever failed, how often and the first line of what it said.  Exit status 1 when any test failed.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor

import click

from autograder.manifest import REPO_ROOT, load_course


@click.command()
@click.option("--unit", "unit_ids", multiple=True, help="units to grade (default: all)")
@click.option("--runs", default=10, show_default=True, help="gradings (fresh seeds) per unit")
@click.option("--jobs", default=2, show_default=True, help="gradings at once")
@click.option("-k", "keyword", default=None, help="only the tests pytest's -k selects")
def main(unit_ids: tuple[str, ...], runs: int, jobs: int, keyword: str | None) -> None:
    from autograder.runner import grade

    course = load_course()
    units = list(unit_ids) or [u.id for u in course.units]
    failures: dict[str, collections.Counter] = {u: collections.Counter() for u in units}
    first_words: dict[str, str] = {}

    def one(unit_id: str) -> None:
        report = grade(course, REPO_ROOT / "solutions", [unit_id], visible=False, isolation="inprocess",
                       extra_args=["-m", "not gpu", *(["-k", keyword] if keyword else [])])
        result = report.units[0]
        if result.error:
            failures[unit_id]["(the unit did not run)"] += 1
            first_words.setdefault("(the unit did not run)", result.error.splitlines()[0])
        for test in result.tests:
            if test.status not in ("passed", "not_graded"):
                failures[unit_id][test.name] += 1
                lines = [line for line in test.output.strip().splitlines() if line.strip()]
                first_words.setdefault(test.name, " / ".join(lines[:3])[:400])

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, [u for u in units for _ in range(runs)]))
    print(f"{len(units)} unit(s) x {runs} seeds in {time.monotonic() - started:.0f} s")
    for unit_id in units:
        print(f"{unit_id}: {'every test passed every time' if not failures[unit_id] else 'FAILED on correct code'}")
        for name, count in failures[unit_id].most_common():
            print(f"  {count}/{runs}  {name}\n        {first_words[name]}")
    raise SystemExit(1 if any(failures.values()) else 0)


if __name__ == "__main__":
    main()
