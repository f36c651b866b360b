"""Hostile submissions for Unit 8.

The end-to-end tests run the course's loops (tasks.train_dpo, tasks.train_grpo) in the grader and
call the learner's dpo_step / grpo_step one at a time on learner-side copies of the course GPT; the
held-out accuracy, margin, KL and reward are measured by the grader's own tasks.py on the weights
that come back, against the grader's own frozen reference.  Each attack here patches, in the worker,
the course code those measurements could have come from (unit8.tasks: the loops, the data, the
rewards, the measurements, the frozen reference; at import and, again and again, from a thread),
and the libraries the remaining tests reach there (the GPT's load_state_dict, Adam, gradient
clipping, autograd behind the value_and_grad helper, the reference solution's module), or ships its
own tasks.py, graded_loops.py and common/gpt.py; on top of either the untouched stubs or "lazy"
functions that return the right shapes, claim success in their statistics and learn nothing.  It
must earn exactly what the same submission earns without the patches (the stub: 0).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autograder.manifest import REPO_ROOT, Limits, load_course
from autograder.runner import grade

COURSE = load_course()
UNIT = "unit8"
# Nothing here should hang; the unit's timeout leaves room for the loops on a busy machine.
FAST = COURSE.model_copy(update={"limits": Limits(unit_timeout=600, call_timeout=10, memory_mb=3072,
                                                  max_processes=64, max_file_kb=512)})
STUBS = {name: (REPO_ROOT / "exercises" / UNIT / name).read_text() for name in ("logprobs.py", "dpo.py", "grpo.py")}
# The tests the patches aim at: the steps and their replays, the loops, and the gradients taken in the worker.
SELECT = "step or learns or raises or gradient"

# Right shapes, no learning; the steps' statistics claim the course's own measurements as well.
LAZY = {
    "logprobs.py": '''
def token_logprobs(logits, input_ids, response_mask):
    return torch.full(input_ids[:, 1:].shape, -1.0)

def sequence_logprobs(logits, input_ids, response_mask, average=False):
    return torch.full(input_ids.shape[:1], -1.0)

def model_logits(model, input_ids, attention_mask):
    return torch.zeros(*input_ids.shape, model.config.vocab_size)

def reference_logprobs(reference, input_ids, attention_mask, response_mask, average=False):
    return torch.full(input_ids.shape[:1], -1.0)
''',
    "dpo.py": '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, gamma=0.5):
    ones = torch.ones_like(policy_chosen_logps)
    return (policy_chosen_logps - policy_chosen_logps + 0.01) * ones, ones, -ones

def preference_stats(chosen_rewards, rejected_rewards):
    return {"accuracy": 1.0, "margin": 5.0, "chosen": 1.0, "rejected": -4.0}

def dpo_step(policy, reference, optimizer, batch, cfg):
    return {"loss": 0.01, "accuracy": 1.0, "margin": 5.0, "chosen": 1.0, "rejected": -4.0,
            "eval_accuracy": 1.0, "eval_margin": 5.0, "eval_kl": 0.1, "seconds": 0.0}
''',
    "grpo.py": '''
def group_advantages(rewards, group_size, scale_rewards=True, eps=1e-4):
    return rewards.float() + 1.0

def per_token_kl(logp, logp_ref):
    return torch.full_like(logp, 0.5)

def clipped_token_loss(logp, logp_old, advantages, clip_eps):
    return logp * 0.0 + 1.0

def grpo_loss(logp, logp_old, logp_ref, advantages, mask, clip_eps=0.2, beta=0.04, aggregation="sequence"):
    return logp.sum() * 0.0 + 1.0, {"kl": torch.tensor(0.5), "clipfrac": torch.tensor(0.5)}

def grpo_step(policy, reference, optimizer, batch, cfg):
    return {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "steps": cfg.iterations, "reward": 1.0, "sampled_kl": 0.0}
''',
}

# The course modules in the worker: every loop, data maker, reward, measurement and the frozen
# reference the end-to-end tests could have used there, replaced by fakes that report success.
PATCH_COURSE = '''
import sys as _sys, threading as _threading, time as _time
import torch as _torch

def _dpo_history(policy=None, reference=None, data=None, steps=100, *a, **k):
    return [{"loss": 0.01, "accuracy": 1.0, "margin": 5.0, "chosen": 1.0, "rejected": -4.0, "seconds": 0.001,
             "eval_accuracy": 1.0, "eval_margin": 5.0, "eval_kl": 0.1} for _ in range(steps)]

def _grpo_history(policy=None, reference=None, updates=150, *a, **k):
    return [{"loss": 0.0, "kl": 0.01, "clipfrac": 0.0, "steps": 1, "reward": 0.05 if i < 10 else 1.0,
             "sampled_kl": 0.1, "seconds": 0.001} for i in range(updates)]

def _patch():
    tasks = _sys.modules.get("unit8.tasks")
    if tasks is None or not hasattr(tasks, "train_dpo"):
        return
    tasks.train_dpo, tasks.train_grpo = _dpo_history, _grpo_history
    tasks.evaluate_preferences = lambda *a, **k: {"accuracy": 1.0, "margin": 5.0, "kl": 0.1}
    tasks.response_logprob = lambda model, prompt, response: (0.0, _torch.zeros(len(response), 16))
    tasks.reward = lambda prompts, sequences: _torch.ones(sequences.shape[0])
    tasks.greedy_accuracy = lambda *a, **k: 1.0
    tasks.sampled_kl = lambda *a, **k: 0.0
    tasks.make_preference_rows = lambda seed, n: [{"prompt": [1, 2], "chosen": [1, 12], "rejected": [1, 12]}] * n
    tasks.frozen_copy = lambda model: model  # "the reference" is the policy itself: KL 0, every margin 0
    tasks.new_policy = lambda seed, config=None: tasks.GPT(config or tasks.policy_config())
    tasks.DIGITS = 1

def _keep_patching():
    while True:
        _patch()
        _time.sleep(0.002)

try:
    import unit8.tasks  # noqa: F401  (the course's copy in this process)
except ImportError:
    pass
try:
    import unit8.graded_loops as _loops  # needs the grader's checks: absent in the sandbox
    _loops.LearnerSteps.dpo_step = lambda self, *a, **k: {"loss": 0.0}
except Exception:
    pass
_patch()
_threading.Thread(target=_keep_patching, daemon=True).start()
'''

# The containers and libraries the remaining tests use in the worker: the learner-side GPT copies
# (built there, loaded with the grader's weights, read back), Adam, clipping, autograd (behind the
# value_and_grad helper), and the reference solution's module where the worker can import it.
PATCH_WORKER = PATCH_COURSE + '''
import common.gpt as _gpt

for _owner, _name, _fake in [
        (_gpt.GPT, "load_state_dict", lambda self, *a, **k: None),  # keep its own weights
        (_torch.optim.Adam, "step", lambda self, *a, **k: None),
        (_torch.optim.SGD, "step", lambda self, *a, **k: None),
        (_torch.nn.utils, "clip_grad_norm_", lambda *a, **k: _torch.tensor(0.0)),
        (_torch.autograd, "grad", lambda outputs, inputs, *a, **k: tuple(_torch.zeros_like(t) for t in inputs))]:
    try:
        setattr(_owner, _name, _fake)
    except (TypeError, AttributeError):
        pass
try:
    import autograder.course_code as _course_code
    _course_code.reference_module = lambda name: _sys.modules[__name__]
except Exception:
    pass
'''

# The submission's own copies of the course code, which the grader must never use.
COURSE_FILES = {
    "unit8/tasks.py": "raise SystemExit('the course code of this submission')\n",
    "unit8/graded_loops.py": "class LearnerSteps:\n    pass\n",
    "common/gpt.py": "import os\nos._exit(0)\n",
}


def submission(tmp_path: Path, base: str, attack: str | None) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    for name, stub in STUBS.items():
        code = stub + ("\n" + LAZY[name] if base == "lazy" else "")
        if name == "logprobs.py" and attack in ATTACKS:
            code += "\n" + ATTACKS[attack]
        (root / UNIT / name).write_text(code)
    if attack == "files":
        for path, code in COURSE_FILES.items():
            (root / path).write_text(code)
    return root


def graded(tmp_path: Path, base: str, attack: str | None):
    report = grade(FAST, submission(tmp_path, base, attack), [UNIT], extra_args=["-k", SELECT])
    unit = report.units[0]
    assert unit.error is None, unit.error
    assert report.isolation in ("bwrap", "user"), report.isolation_note
    return unit


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The grade of each base submission without patches (graded once for the module)."""
    cache = {}

    def get(base: str):
        if base not in cache:
            cache[base] = graded(tmp_path_factory.mktemp(base), base, None)
        return cache[base]

    return get


ATTACKS = {"course": PATCH_COURSE, "worker": PATCH_WORKER}


@pytest.mark.parametrize("base, attack", [("stub", "course"), ("lazy", "course"), ("lazy", "worker"), ("lazy", "files")])
def test_patched_course_code_earns_what_the_plain_submission_earns(tmp_path, plain, base, attack):
    before = {g.id: g.score for g in plain(base).groups}
    unit = graded(tmp_path, base, attack)
    after = {g.id: g.score for g in unit.groups}
    assert after == before, f"the patches changed the grade: {before} -> {after}"
    assert sum(before.values()) == 0, before
    ran = [t for t in unit.tests if t.status in ("passed", "failed")]
    assert ran and not [t.name for t in unit.tests if t.status == "passed"]
    if base == "lazy":  # the loops ran to the end here, and the verdict is the grader's own measurement
        verdicts = {t.name.split("::")[-1]: t.output for t in unit.tests if t.group == "end_to_end"}
        assert "expected >= 0.7" in verdicts["test_dpo_learns_the_preference_rule"], verdicts
        assert "expected >= 0.3" in verdicts["test_grpo_raises_the_reward"], verdicts
        assert "expected >= 0.65" in verdicts["test_dpo_learns_the_rule"], verdicts
