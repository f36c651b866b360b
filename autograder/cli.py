"""The `course` command: grade, submit, build; release, grade-all and exports for instructors."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console

from autograder.manifest import REPO_ROOT, ManifestError, load_course

console = Console(highlight=False)


def _course():
    try:
        return load_course()
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """Build the parts of an LLM: grade, submit and maintain the course."""


@main.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--unit", "units", multiple=True, help="grade only this unit (repeatable)")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the JSON report here")
@click.option("--gradescope", type=click.Path(path_type=Path), help="write Gradescope's results.json here")
@click.option("--isolation", default="auto", type=click.Choice(["auto", "bwrap", "user", "none"]),
              help="how learner code is isolated (auto: the strongest this machine offers)")
@click.option("--jobs", default=1, show_default=True, help="units graded at once")
@click.option("--gpu", default="auto", type=click.Choice(["auto", "require"]),
              help="require: fail loudly when no CUDA GPU is visible, instead of leaving GPU tests not graded")
@click.option("--only", type=click.Choice(["gpu"]), default=None, help="gpu: run only the GPU-marked tests")
@click.option("--fail-under", type=click.FloatRange(0, 100), default=None,
              help="exit 1 when the score is under this percentage of the maximum (100: full marks only)")
def grade(path, units, json_out, gradescope, isolation, jobs, gpu, only, fail_under):
    """Grade PATH (a folder like exercises/, or a zip from `course submit`; default exercises/).

    Exits 0 whatever the score (unless --fail-under says otherwise); non-zero when the submission
    could not be graded."""
    from autograder.reporters import print_report, print_unit, write_gradescope, write_json
    from autograder.runner import HIDDEN_ROOT, grade as run_grade
    from autograder.submission import SubmissionError

    course = _course()
    target = path or REPO_ROOT / "exercises"
    if gpu == "require":
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException("--gpu require: torch sees no CUDA GPU on this machine, so the GPU tests "
                                       "cannot be graded here")
    try:
        with console.status("grading...") as status:
            def progress(unit_result):
                status.update(f"graded {unit_result.id}")
            extra = ["--gpu", gpu] + (["-m", "gpu"] if only == "gpu" else [])
            report = run_grade(course, target, list(units) or None, isolation=isolation, jobs=jobs,
                               on_unit=progress, extra_args=extra)
    except SubmissionError as exc:
        raise click.ClickException(f"could not grade {target}: {exc}") from None
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    for unit in report.units:
        print_unit(console, unit)
    print_report(console, report)
    if json_out:
        write_json(report, json_out)
    if gradescope:
        write_gradescope(report, course, gradescope)
    if not HIDDEN_ROOT.is_dir():
        console.print("[yellow]The hidden tests are not included in this copy of the course: this score counts "
                      "the visible tests only. Your grade comes from the grader, which also runs the hidden tests.")
    if any(u.error for u in report.units):
        sys.exit(3)
    if fail_under is not None and report.score < report.max_score * fail_under / 100 - 1e-9:
        console.print(f"[red]score {report.score:g} / {report.max_score:g} is under {fail_under:g}%")
        sys.exit(1)


def _instructor_only(command: str) -> None:
    if not (REPO_ROOT / "solutions").is_dir():
        raise click.ClickException(f"`course {command}` is for the instructor's repository (it needs solutions/ "
                                   "and the hidden tests); this is the student release")


@main.command()
@click.option("--check", is_flag=True, help="exit 1 and name the files that differ, writing nothing")
def build(check):
    """Generate exercises/ (the learner's stubs) from solutions/."""
    _instructor_only("build")
    from autograder.build import MarkerError, build as run_build, drift

    course = _course()
    try:
        if check:
            problems = drift(course)
            for problem in problems:
                console.print(f"[red]drift[/red] {problem}")
            if problems:
                console.print("run `course build` to regenerate exercises/ from solutions/")
                sys.exit(1)
            console.print("exercises/ matches solutions/")
            return
        changed = run_build(course)
    except MarkerError as exc:
        raise click.ClickException(str(exc)) from None
    for path in changed:
        console.print(f"wrote {path.relative_to(REPO_ROOT)}")
    console.print(f"{len(changed)} file(s) changed")


@main.group()
def nbgrader() -> None:
    """The course as an nbgrader course, for JupyterHub."""


@nbgrader.command("export")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--unit", "units", multiple=True, help="export only this unit (repeatable)")
def nbgrader_export(directory, units):
    """Write an nbgrader course directory: one assignment per unit (its notebook with a graded cell
    per scoring group, its .py stubs), and nbgrader_config.py. Then, in DIRECTORY:
    `nbgrader generate_assignment unitN`, and after collecting submissions `nbgrader autograde unitN`."""
    _instructor_only("nbgrader export")
    from autograder.nbgrading import export

    course = _course()
    try:
        written = export(course, directory, list(units) or None)
    except (ManifestError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"wrote {len(written)} file(s) under {directory}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("submission.zip"), show_default=True)
@click.option("--root", type=click.Path(path_type=Path), default=None, help="folder of unit folders (default exercises/)")
@click.option("--skip-tests", is_flag=True, help="pack without running the visible tests first")
def submit(out, root, skip_tests):
    """Run the visible tests, then pack the files you edit into a zip to hand in."""
    from autograder.submission import pack_submission

    course = _course()
    root = root or REPO_ROOT / "exercises"
    if not skip_tests:
        with tempfile.TemporaryDirectory() as tmp:
            results = Path(tmp) / "results.jsonl"
            tests = [str(p) for u in course.units for p in sorted((root / u.dir).glob("test_*.py"))]
            subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "--tb=no", "--no-header", "-rN",
                            "--results", str(results)], cwd=REPO_ROOT, capture_output=True)
            _print_visible_summary(course, results)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest = pack_submission(root, course, out, created)
    console.print(f"packed {len(manifest['files'])} file(s) into {out}")


