"""Reports: a terminal table per unit, the course's JSON report, Gradescope's results.json."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from autograder.manifest import Course
from autograder.scoring import NOT_GRADED, Report, UnitResult

STATUS_STYLE = {"passed": "green", "failed": "red", "error": "red", "not_run": "red", "skipped": "yellow",
                NOT_GRADED: "dim"}


def _points(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def print_unit(console: Console, unit: UnitResult, max_failures: int = 12) -> None:
    table = Table(title=f"{unit.id}: {unit.title}", title_justify="left", expand=False)
    table.add_column("part")
    table.add_column("tests passed", justify="right")
    table.add_column("points", justify="right")
    for group in unit.groups:
        style = "green" if group.total and group.passed == group.total else ("dim" if not group.max_score else "")
        table.add_row(group.title, f"{group.passed}/{group.total}", f"{_points(group.score)} / {_points(group.max_score)}",
                      style=style)
    table.add_row(Text("total", style="bold"), "", Text(f"{_points(unit.score)} / {_points(unit.max_score)}", style="bold"))
    console.print(table)
    if unit.error:
        console.print(Text(f"  could not grade this unit: {unit.error}", style="red"))
    for note in unit.notes:
        console.print(Text(f"  note: {note}", style="yellow"))
    ungraded = [t for t in unit.tests if t.status == NOT_GRADED]
    if ungraded:
        console.print(Text(f"  {len(ungraded)} GPU test(s) not graded: needs a CUDA GPU", style="dim"))
    failures = [t for t in unit.tests if t.status not in ("passed", NOT_GRADED)]
    for test in failures[:max_failures]:
        lines = test.output.strip().splitlines() or [test.status]
        shown = lines[:8] if test.visibility == "visible" else lines[:1]
        console.print(Text(f"  ✗ {test.name}", style=STATUS_STYLE.get(test.status, "red")))
        for line in shown:
            console.print(Text(f"      {line}"))
    if len(failures) > max_failures:
        console.print(Text(f"  ... and {len(failures) - max_failures} more failing test(s)", style="dim"))


def print_report(console: Console, report: Report) -> None:
    summary = Table(title="Grade", title_justify="left")
    summary.add_column("unit")
    summary.add_column("points", justify="right")
    for unit in report.units:
        summary.add_row(f"{unit.id}: {unit.title}", f"{_points(unit.score)} / {_points(unit.max_score)}")
    summary.add_row(Text("total", style="bold"), Text(f"{_points(report.score)} / {_points(report.max_score)}", style="bold"))
    console.print(summary)
    level = f"isolation: {report.isolation}"
    if report.isolation_note:
        level += f" ({report.isolation_note})"
    console.print(Text(level + f"; graded in {report.seconds:.1f} s", style="yellow" if report.isolation == "none" else "dim"))


def write_json(report: Report, path: Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")


def gradescope_results(report: Report, course: Course) -> dict:
    """Gradescope's results.json: one entry per test, hidden tests with course.yml's visibility."""
    tests = []
    number = 0
    for unit in report.units:
        for test in unit.tests:
            number += 1
            ungraded = test.status == NOT_GRADED
            entry = {
                "name": f"{unit.id} {test.name}",
                "number": str(number),
                "score": round(test.score, 4),
                "max_score": round(test.max_score, 4),
                "output": test.output or ("not graded: needs a CUDA GPU" if ungraded else ""),
                "output_format": "text",
                "tags": [unit.id, test.group],
                "visibility": "visible" if test.visibility == "visible" else course.hidden_visibility,
            }
            if not ungraded:
                entry["status"] = "passed" if test.status == "passed" else "failed"
            tests.append(entry)
        if unit.error or unit.notes:
            number += 1
            tests.append({"name": f"{unit.id} notes", "number": str(number), "score": 0, "max_score": 0,
                          "output": "\n".join(([unit.error] if unit.error else []) + unit.notes),
                          "output_format": "text", "visibility": "visible"})
    return {
        "score": report.score,
        "execution_time": round(report.seconds, 2),
        "output": f"Graded with isolation level '{report.isolation}'. {report.isolation_note}".strip(),
        "output_format": "text",
        "visibility": "visible",
        "stdout_visibility": "hidden",
        "tests": tests,
    }


def write_gradescope(report: Report, course: Course, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(gradescope_results(report, course), indent=2), encoding="utf-8")
