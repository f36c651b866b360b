"""Mutation testing of every TODO region, with cosmic-ray: do the hidden suites tell right from wrong?

    python -m benchmarks.mutation --unit unit3            # run (or resume) unit 3's session
    python -m benchmarks.mutation --unit unit3 --jobs 2   # two workers (the default: the CPU count)
    python -m benchmarks.mutation --report                # rebuild tests/mutants/SCORES.md from the sessions

Each mutant is one small edit cosmic-ray makes to a solution file (an operator swapped, a number
changed, a comparison flipped, a loop that never runs, ...), kept only where it falls inside a
``### BEGIN SOLUTION`` / ``### END SOLUTION`` region: the code a learner writes.  Each is graded by
the unit's hidden suite alone, through the course's own grading path (``runner.grade`` on a copy of
solutions/, stopping at the first failing test): killed if any graded hidden test fails.

Why cosmic-ray rather than mutmut: cosmic-ray runs any test command we give it and mutates the file
we name in place, so a mutant is graded exactly as a learner's file is; its session database
records every result, so an interrupted run resumes where it stopped; its HTTP distributor runs
workers in folders of their own, each with its own copy of the course, which is how mutants are
graded in parallel.  mutmut rewrites the code under test into trampolines and runs the project's
own pytest in-process with its own test selection, which the grading path (a copy of solutions/,
graded by a separate trusted pytest process) cannot use.

Operators: all of cosmic-ray's core operators, except replacing an arithmetic operator by a bitwise
or shift one (``+`` -> ``<<``, ``|``, ``^``, ...): on the float tensors and arrays these regions
compute, such a mutant raises at its first use, so it costs a grading run and says nothing.

A survivor is either a gap in the hidden suite (sharpen a test) or an equivalent mutant: one that
breaks nothing the handout promises.  Equivalent ones are listed, each with a one-line reason, in
``tests/mutants/equivalent.yml``; they are left out of the score
``killed / (mutants - equivalent)``.  ``tests/mutants/SCORES.md`` keeps the table and a hash of each
unit's solution regions; ``make test`` fails when the regions changed after the table was made.
The run is far too slow for every CI run (minutes per unit on two cores): it is a command.

A run of every unit takes longer than one sitting, and ``.mutation/`` (the sessions) belongs to one
checkout, so each graded mutant is also written to ``tests/mutants/results/unitN.jsonl`` (committed):
a new session starts from the results stored there while the learner files are the ones they were
graded on, and the table is counted from those files.  Inside a grade, ``benchmarks.mutant_first``
moves the hidden tests that name the mutated function to the front: a killed mutant is known
sooner, and no verdict changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from autograder.build import find_regions
from autograder.manifest import REPO_ROOT, Course, load_course

STATE = REPO_ROOT / ".mutation"
SCORES = REPO_ROOT / "tests" / "mutants" / "SCORES.md"
# Every graded mutant, committed: .mutation/ lives in one checkout, and a run of all units takes longer
# than one sitting, so a new checkout resumes from here.  One JSON line per mutant.
RESULTS = REPO_ROOT / "tests" / "mutants" / "results"
EQUIVALENT = REPO_ROOT / "tests" / "mutants" / "equivalent.yml"
# What a worker's copy of the course needs to grade: never the venv, the git store or the sessions.
COPIED = ("autograder", "benchmarks", "exercises", "solutions", "course.yml", "pyproject.toml")
PRISTINE = ".pristine"  # in each worker's copy: solutions/ as it was, the references the hidden tests use
EXCLUDED = re.compile(r"ReplaceBinaryOperator_(Add|Sub|Mul|Div|FloorDiv|Mod|Pow)_(RShift|LShift|BitOr|BitAnd|BitXor)$")


# --- what is mutated -------------------------------------------------------------------------------

def learner_files(course: Course, unit_id: str) -> list[str]:
    unit = course.unit(unit_id)
    return [f"solutions/{unit.dir}/{name}" for name in unit.files]


def region_lines(path: Path) -> set[int]:
    """Line numbers strictly inside the solution regions of a file."""
    source = path.read_text(encoding="utf-8")
    return {n for r in find_regions(source, path.name) for n in range(r.begin + 1, r.end)}


def regions_hash(course: Course, unit_id: str) -> str:
    """A hash of the code inside the unit's solution regions: the table is stale when it changes."""
    digest = hashlib.sha256()
    for rel in learner_files(course, unit_id):
        path = REPO_ROOT / rel
        lines = path.read_text(encoding="utf-8").splitlines()
        digest.update(rel.encode())
        for number in sorted(region_lines(path)):
            digest.update(lines[number - 1].encode() + b"\n")
    return digest.hexdigest()[:16]