def _print_visible_summary(course, results: Path) -> None:
    from rich.table import Table

    from autograder.plugin import NOT_GRADED_GPU

    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    outcomes = [r for r in records if r.get("event") == "result"]
    collected = next((r["tests"] for r in records if r.get("event") == "collected"), [])
    unit_of = {t["nodeid"]: t["unit"] for t in collected}
    table = Table(title="Visible tests", title_justify="left")
    table.add_column("unit")
    table.add_column("passed", justify="right")
    table.add_column("not run here", justify="left")
    for unit in course.units:
        mine = [r for r in outcomes if unit_of.get(r["nodeid"]) == unit.id]
        gpu = [r for r in mine if r["outcome"] == "skipped" and r.get("message", "").startswith(NOT_GRADED_GPU)]
        ran = [r for r in mine if r not in gpu]
        passed = sum(r["outcome"] == "passed" for r in ran)
        why = f"{len(gpu)} GPU test(s): no CUDA GPU here" if gpu else ""
        table.add_row(f"{unit.id}: {unit.title}", f"{passed}/{len(ran)}", why)
    console.print(table)
    console.print("GPU tests are graded where there is a GPU (the grader leaves them out of the maximum elsewhere).",
                  style="dim")


@main.command()
@click.option("--root", type=click.Path(path_type=Path), default=None, help="folder of unit folders (default exercises/)")
@click.option("--steps", default=300, show_default=True, help="training steps")
@click.option("--seed", default=0, show_default=True)
def capstone(root, steps, seed):
    """Unit 7's capstone: your Unit 3 tokenizer, your Unit 7 model and loop, your Unit 4 cache, end to end
    (runs unit7/capstone.py; a stand-in replaces an earlier unit that is not done, and says so)."""
    import importlib

    root = Path(root or REPO_ROOT / "exercises").resolve()
    if not (root / "unit7" / "capstone.py").is_file():
        raise click.ClickException(f"{root}/unit7/capstone.py not found: --root is the folder that holds unit7/")
    sys.path.insert(0, str(root))
    importlib.import_module("unit7.capstone").run(steps=steps, seed=seed)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
def release(out):
    """Write the student repository into OUT (new or empty): exercises, visible tests, handouts, the
    learner's part of the engine, a README and Makefile; no solutions, hidden tests or course tests."""
    _instructor_only("release")
    from autograder.build import MarkerError
    from autograder.release import ReleaseError, write_release

    try:
        written = write_release(_course(), out)
    except (ReleaseError, MarkerError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"wrote {len(written)} files into {out}")


