"""course.yml: the one description of the course, validated on load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = REPO_ROOT / "course.yml"


class ManifestError(Exception):
    """course.yml is missing or wrong; the message says where and how."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    unit_timeout: float = Field(300, gt=0, description="seconds for all of a unit's tests")
    call_timeout: float = Field(30, gt=0, description="seconds for one call into learner code")
    memory_mb: int = Field(4096, ge=256, description="memory of the worker and its children")
    max_processes: int = Field(64, ge=4, description="processes and threads in the sandbox")
    max_file_kb: int = Field(512, ge=1, description="size of one submitted file")
    visible_test_timeout: float = Field(120, gt=0, description="seconds for one visible test in a learner's own run")


class Group(_Strict):
    id: str
    title: str
    points: float = Field(gt=0)


class Forbidden(_Strict):
    name: str = Field(description="a module (`peft`) or a dotted attribute (`torch.nn.functional.x`)")
    reason: str

    @field_validator("name")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", value):
            raise ValueError(f"{value!r} is not a dotted Python name")
        return value


class Unit(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    dir: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="folder under exercises/ and solutions/")
    files: list[str] = Field(min_length=1, description="the files a learner edits")
    provided: list[str] = Field(default_factory=list, description="course folders the unit's code imports")
    groups: list[Group] = Field(min_length=1)
    forbidden: list[Forbidden] = Field(default_factory=list)
    limits: Limits | None = None

    @field_validator("files")
    @classmethod
    def _plain_python_files(cls, files: list[str]) -> list[str]:
        for name in files:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*\.py", name):
                raise ValueError(f"{name!r}: learner files are plain module names like 'autograd.py'")
        if len(set(files)) != len(files):
            raise ValueError("a file is listed twice")
        return files

    @model_validator(mode="after")
    def _unique_groups(self) -> "Unit":
        ids = [g.id for g in self.groups]
        if len(set(ids)) != len(ids):
            raise ValueError(f"group ids repeat: {ids}")
        return self

    @property
    def points(self) -> float:
        return sum(g.points for g in self.groups)

    def group(self, group_id: str) -> Group | None:
        return next((g for g in self.groups if g.id == group_id), None)


class Course(_Strict):
    course: str
    title: str
    version: str
    gpu_when_missing: Literal["exclude", "zero"] = Field(
        "exclude", description="GPU tests on a machine without CUDA: left out of max_score, or scored 0"
    )
    hidden_feedback: Literal["full", "summary", "none"] = "summary"
    hidden_visibility: Literal["hidden", "after_due_date", "after_published", "visible"] = "after_due_date"
    limits: Limits = Limits()
    forbidden: list[Forbidden] = Field(default_factory=list, description="forbidden in every unit")
    units: list[Unit] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_units(self) -> "Course":
        for attr in ("id", "dir"):
            values = [getattr(u, attr) for u in self.units]
            if len(set(values)) != len(values):
                raise ValueError(f"unit {attr}s repeat: {values}")
        return self

    def unit(self, unit_id: str) -> Unit:
        for unit in self.units:
            if unit.id == unit_id:
                return unit
        known = ", ".join(u.id for u in self.units)
        raise ManifestError(f"no unit {unit_id!r} in course.yml (units: {known})")

    def limits_for(self, unit: Unit) -> Limits:
        return unit.limits or self.limits

    def forbidden_for(self, unit: Unit) -> list[Forbidden]:
        return [*self.forbidden, *unit.forbidden]

    @property
    def points(self) -> float:
        return sum(u.points for u in self.units)


def _where(loc: tuple, raw: dict) -> str:
    """Turn pydantic's location into 'units[0] (unit1).groups[2].points'."""
    parts, node = [], raw
    for key in loc:
        if isinstance(key, int):
            label = f"[{key}]"
            if isinstance(node, list) and key < len(node) and isinstance(node[key], dict) and "id" in node[key]:
                label += f" ({node[key]['id']})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(key))
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts) or "(top level)"


def load_course(path: Path | str = MANIFEST_PATH) -> Course:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found; the course manifest must sit at the repository root") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level, found {type(raw).__name__}")
    try:
        return Course.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: {exc.error_count()} problem(s):"]
        for err in exc.errors():
            lines.append(f"  {_where(err['loc'], raw)}: {err['msg']}")
        raise ManifestError("\n".join(lines)) from None