def files_hash(course: Course, unit_id: str) -> str:
    """A hash of the whole learner files: cosmic-ray numbers a file's mutants through the whole file,
    so stored results name the same mutants only while these are unchanged."""
    digest = hashlib.sha256()
    for rel in learner_files(course, unit_id):
        digest.update(rel.encode() + b"\0" + (REPO_ROOT / rel).read_bytes())
    return digest.hexdigest()[:16]


# --- one mutant's grade: the test command a worker runs -----------------------------------------------

def grade_mutant(unit_id: str, budget: float) -> int:
    """Grade ./solutions (mutated in place by the worker) with the unit's hidden suite alone, stopping
    at the first failure; exit 1 when any graded hidden test fails, 0 when the mutant survives.

    The mutated tree is copied and graded as a submission, and ./solutions gets its pristine learner
    files back first: the hidden tests compute their references from solutions/ (course_code), and a
    mutant there would otherwise change the expected values along with the learner's (cosmic-ray puts
    the original file back after the run in any case).  Outside a worker's copy (the baseline run)
    ./solutions is the pristine tree itself."""
    course = load_course()
    submission = Path(tempfile.mkdtemp(prefix="mutant-"))
    shutil.copytree(REPO_ROOT / "solutions", submission / "solutions", ignore=shutil.ignore_patterns("__pycache__"))
    names = []
    if (REPO_ROOT / PRISTINE).is_dir():
        for rel in learner_files(course, unit_id):
            names += mutated_names(REPO_ROOT / PRISTINE / rel, REPO_ROOT / rel)
            shutil.copy2(REPO_ROOT / PRISTINE / rel, REPO_ROOT / rel)
    try:
        return _grade_submission(course, unit_id, submission / "solutions", budget, names)
    finally:
        shutil.rmtree(submission, ignore_errors=True)


GENERIC = {"forward", "backward", "_backward", "step", "__init__", "__call__", "__repr__"}


def mutated_names(pristine: Path, mutated: Path) -> list[str]:
    """The definitions around the lines a mutant changed, innermost first, then the module's name: what
    the hidden tests that call the changed code are likely to say (benchmarks.mutant_first)."""
    import ast

    before, after = pristine.read_text(encoding="utf-8").splitlines(), mutated.read_text(encoding="utf-8").splitlines()
    if before == after:
        return []
    changed = next((n for n, (a, b) in enumerate(zip(before, after), 1) if a != b), min(len(before), len(after)))
    found = [node for node in ast.walk(ast.parse("\n".join(before)))
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             and node.lineno <= changed <= (node.end_lineno or node.lineno)]
    names = [node.name for node in sorted(found, key=lambda node: -node.lineno) if node.name not in GENERIC]
    return names + [pristine.stem]


def _grade_submission(course: Course, unit_id: str, submission: Path, budget: float, names=()) -> int:
    from autograder.runner import grade

    # The grader's own limit stops a mutant that loops forever before cosmic-ray's timeout does.
    limits = course.limits_for(course.unit(unit_id)).model_copy(update={"unit_timeout": budget})
    course = course.model_copy(update={"units": [u.model_copy(update={"limits": limits}) if u.id == unit_id else u
                                                 for u in course.units]})
    report = grade(course, submission, [unit_id], visible=False, isolation="inprocess",
                   extra_args=["-x", "-m", "not gpu", "-p", "benchmarks.mutant_first", "--mutant-names", ",".join(names)])
    result = report.units[0]
    failed = [t for t in result.tests if t.status not in ("passed", "not_graded")]
    for test in failed[:1]:
        print(f"{test.name}: {test.status}: {test.output.strip().splitlines()[0] if test.output.strip() else ''}")
    if result.error:
        print(result.error[:500])
        return 1
    return 1 if failed or result.notes and any("ran past" in n for n in result.notes) else 0


