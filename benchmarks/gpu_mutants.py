"""Grade each GPU mutant (tests/mutants/gpu.yml: correct but slow or memory-hungry solutions) on
its unit's GPU-marked tests; every one must lose at least one of them.  Needs a CUDA GPU."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from autograder.manifest import REPO_ROOT, load_course
from autograder.runner import grade

GPU_MUTANTS = REPO_ROOT / "tests" / "mutants" / "gpu.yml"


def apply(root: Path, unit_dir: str, mutant: dict) -> None:
    file = root / unit_dir / mutant["file"]
    text = file.read_text()
    for edit in mutant["edits"]:
        if text.count(edit["find"]) != 1:
            raise SystemExit(f"mutant {mutant['name']}: its edit does not match exactly once in {unit_dir}/{mutant['file']}")
        text = text.replace(edit["find"], edit["replace"])
    file.write_text(text)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: the GPU mutants were not checked")
        return 2
    course = load_course()
    escaped = []
    for mutant in yaml.safe_load(GPU_MUTANTS.read_text()):
        unit = course.unit(mutant["unit"])
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "submission"
            shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
            apply(root, unit.dir, mutant)
            report = grade(course, root, [unit.id], extra_args=["-m", "gpu", "--gpu", "require"])
        result = report.units[0]
        failed = [t for t in result.tests if t.status != "passed"]
        print(f"{mutant['name']} ({unit.id}): {len(failed)} of {len(result.tests)} GPU tests fail")
        for test in failed:
            print(f"    {test.name}: {test.output.strip()[:300]}")
        if result.error or not failed:
            escaped.append(mutant["name"])
    print("escaped:", ", ".join(escaped) or "none")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
