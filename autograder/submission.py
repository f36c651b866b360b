"""Taking a submission in: a folder laid out like exercises/ or a zip made by `course submit`.

Intake copies only the files course.yml says a learner edits into a fresh grading folder, after
refusing unsafe zips, and runs the checks that need no learner code: file present, size, syntax,
and a static scan for forbidden shortcuts.  Problems become notes in the report, naming the file
and line; only an unsafe or unreadable zip stops grading.
"""

from __future__ import annotations

import ast
import hashlib
import json
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from autograder.manifest import Course, Forbidden, Unit

MANIFEST_NAME = "MANIFEST.json"
MAX_ZIP_ENTRIES = 200
MAX_ZIP_BYTES = 20 << 20


class SubmissionError(Exception):
    """The submission cannot be graded at all (an unsafe or unreadable zip, a missing folder)."""


@dataclass
class Intake:
    root: Path  # a grading folder: <unit dir>/<learner file>
    notes: dict[str, list[str]] = field(default_factory=dict)  # unit id -> notes for the learner
    _tmp: tempfile.TemporaryDirectory | None = None

    def note(self, unit: Unit, text: str) -> None:
        self.notes.setdefault(unit.id, []).append(text)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _safe_members(archive: zipfile.ZipFile, max_file_bytes: int) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    if len(members) > MAX_ZIP_ENTRIES:
        raise SubmissionError(f"the zip holds {len(members)} entries; at most {MAX_ZIP_ENTRIES} are accepted")
    total = 0
    for info in members:
        name = info.filename
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise SubmissionError(f"the zip entry {name!r} has an absolute path; refusing the submission")
        if ".." in parts or "\\" in name:
            raise SubmissionError(f"the zip entry {name!r} climbs out of its folder ('..'); refusing the submission")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise SubmissionError(f"the zip entry {name!r} is a symbolic link; refusing the submission")
        if info.file_size > max_file_bytes and not info.is_dir():
            raise SubmissionError(f"the zip entry {name!r} is {info.file_size >> 10} KB; files over "
                                  f"{max_file_bytes >> 10} KB are refused")
        total += info.file_size
    if total > MAX_ZIP_BYTES:
        raise SubmissionError(f"the zip unpacks to {total >> 20} MB; at most {MAX_ZIP_BYTES >> 20} MB are accepted")
    return members


def _unpack(zip_path: Path, dest: Path, max_file_bytes: int) -> Path:
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SubmissionError(f"{zip_path}: not a readable zip ({exc})") from None
    with archive:
        for info in _safe_members(archive, max_file_bytes):
            if info.is_dir():
                continue
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                written = 0
                while chunk := src.read(1 << 16):
                    written += len(chunk)
                    if written > max_file_bytes:  # a header that lies about the size
                        raise SubmissionError(f"the zip entry {info.filename!r} is larger than it claims")
                    out.write(chunk)
    # A zip of the exercises/ folder itself is fine too.
    inner = dest / "exercises"
    return inner if inner.is_dir() else dest


def forbidden_uses(source: str, filename: str, forbidden: list[Forbidden]) -> list[str]:
    """Static scan: lines that import or name a forbidden module or function."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError:
        return []
    hits = []
    for node in ast.walk(tree):
        for item in forbidden:
            last = item.name.rsplit(".", 1)[-1]
            is_module = "." not in item.name
            found = False
            if isinstance(node, ast.Import):
                found = any(a.name == item.name or a.name.startswith(item.name + ".") for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                full = [f"{node.module}.{a.name}" for a in node.names]
                found = (node.module == item.name or node.module.startswith(item.name + ".")
                         or item.name in full)
            elif isinstance(node, ast.Attribute) and not is_module:
                found = node.attr == last
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = node.value in (item.name, last)
            if found:
                hits.append(f"{filename}:{node.lineno}: uses {item.name}, forbidden here: {item.reason}")
    return sorted(set(hits), key=lambda h: int(h.split(":")[1]))


def _symlink_on_path(root: Path, relative: Path) -> Path | None:
    """The first symbolic link on the way from ``root`` down to ``root / relative``, if any."""
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def take_in(path: Path | str, course: Course, units: list[Unit]) -> Intake:
    """Copy the learner's files of ``units`` from ``path`` into a fresh grading folder.

    Nothing outside the submission is ever read on its behalf: a symbolic link anywhere from the
    submission folder down to a learner file (a clone can hold one, git stores them) is refused."""
    path = Path(path)
    if path.is_symlink():
        raise SubmissionError(f"{path}: the submission folder is a symbolic link; refusing to follow it")
    tmp = tempfile.TemporaryDirectory(prefix="course-grading-")
    work = Path(tmp.name)
    max_file = max(course.limits_for(u).max_file_kb for u in course.units) << 10
    try:
        if path.is_file():
            source = _unpack(path, work / "unpacked", max_file)
        elif path.is_dir():
            source = path
        else:
            raise SubmissionError(f"{path}: no such file or folder")
    except SubmissionError:
        tmp.cleanup()
        raise
    intake = Intake(root=work / "submission", _tmp=tmp)
    intake.root.mkdir()
    for unit in units:
        limits = course.limits_for(unit)
        (intake.root / unit.dir).mkdir()
        for name in unit.files:
            shown = f"{unit.dir}/{name}"
            file = source / unit.dir / name
            link = _symlink_on_path(source, Path(unit.dir) / name)
            if link is not None:
                intake.note(unit, f"{link.relative_to(source).as_posix()}: a symbolic link; {shown} left out "
                                  "(the grader reads only files inside the submission)")
                continue
            if file.exists() and not file.is_file():
                intake.note(unit, f"{shown}: not a regular file; left out")
                continue
            if not file.exists():
                intake.note(unit, f"{shown}: missing from the submission; its tests score 0")
                continue
            size = file.stat().st_size
            if size > limits.max_file_kb << 10:
                intake.note(unit, f"{shown}: {size >> 10} KB is over the {limits.max_file_kb} KB limit; left out")
                continue
            data = file.read_bytes()
            try:
                text = data.decode("utf-8")
                ast.parse(text, shown)
            except UnicodeDecodeError:
                intake.note(unit, f"{shown}: not UTF-8 text")
                text = None
            except SyntaxError as exc:
                intake.note(unit, f"{shown}:{exc.lineno}: SyntaxError: {exc.msg}; tests that import it score 0")
            if text is not None:
                for hit in forbidden_uses(text, shown, course.forbidden_for(unit)):
                    intake.note(unit, hit)
            (intake.root / unit.dir / name).write_bytes(data)
    return intake


def file_digests(root: Path, course: Course) -> dict[str, str]:
    digests = {}
    for unit in course.units:
        for name in unit.files:
            file = root / unit.dir / name
            if file.is_file():
                digests[f"{unit.dir}/{name}"] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def pack_submission(root: Path, course: Course, out: Path, created: str) -> dict:
    """Zip the files a learner edits, plus a manifest (course version, file hashes, time)."""
    manifest = {"course": course.course, "version": course.version, "created": created,
                "files": file_digests(root, course)}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in manifest["files"]:
            archive.write(root / rel, rel)
        archive.writestr(MANIFEST_NAME, json.dumps(manifest, indent=2))
    return manifest