# --- the session -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_course(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
        else:
            shutil.copy2(source, target / name)
    shutil.copytree(REPO_ROOT / "solutions", target / PRISTINE / "solutions",
                    ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))


def _start_workers(count: int) -> list[tuple[subprocess.Popen, str]]:
    """cosmic-ray HTTP workers, each in its own copy of the course (a mutant edits that copy)."""
    workers = []
    for k in range(count):
        folder = STATE / "workers" / str(k)
        _copy_course(folder)
        port = _free_port()
        process = subprocess.Popen([sys.executable, "-m", "cosmic_ray.cli", "http-worker", "--port", str(port)],
                                   cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        workers.append((process, f"http://127.0.0.1:{port}"))
    for process, url in workers:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None:
                    raise click.ClickException("a cosmic-ray worker did not start")
                time.sleep(0.1)
    return workers


def _stop_workers(workers) -> None:
    for process, _ in workers:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process, _ in workers:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _baseline_seconds(unit_id: str) -> float:
    """The pristine solutions must pass the hidden suite; how long that takes sets each mutant's budget."""
    start = time.monotonic()
    code = grade_mutant(unit_id, 600)
    if code != 0:
        raise click.ClickException(f"{unit_id}: the solutions do not pass their own hidden suite")
    return time.monotonic() - start


def forget_survivors(unit_id: str) -> list[str]:
    """Make the unit's unhandled survivors (those not listed as equivalent) pending again, to grade
    them with the sharpened hidden suite (the killed stay killed: a sharper suite only adds checks);
    their job ids."""
    from cosmic_ray.work_db import WorkDB, WorkResultStorage, use_db
    from cosmic_ray.work_item import TestOutcome

    known = equivalent_identities(unit_id)
    with use_db(str(STATE / unit_id / "session.sqlite"), mode=WorkDB.Mode.open) as db:
        job_ids = [item.job_id for item, result in db.completed_work_items
                   if result.test_outcome == TestOutcome.SURVIVED and identity(item.mutations[0].module_path, result.diff) not in known]
        with db._session_maker.begin() as session:  # cosmic-ray has no call to drop some results
            session.query(WorkResultStorage).filter(WorkResultStorage.job_id.in_(job_ids)).delete(
                synchronize_session=False)
    return job_ids


def new_session(course: Course, unit_id: str, db, restore: bool) -> float:
    """Fill an empty session with every mutant of the unit's learner files; those outside the solution
    regions or of an excluded operator are skipped, and (with restore) those graded before get their
    committed results.  The seconds the restored gradings took."""
    from cosmic_ray.commands import init
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    modules = [Path(p) for p in learner_files(course, unit_id)]
    os.chdir(REPO_ROOT)  # cosmic-ray records module paths relative to here; workers use theirs
    init(modules, db, {})
    inside = {str(p): region_lines(REPO_ROOT / p) for p in modules}
    outside = [item.job_id for item in db.work_items
               if item.mutations[0].start_pos[0] not in inside[str(item.mutations[0].module_path)]]
    excluded = [item.job_id for item in db.work_items if EXCLUDED.search(item.mutations[0].operator_name)]
    db.set_multiple_results(outside, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                                output="outside the solution regions"))
    db.set_multiple_results(sorted(set(excluded) - set(outside)),
                            WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="excluded operator"))
    return restore_results(course, unit_id, db) if restore else 0.0