@main.command("grade-all")
@click.argument("submissions", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the gradebook; finished reports are kept in CSV.d/ so a rerun resumes")
@click.option("--jobs", default=2, show_default=True, help="submissions graded at once")
@click.option("--feedback", type=click.Path(file_okay=False, path_type=Path), help="write LEARNER.md here for each learner")
@click.option("--unit", "units", multiple=True, help="grade only this unit (repeatable)")
@click.option("--only", type=click.Choice(["gpu"]), default=None,
              help="gpu: grade only the GPU-marked tests (a CUDA GPU is required) and merge them into the gradebook")
@click.option("--isolation", default="auto", type=click.Choice(["auto", "bwrap", "user", "none"]))
@click.option("--cluster", metavar="ADDRESS", default=None,
              help="grade on the Dask cluster whose scheduler is at ADDRESS (tcp://host:8786) instead of --jobs here")
def grade_all(submissions, csv_path, jobs, feedback, units, only, isolation, cluster):
    """Grade every submission in SUBMISSIONS (zips from `course submit` or folders like exercises/,
    one per learner, named after the learner) into a gradebook CSV and feedback files."""
    _instructor_only("grade-all")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autograder.batch import cluster_executor, find_submissions, grade_all as run_batch, write_gradebook
    from autograder.reporters import feedback_markdown
    from autograder.submission import SubmissionError

    course = _course()
    for unit in units:
        _unit_or_fail(course, unit)
    executor = client = None
    if cluster:
        try:
            executor, dashboard, client = cluster_executor(cluster, gpu=only == "gpu")
        except (OSError, TimeoutError, ImportError) as exc:
            raise click.ClickException(f"--cluster {cluster}: {exc}") from None
        workers = client.scheduler_info().get("workers", {})
        console.print(f"cluster {cluster}: {len(workers)} node(s)" + (f"; dashboard {dashboard}" if dashboard else ""))
    elif only == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException("--only gpu: torch sees no CUDA GPU on this machine; run the GPU pass on "
                                       "a machine with one")
    try:
        count = len(find_submissions(submissions))
    except SubmissionError as exc:
        raise click.ClickException(str(exc)) from None
    state = csv_path.with_name(csv_path.name + ".d")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("grading" + (" (GPU pass)" if only else ""), total=count)

        def done(outcome):
            word = "done before" if outcome.skipped else ("FAILED: " + outcome.error if outcome.report is None else "graded")
            progress.console.print(f"{outcome.learner}: {word}")
            progress.advance(task)

        try:
            outcomes = run_batch(course, submissions, state, units=list(units) or None, jobs=jobs,
                                 only_gpu=only == "gpu", isolation=isolation, executor=executor, on_done=done)
        finally:
            if client is not None:
                client.close()
    write_gradebook(course, outcomes, csv_path, list(units) or None)
    if feedback:
        feedback.mkdir(parents=True, exist_ok=True)
        for outcome in outcomes:
            if outcome.report is not None:
                (feedback / f"{outcome.learner}.md").write_text(
                    feedback_markdown(outcome.report, course, outcome.learner), encoding="utf-8")
    failed = [o.learner for o in outcomes if o.report is None]
    console.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} graded; gradebook {csv_path}; reports {state}/")
    if failed:
        console.print(f"[red]not graded (rerun to retry): {', '.join(failed)}")
        sys.exit(3)


def _unit_or_fail(course, unit_id):
    try:
        return course.unit(unit_id)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def export():
    """Package the course for a platform that runs graders at scale."""


@export.command("gradescope")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--torch-index", help="the package index setup.sh installs torch from (e.g. PyTorch's CPU-only one)")
def export_gradescope(out, torch_index):
    """Write a Gradescope autograder zip (setup.sh, run_autograder, the course with its hidden tests)."""
    _instructor_only("export")
    from autograder.export import write_gradescope_zip

    count = write_gradescope_zip(_course(), out, torch_index)
    console.print(f"wrote {out} ({count} files); upload it as the assignment's autograder")


@export.command("github-classroom")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--torch-index", help="the package index the workflow installs torch from")
def export_classroom(out, torch_index):
    """Write OUT/.github/workflows/classroom.yml (points per unit) and OUT/CLASSROOM.md (protected paths);
    OUT is normally a student release."""
    _instructor_only("export")
    from autograder.export import ExportError, write_classroom

    try:
        written = write_classroom(_course(), out, torch_index)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        console.print(f"wrote {path}")


@main.command("gradescope-run", hidden=True)
@click.argument("submission", type=click.Path(path_type=Path))
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--unit", "units", multiple=True)
@click.option("--jobs", default=1)
def gradescope_run(submission, results, units, jobs):
    """Gradescope's run_autograder calls this: grade SUBMISSION, write RESULTS (results.json)."""
    from autograder.export import gradescope_run as run

    data = run(_course(), submission, results, list(units) or None, jobs)
    console.print(f"score {data['score']}; wrote {results}")


if __name__ == "__main__":
    main()
