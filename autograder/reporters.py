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
    for test in unit.tests:  # what passing tests measured (speed-ups, bandwidth)
        if test.status == "passed" and test.output.strip():
            console.print(Text(f"  ✓ {test.name}", style="green"), soft_wrap=True)
            console.print(Text(f"      {test.output.strip().splitlines()[0]}", style="dim"), soft_wrap=True)
    failures = [t for t in unit.tests if t.status not in ("passed", NOT_GRADED)]
    for test in failures[:max_failures]:
        lines = test.output.strip().splitlines() or [test.status]
        shown = lines[:8]  # hidden outputs are already summarised by course.yml's hidden_feedback
        console.print(Text(f"  ✗ {test.name}", style=STATUS_STYLE.get(test.status, "red")), soft_wrap=True)
        for line in shown:
            console.print(Text(f"      {line}"), soft_wrap=True)
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
                # With hidden_feedback "none" not even a hidden test's name is shown.
                "name": f"{unit.id} {test.name}" if test.visibility == "visible" or course.hidden_feedback != "none"
                        else f"{unit.id} hidden test {number}",
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


def feedback_markdown(report: dict, course: Course, learner: str) -> str:
    """A learner's feedback file from a JSON report, showing hidden tests only as far as course.yml's
    ``hidden_feedback`` allows: ``full`` and ``summary`` name each failed hidden test with its
    (already shortened) message; ``none`` names no hidden test and gives counts per part only."""
    lines = [f"# {course.title}: feedback for {learner}", "",
             f"**Total: {_points(report['score'])} / {_points(report['max_score'])}**", ""]
    if report.get("refused"):
        lines += [report["refused"], ""]
    for unit in report["units"]:
        lines += [f"## {unit['id']}: {unit['title']}: {_points(unit['score'])} / {_points(unit['max_score'])}", ""]
        if unit.get("groups"):
            lines += ["| part | tests passed | points |", "|---|---|---|"]
            lines += [f"| {g['title']} | {g['passed']}/{g['total']} | {_points(g['score'])} / {_points(g['max_score'])} |"
                      for g in unit["groups"]]
            lines.append("")
        for note in ([unit["error"]] if unit.get("error") else []) + unit.get("notes", []):
            lines.append(f"- note: {note}")
        tests = unit.get("tests", [])
        ungraded = sum(t["status"] == NOT_GRADED for t in tests)
        if ungraded:
            lines.append(f"- {ungraded} GPU test(s) not graded yet: needs a CUDA GPU")
        failed = [t for t in tests if t["status"] not in ("passed", NOT_GRADED)]
        shown = [t for t in failed if t["visibility"] == "visible" or course.hidden_feedback != "none"]
        for test in shown:
            message = test.get("output", "").strip() or test["status"]  # hidden: already summarised
            lines += [f"- failed: `{test['name']}`", "", "  ```", *[f"  {l}" for l in message.splitlines()[:12]], "  ```"]
        if len(shown) < len(failed):
            lines.append(f"- {len(failed) - len(shown)} hidden test(s) failed; the course does not show which")
        lines.append("")
    return "\n".join(lines)