def run_session(course: Course, unit_id: str, jobs: int, restart: bool, limit: int | None = None,
                first: tuple[str, ...] = ()) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from cosmic_ray.plugins import get_distributor
    from cosmic_ray.work_db import WorkDB, use_db

    folder = STATE / unit_id
    session = folder / "session.sqlite"
    if restart:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    baseline = _baseline_seconds(unit_id)
    budget = max(60.0, 4 * baseline)
    test_command = f"{sys.executable} -m benchmarks.mutation grade --unit {unit_id} --budget {budget - 10:.0f}"
    meta = folder / "meta.json"
    with use_db(str(session)) as db:
        if db.num_work_items == 0:
            seconds = new_session(course, unit_id, db, restore=not restart)
            meta.write_text(json.dumps({"regions_hash": regions_hash(course, unit_id), "seconds": seconds}))
    info = json.loads(meta.read_text())
    if info["regions_hash"] != regions_hash(course, unit_id):
        raise click.ClickException(f"{unit_id}: the solution regions changed since this session began; "
                                   "rerun with --restart")
    workers = _start_workers(max(1, jobs))
    started = time.monotonic()
    try:
        with use_db(str(session), mode=WorkDB.Mode.open) as db:
            # A fixed shuffle: a run cut short by --limit (or stopped) has graded a sample of the whole
            # unit, so its score estimates the unit's, not that of the first file's first functions.
            pending = list(db.pending_work_items)
            random.Random(0).shuffle(pending)
            rechecked = set(first)
            pending.sort(key=lambda item: item.job_id not in rechecked)  # the rechecked survivors before the rest
            pending = pending[:limit]
            columns = (TextColumn(f"{unit_id} mutants"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn())
            with Progress(*columns) as progress:
                task = progress.add_task("grading", total=len(pending))

                def done(job_id, result):
                    db.set_result(job_id, result)
                    progress.advance(task)

                distributor = get_distributor("http")
                distributor(pending, test_command, budget, {"worker-urls": [url for _, url in workers]},
                            on_task_complete=done)
    finally:
        _stop_workers(workers)
        info["seconds"] = info.get("seconds", 0.0) + time.monotonic() - started
        meta.write_text(json.dumps(info))
        save_results(course, unit_id)


# --- the committed results ------------------------------------------------------------------------------

def _key(item) -> tuple[str, str, int]:
    mutation = item.mutations[0]
    return str(mutation.module_path), mutation.operator_name, int(mutation.occurrence)


def save_results(course: Course, unit_id: str) -> None:
    """Write the session's mutants inside the regions (graded or not) to tests/mutants/results/."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    info = json.loads((STATE / unit_id / "meta.json").read_text())
    rows = []
    with use_db(str(STATE / unit_id / "session.sqlite"), mode=WorkDB.Mode.open) as db:
        graded = [(item, result) for item, result in db.completed_work_items
                  if result.worker_outcome not in (WorkerOutcome.SKIPPED, WorkerOutcome.NO_TEST)]
        for item, result in graded:
            row = {"worker": result.worker_outcome.value,
                   "test": result.test_outcome.value if result.test_outcome else None}
            if result.test_outcome == TestOutcome.SURVIVED:
                row["diff"] = result.diff
            else:  # which test (or limit) caught it: its first line is enough
                row["by"] = ((result.output or "").strip().splitlines() or [""])[0][:160]
            rows.append((item, row))
        rows += [(item, {"worker": "pending"}) for item in db.pending_work_items]
    lines = [json.dumps({"unit": unit_id, "files_hash": files_hash(course, unit_id), "regions_hash": info["regions_hash"],
                         "seconds": round(info.get("seconds", 0.0))})]
    for item, row in sorted(rows, key=lambda pair: (_key(pair[0]), pair[0].mutations[0].start_pos)):
        file, operator, occurrence = _key(item)
        lines.append(json.dumps({"file": file, "line": item.mutations[0].start_pos[0], "operator": operator,
                                 "occurrence": occurrence, **row}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{unit_id}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def stored_results(unit_id: str) -> tuple[dict, list[dict]] | None:
    """(the header, one row per mutant) of a unit's committed results, or None."""
    path = RESULTS / f"{unit_id}.jsonl"
    if not path.exists():
        return None
    header, *rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return header, rows


def restore_results(course: Course, unit_id: str, db) -> float:
    """Give a new session the committed results of mutants graded before (in another checkout), when
    the learner files are the ones they were graded on; the seconds those gradings took."""
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    stored = stored_results(unit_id)
    if stored is None:
        return 0.0
    header, rows = stored
    if header["files_hash"] != files_hash(course, unit_id):
        print(f"{unit_id}: the learner files changed since {RESULTS.name}/{unit_id}.jsonl was written; grading all again")
        return 0.0
    known = {(r["file"], r["operator"], r["occurrence"]): r for r in rows if r["worker"] != "pending"}
    restored = 0
    for item in list(db.pending_work_items):
        row = known.get(_key(item))
        if row is not None:
            outcome = TestOutcome(row["test"]) if row["test"] else None
            db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome(row["worker"]), test_outcome=outcome,
                                                  output=row.get("by"), diff=row.get("diff")))
            restored += 1
    print(f"{unit_id}: {restored} mutant(s) graded before, restored from {RESULTS.name}/{unit_id}.jsonl")
    return float(header.get("seconds", 0.0))


