"""The `course` command: grade, submit, build."""

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
def grade(path, units, json_out, gradescope, isolation, jobs, gpu, only):
    """Grade PATH (a folder like exercises/, or a zip from `course submit`; default exercises/).

    Exits 0 whatever the score; non-zero only when the submission could not be graded."""
    from autograder.reporters import print_report, print_unit, write_gradescope, write_json
    from autograder.runner import grade as run_grade
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
    if any(u.error for u in report.units):
        sys.exit(3)


@main.command()
@click.option("--check", is_flag=True, help="exit 1 and name the files that differ, writing nothing")
def build(check):
    """Generate exercises/ (the learner's stubs) from solutions/."""
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
    from autograder.plugin import NOT_GRADED_GPU  # noqa: F401  (same wording in the summary)
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

    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    outcomes = [r for r in records if r.get("event") == "result"]
    collected = next((r["tests"] for r in records if r.get("event") == "collected"), [])
    unit_of = {t["nodeid"]: t["unit"] for t in collected}
    table = Table(title="Visible tests", title_justify="left")
    table.add_column("unit")
    table.add_column("passed", justify="right")
    for unit in course.units:
        mine = [r for r in outcomes if unit_of.get(r["nodeid"]) == unit.id]
        passed = sum(r["outcome"] == "passed" for r in mine)
        table.add_row(f"{unit.id}: {unit.title}", f"{passed}/{len(mine)}")
    console.print(table)


if __name__ == "__main__":
    main()
