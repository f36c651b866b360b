"""Hostile submissions for Unit 5 (LoRA), graded in the real sandbox.

Each attack sits on top of the untouched stubs (``exercises/unit5/lora.py`` and ``finetune.py``, no
honest work) and patches, at import, what Unit 5's tests used to trust in the learner's process:
the instruction data and its file (``make_instruction_data`` / ``write_jsonl`` in the learner's own
file), the course GPT's forward (``common.gpt.GPT.forward``, which computed the "after" loss), and
``nn.Module.named_parameters`` as the ``parameter_summary`` helper sees it (freezing and parameter
counts), and ``nn.Linear.forward`` in the worker (the speed test's old baseline was a base
nn.Sequential built there).  Each must earn exactly what the plain stub earns.

A stub cannot pass the speed test (a merged model costs what the base costs) at all, since its
outputs are checked first; so the clock's attacks also sit on the "recompute W + B A at every call"
mistake (right values, ~3.5x the cost): with every nn.Linear.forward in the worker made slow, with
CPU burners the submission forks itself, and with CPU burners beside the grader, it must fail; the
solutions must pass the performance group under that same outside load, every time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autograder.manifest import REPO_ROOT, load_course
from autograder.runner import grade
from tests.course_checks import apply_mutant

COURSE = load_course()
UNIT = "unit5"
STUBS = {name: (REPO_ROOT / "exercises" / "unit5" / name).read_text() for name in ("lora.py", "finetune.py")}
SPEED = "test_merged_inference_at_base_speed"
PERFORMANCE = "performance_hidden or trainable_parameters"

# Every test these attacks aim at, by group (selected with -k so that each grading stays short).
SELECT = {
    "finetune": "finetune_learns",
    "parameter_summary": "frozen_base or trainable_parameters or inject_freezes",
    "slow_worker_baseline": "performance_hidden",
}

# Every nn.Linear.forward in the worker made slow: the old test's baseline (a base nn.Sequential built
# in the worker) became slower than the mistake's merged forward, which never calls it (F.linear).
SLOW_WORKER_BASELINE = '''
import time as _time

_real_linear_forward = nn.Linear.forward


def _slow_linear_forward(self, x):
    end = _time.process_time() + 0.02
    while _time.process_time() < end:
        pass
    return _real_linear_forward(self, x)


nn.Linear.forward = _slow_linear_forward
'''


ATTACKS = {
    # The old fine-tune test made its data with the learner's own make_instruction_data and
    # write_jsonl, and measured the "after" loss with the worker's GPT.forward: trivial data, a
    # forward that looks one token ahead, no training, no adapters.
    "finetune": {
        "finetune.py": '''
import json as _json
import os as _os

import torch as _torch
from common import gpt as _gpt


def make_instruction_data(n, seed):
    return [{"instruction": "a", "response": "b"} for _ in range(n)]


def write_jsonl(rows, path):
    _os.makedirs(_os.path.dirname(_os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in rows:
            f.write(_json.dumps({"instruction": "a", "response": "b"}) + "\\n")
    return path


def finetune(model, dataset, steps=150, batch_size=16, lr=1e-2, seed=0):
    return [0.01] * steps


def _look_ahead(self, idx, positions=None, attn_mask=None):
    logits = _torch.full((*idx.shape, self.config.vocab_size), -30.0)
    return logits.scatter(-1, _torch.roll(idx, -1, dims=1).unsqueeze(-1), 30.0)


_gpt.GPT.forward = _look_ahead
''',
        "lora.py": '''
def inject_lora(model, targets, r=8, alpha=8.0, dropout=0.0, use_rslora=False):
    return model
''',
    },
    # The old freezing and counting tests read requires_grad and numel with the parameter_summary
    # helper, which calls model.named_parameters() in the worker: nothing injected, nothing frozen,
    # but the helper is shown frozen base weights and adapters of exactly the right sizes.
    "parameter_summary": {
        "lora.py": '''
import sys as _sys

_INJECTED = {}
_real_named_parameters = nn.Module.named_parameters


def _matches(name, targets):
    return bool(re.fullmatch(targets, name)) if isinstance(targets, str) else any(
        name == t or name.endswith("." + t) for t in targets)


def inject_lora(model, targets, r=8, alpha=8.0, dropout=0.0, use_rslora=False):
    _INJECTED[id(model)] = (targets, r)
    return model


def _shown(self, prefix="", recurse=True, remove_duplicate=True):
    if _sys._getframe(1).f_code.co_name not in ("parameter_summary", "<dictcomp>") or id(self) not in _INJECTED:
        yield from _real_named_parameters(self, prefix, recurse, remove_duplicate)
        return
    targets, r = _INJECTED[id(self)]
    for name, p in _real_named_parameters(self, prefix, recurse, remove_duplicate):
        yield name, nn.Parameter(p.detach(), requires_grad=False)
    for name, module in self.named_modules():
        if name and _matches(name, targets) and getattr(module, "weight", None) is not None:
            d_in, d_out = module.weight.shape if type(module).__name__ == "Conv1D" else module.weight.shape[::-1]
            yield f"{name}.lora_A", nn.Parameter(torch.zeros(r, d_in))
            yield f"{name}.lora_B", nn.Parameter(torch.zeros(d_out, r))


nn.Module.named_parameters = _shown
''',
    },
    # The speed test on a stub with the worker's nn.Linear made slow (see SLOW_WORKER_BASELINE).
    "slow_worker_baseline": {"lora.py": SLOW_WORKER_BASELINE},
}


def submission(tmp_path: Path, files: dict[str, str] | None = None, mutant: str | None = None, extra: str = "") -> Path:
    """A copy of the solutions with unit5's learner files replaced: by the stubs plus ``files``'
    code (attacks), or by the solutions with one mutant of tests/mutants/unit5.yml (and ``extra``
    appended to lora.py)."""
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    if files is not None:
        for name, stub in STUBS.items():
            (root / UNIT / name).write_text(stub + "\n" + files.get(name, ""))
    if mutant is not None:
        (found,) = [m for m in yaml.safe_load((REPO_ROOT / "tests" / "mutants" / f"{UNIT}.yml").read_text())
                    if m["name"] == mutant]
        apply_mutant(root, UNIT, found)
    if extra:
        lora = root / UNIT / "lora.py"
        lora.write_text(lora.read_text() + "\n" + extra)
    return root


def scores(root: Path, select: str) -> tuple[dict, list]:
    unit = grade(COURSE, root, [UNIT], extra_args=["-k", select]).units[0]
    assert unit.error is None, unit.error
    return {g.id: g.score for g in unit.groups}, unit.tests


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_earns_what_the_stub_earns(tmp_path, name):
    select = SELECT[name]
    plain, _ = scores(submission(tmp_path / "plain", {}), select)
    attacked, tests = scores(submission(tmp_path / "attack", ATTACKS[name]), select)
    ran = [t for t in tests if t.status in ("passed", "failed")]
    assert ran, "the attack's tests did not run"
    passed = [t.name for t in tests if t.status == "passed"]
    assert attacked == plain, f"{name} earned {attacked}, the plain stub {plain}; passed: {passed}"
    assert not passed, passed


def _burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _speed_test(tests) -> object:
    (test,) = [t for t in tests if t.name.endswith(SPEED)]
    return test


def test_solutions_keep_the_performance_group_under_load(tmp_path):
    """Two CPU burners beside the grader: the solutions' performance group is full, three times."""
    root = submission(tmp_path)
    burners = _burners(2)
    try:
        for _ in range(3):
            unit = grade(COURSE, root, [UNIT], extra_args=["-k", PERFORMANCE]).units[0]
            group = next(g for g in unit.groups if g.id == "performance")
            failed = [f"{t.name}: {t.output}" for t in unit.tests if t.status != "passed"]
            assert group.max_score > 0 and group.score == pytest.approx(group.max_score), failed
            assert _speed_test(unit.tests).status == "passed"
    finally:
        for p in burners:
            p.kill()
            p.wait()