# --- the table ---------------------------------------------------------------------------------------

@dataclass
class Tally:
    mutants: int = 0
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    pending: int = 0
    seconds: float = 0.0
    regions_hash: str = ""

    @property
    def score(self) -> float:
        judged = self.mutants - self.equivalent - self.pending
        return self.killed / judged if judged else 1.0


def changed_lines(diff: str) -> tuple[str, str]:
    """(the removed lines, the added lines) of a mutant's diff, stripped: its identity in equivalent.yml."""
    removed = [l[1:].strip() for l in diff.splitlines() if l.startswith("-") and not l.startswith("---")]
    added = [l[1:].strip() for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
    return " / ".join(removed), " / ".join(added)


def load_equivalent() -> list[dict]:
    return yaml.safe_load(EQUIVALENT.read_text(encoding="utf-8")) or [] if EQUIVALENT.exists() else []


def identity(module_path, diff: str | None) -> tuple[str, str, str]:
    """(file name, removed lines, added lines): how equivalent.yml names a mutant."""
    return (Path(module_path).name, *changed_lines(diff or ""))


def equivalent_identities(unit_id: str) -> set[tuple[str, str, str]]:
    return {(e["file"], e["original"], e["mutated"]) for e in load_equivalent() if e["unit"] == unit_id}


def tally(unit_id: str) -> tuple[Tally, list[dict]]:
    """Counts for one unit's committed results, and its unhandled survivors (with their diffs)."""
    header, rows = stored_results(unit_id)
    known = equivalent_identities(unit_id)
    counts, survivors = Tally(seconds=header.get("seconds", 0.0), regions_hash=header["regions_hash"]), []
    for row in rows:
        counts.mutants += 1
        if row["worker"] == "pending":
            counts.pending += 1
        elif row["test"] == "survived":
            key = identity(row["file"], row.get("diff"))
            if key in known:
                counts.equivalent += 1
            else:
                counts.survived += 1
                survivors.append({"unit": unit_id, "file": key[0], "line": row["line"], "operator": row["operator"],
                                  "original": key[1], "mutated": key[2], "diff": row.get("diff")})
        else:
            counts.killed += 1
    return counts, survivors


def score_row(unit_id: str, counts: Tally) -> str:
    return (f"| {unit_id} | {counts.mutants} | {counts.killed} | {counts.survived} | {counts.equivalent} | "
            f"{counts.pending} | {counts.score:.1%} | {counts.seconds / 60:.0f} min | {counts.regions_hash} |")


def write_scores(course: Course) -> list[dict]:
    rows, survivors = [], []
    for unit in course.units:
        if stored_results(unit.id) is None:
            continue
        counts, left = tally(unit.id)
        survivors += left
        rows.append((unit.id, counts))
    old = read_scores()
    lines = ["# Mutation scores of the hidden suites",
             "",
             "Made by `python -m benchmarks.mutation` (cosmic-ray's operators, inside the solution regions only;",
             "each mutant graded by the unit's hidden suite through `runner.grade`, against references from the",
             "pristine solutions). Score = killed / (mutants - equivalent - not yet graded); the equivalent mutants",
             "and their reasons are in `equivalent.yml`; every graded mutant is in `results/unitN.jsonl` (a new",
             "checkout resumes from there). `make test` checks that each unit's regions still hash to the value",
             "below, and that a row with results there is the count of those results.",
             "",
             "| unit | mutants | killed | survived | equivalent | not yet graded | score | run time | regions hash |",
             "|---|---|---|---|---|---|---|---|---|"]
    # A unit without committed results keeps the row an older run wrote; the rows go in course order.
    table = {unit_id: row["line"] for unit_id, row in old.items()} | {u: score_row(u, c) for u, c in rows}
    lines += [table[unit.id] for unit in course.units if unit.id in table]
    SCORES.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return survivors


def read_scores() -> dict[str, dict]:
    """unit -> its row of SCORES.md: {"hash", "score", "pending", "line"}."""
    rows = {}
    if SCORES.exists():
        for line in SCORES.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 9 and re.fullmatch(r"unit\d+", cells[0]):  # not the header row
                rows[cells[0]] = {"hash": cells[8], "score": cells[6], "pending": int(cells[5]), "line": line}
    return rows


@click.group(invoke_without_command=True)
@click.option("--unit", "units", multiple=True, help="the unit(s) to mutate (default: all)")
@click.option("--jobs", default=os.cpu_count() or 1, show_default=True, help="mutants graded at once")
@click.option("--restart", is_flag=True, help="forget the stored session and start over")
@click.option("--report", "report_only", is_flag=True, help="only rebuild the table from the stored sessions")
@click.option("--limit", type=int, default=None, help="grade at most this many pending mutants now (resume later)")
@click.option("--recheck", is_flag=True, help="grade the survivors not listed as equivalent again (after sharpening the hidden tests)")
@click.pass_context
def main(ctx, units, jobs, restart, report_only, limit, recheck):
    """Mutation testing of the solution regions; writes tests/mutants/SCORES.md."""
    if ctx.invoked_subcommand is not None:
        return
    course = load_course()
    # `kill` (SIGTERM) must stop a run the way Ctrl-C does, so that its finally blocks save the results
    # and the seconds spent; without this the time of a stopped run is lost from the table.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not report_only:
        for unit_id in units or [u.id for u in course.units]:
            first = ()
            if recheck and (STATE / unit_id / "session.sqlite").exists():
                first = tuple(forget_survivors(unit_id))
                print(f"{unit_id}: {len(first)} survivor(s) to grade again, before any other pending mutant")
            run_session(course, unit_id, jobs, restart, limit, first)
    for unit in course.units:  # a session stopped the hard way (SIGKILL) saved nothing yet
        if (STATE / unit.id / "meta.json").exists():
            save_results(course, unit.id)
    survivors = write_scores(course)
    print(SCORES.read_text())
    if survivors:
        report = STATE / "survivors.json"
        report.write_text(json.dumps(survivors, indent=1))
        print(f"{len(survivors)} survivor(s) not yet handled (sharpen a test, or list it in {EQUIVALENT.name} "
              f"with a reason): {report}")
        for s in survivors[:20]:
            print(f"  {s['unit']} {s['file']}:{s['line']} {s['operator']}: {s['original']!r} -> {s['mutated']!r}")


@main.command("grade")
@click.option("--unit", "unit_id", required=True)
@click.option("--budget", type=float, default=300.0)
def grade_command(unit_id, budget):
    """(Run by the workers) grade ./solutions with the hidden suite of UNIT; exit 1 when a test fails."""
    sys.exit(grade_mutant(unit_id, budget))


if __name__ == "__main__":
    main()
