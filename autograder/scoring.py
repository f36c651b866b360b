"""From test outcomes to points.

Each course.yml group's points are shared equally by the tests in that group.  A skipped test
never earns points.  A GPU test on a machine without CUDA is "not graded": left out of max_score
(or scored 0 when course.yml says ``gpu_when_missing: zero``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from autograder.manifest import Course, Unit

NOT_GRADED = "not_graded"
MAX_TEXT = 4000

# Terminal escape sequences (CSI, OSC, two-character ESC), the other C0/C1 controls but newline and
# tab, and the Unicode marks that reorder or hide text: learner text never drives a terminal.
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]?|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-_]?)")
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    """Text that came from learner code, safe for every report: no control characters, capped."""
    text = _CONTROLS.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))
    return text if len(text) <= limit else text[: limit - 20] + " ... (cut)"


@dataclass
class TestResult:
    name: str
    group: str
    visibility: str  # visible | hidden
    status: str  # passed | failed | error | skipped | not_run | not_graded
    output: str = ""
    score: float = 0.0
    max_score: float = 0.0
    nodeid: str = ""


@dataclass
class GroupResult:
    id: str
    title: str
    score: float
    max_score: float
    passed: int
    total: int


@dataclass
class UnitResult:
    id: str
    title: str
    score: float = 0.0
    max_score: float = 0.0
    tests: list[TestResult] = field(default_factory=list)
    groups: list[GroupResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    isolation: str = ""
    seconds: float = 0.0
    error: str | None = None  # the unit could not be graded (a course problem, not the learner's)
    # learner.restart() calls that found no worker started ahead: a test not marked fresh_worker,
    # which waited for a whole start-up (the course's tests check there are none)
    unplanned_restarts: int = 0


@dataclass
class Report:
    course: str
    version: str
    units: list[UnitResult]
    isolation: str = ""
    isolation_note: str = ""
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return round(sum(u.score for u in self.units), 4)

    @property
    def max_score(self) -> float:
        return round(sum(u.max_score for u in self.units), 4)

    def to_json(self) -> dict:
        return {
            "score": self.score,
            "max_score": self.max_score,
            "course": self.course,
            "version": self.version,
            "isolation": self.isolation,
            "isolation_note": self.isolation_note,
            "seconds": round(self.seconds, 2),
            "units": [
                {"id": u.id, "title": u.title, "score": round(u.score, 4), "max_score": round(u.max_score, 4),
                 "notes": u.notes, "error": u.error, "seconds": round(u.seconds, 2),
                 "groups": [asdict(g) for g in u.groups],
                 "tests": [{"name": t.name, "nodeid": t.nodeid, "group": t.group, "score": round(t.score, 4), "max_score": round(t.max_score, 4),
                            "status": t.status, "visibility": t.visibility, "output": t.output} for t in u.tests]}
                for u in self.units
            ],
        }


def score_unit(course: Course, unit: Unit, result: UnitResult, empty_groups_count: bool = True) -> UnitResult:
    """Fill in points on ``result.tests`` (statuses already set) and the unit's totals.

    ``empty_groups_count=False`` is for runs without the hidden suite (a student release): a group
    that only hidden tests cover is then simply not tested, rather than scored 0."""
    count_ungraded = course.gpu_when_missing == "zero"
    result.groups = []
    for group in unit.groups:
        tests = [t for t in result.tests if t.group == group.id]
        counted = [t for t in tests if t.status != NOT_GRADED or count_ungraded]
        share = group.points / len(counted) if counted else 0.0
        for t in tests:
            t.max_score = share if t in counted else 0.0
            t.score = share if t.status == "passed" else 0.0
        # A group with no tests at all (its file failed to load) still counts, at zero.
        group_max = group.points if counted or (not tests and empty_groups_count) else 0.0
        result.groups.append(GroupResult(group.id, group.title, sum(t.score for t in tests), group_max,
                                         sum(t.status == "passed" for t in tests), len(counted)))
    result.score = sum(g.score for g in result.groups)
    result.max_score = sum(g.max_score for g in result.groups)
    return result


def unit_from_json(data: dict) -> UnitResult:
    """A unit of a stored JSON report, back as a UnitResult (points are recomputed by score_unit)."""
    tests = [TestResult(t["name"], t["group"], t["visibility"], t["status"], t.get("output", ""),
                        nodeid=t.get("nodeid", "")) for t in data["tests"]]
    return UnitResult(data["id"], data["title"], tests=tests, notes=list(data.get("notes", [])),
                      error=data.get("error"), seconds=data.get("seconds", 0.0))