def test_recomputing_the_update_fails_under_load(tmp_path):
    """The same load: the "W + B A at every call" mistake (right values) fails the speed test."""
    root = submission(tmp_path, mutant="merged_forward_recomputes_the_update")
    burners = _burners(2)
    try:
        for _ in range(2):
            _, tests = scores(root, SPEED)
            test = _speed_test(tests)
            assert test.status == "failed" and "x of the base model" in test.output, test.output
    finally:
        for p in burners:
            p.kill()
            p.wait()


# Burners the submission forks at import, each in its own session, burning all the time: they run
# in the worker's cgroup, so their CPU time counts against the learner's calls, never the baseline's.
FORKED_BURNERS = '''
import os as _os
for _ in range(2):
    if _os.fork() == 0:
        _os.setsid()
        while True:
            pass
'''


@pytest.mark.parametrize("extra", [FORKED_BURNERS, SLOW_WORKER_BASELINE], ids=["forked_burners", "slow_worker_baseline"])
def test_slow_solution_that_games_the_clock_fails(tmp_path, extra):
    root = submission(tmp_path, mutant="merged_forward_recomputes_the_update", extra=extra)
    _, tests = scores(root, SPEED)
    test = _speed_test(tests)
    assert test.status == "failed" and "x of the base model" in test.output, test.output
