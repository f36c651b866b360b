"""Hostile submissions for Unit 6.

The end-to-end tests used to run the course's training loops (envs.train_gridworld,
rlhf.train_toy_rlhf) in the learner's process and trust the history they returned; now the loops
run in the grader and call the learner's functions one at a time.  Each attack here patches, in the
worker, the course code and the libraries those tests relied on (at import and, again and again,
from a thread), on top of either the untouched stub or "lazy" functions that return the right
shapes but learn nothing.  It must earn exactly what the same submission earns without the patches,
in every group: 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autograder.manifest import REPO_ROOT, Limits, load_course
from autograder.runner import grade

COURSE = load_course()
# Short call limit: nothing here should hang; the unit's timeout leaves room for a busy machine.
FAST = COURSE.model_copy(update={"limits": Limits(unit_timeout=240, call_timeout=10, memory_mb=3072,
                                                  max_processes=64, max_file_kb=512)})
STUB = (REPO_ROOT / "exercises" / "unit6" / "ppo.py").read_text()

# Functions that never raise, return what the loops need in the right shapes, and learn nothing.
# ppo_update's statistics claim the course's own measurements (return, score, KL) as well.
LAZY = '''
def compute_gae(rewards, values, dones, gamma, lam, next_value=None):
    return torch.zeros_like(rewards), torch.zeros_like(rewards)

def compute_gae_masked(rewards, values, mask, gamma, lam):
    return torch.zeros_like(rewards), torch.zeros_like(rewards)

def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    return torch.zeros_like(x)

def logprobs_from_logits(logits, labels):
    return torch.zeros(labels.shape)

def entropy_from_logits(logits):
    return torch.zeros(logits.shape[:-1])

def rlhf_rewards(scores, logp_policy, logp_ref, mask, beta):
    return torch.zeros_like(logp_policy), torch.zeros_like(logp_policy)

def ppo_update(agent, optimizer, batch, cfg, generator):
    return {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 1.0, "approx_kl": 0.0, "clipfrac": 0.0, "steps": 8,
            "return": 0.86, "greedy_return": 0.86, "episodes": 16, "score": 0.9, "kl": 0.0, "entropy_before": 1.0}
'''

# The course modules in the worker: every loop, environment, measurement and reward model the
# end-to-end tests used (or could use) there, replaced by fakes that report success.
PATCH_COURSE = '''
import sys as _sys, threading as _threading, time as _time
import torch as _torch

def _grid_history(seed=0, updates=30, *a, **k):
    return [{"return": 0.86, "episodes": 16, "greedy_return": 0.86, "policy_loss": 0.0, "value_loss": 0.0,
             "entropy": 1.0, "approx_kl": 0.0, "clipfrac": 0.0, "steps": 16} for _ in range(updates)]

def _rlhf_history(seed=0, updates=20, *a, **k):
    return [{"score": 0.06 if i == 0 else 0.9, "kl": 1.0, "entropy_before": 2.0, "policy_loss": 0.0, "value_loss": 0.0,
             "entropy": 2.0, "approx_kl": 0.0, "clipfrac": 0.0, "steps": 8, "rollout_seconds": 0.01, "seconds": 0.02}
            for i in range(updates)]

class _GoalWorld:
    """Every step reaches the goal."""
    def __init__(self, num_envs=16, size=5, max_steps=30, step_penalty=0.02):
        self.num_envs, self.size, self.max_steps = num_envs, size, max_steps
    obs_dim = property(lambda self: self.size * self.size)
    def observe(self):
        return _torch.zeros(self.num_envs, self.obs_dim)
    def reset(self):
        return self.observe()
    def step(self, actions):
        return self.observe(), _torch.full((self.num_envs,), 0.86), _torch.ones(self.num_envs)

def _patch():
    envs, rlhf = _sys.modules.get("unit6.envs"), _sys.modules.get("unit6.rlhf")
    if envs is not None and hasattr(envs, "train_gridworld"):
        envs.train_gridworld, envs._train = _grid_history, lambda *a, **k: _grid_history(updates=a[1] if len(a) > 1 else 30)
        envs.GridWorld = _GoalWorld
        envs.greedy_return = lambda *a, **k: 0.86
        envs.episode_returns = lambda rewards, dones: [0.86] * 16
    if rlhf is not None and hasattr(rlhf, "train_toy_rlhf"):
        rlhf.train_toy_rlhf = _rlhf_history
        rlhf.score = lambda responses: _torch.ones(responses.shape[0])
        rlhf.rollout_stats = lambda *a, **k: {"score": 0.9, "kl": 1.0, "entropy_before": 2.0}
        rlhf.TARGET = -1

def _keep_patching():
    while True:
        _patch()
        _time.sleep(0.002)

try:
    import unit6.envs, unit6.rlhf  # noqa: E401  (the course's copies in this process)
except ImportError:
    pass  # course code that imports this file at its own import: the thread patches it once loaded
_patch()
_threading.Thread(target=_keep_patching, daemon=True).start()
'''

# The containers and libraries the remaining tests use in the worker: the learner-side agents
# (built there, loaded with weights made in the grader, read back), Adam, the generator, autograd
# (behind harness.value_and_grad) and the per-position log-prob loop (the GPU baseline).
PATCH_WORKER = PATCH_COURSE + '''
import unit6.envs as _envs, unit6.rlhf as _rlhf  # noqa: E401

def _zero_init(self, *a, **k):
    _original_init(self, *a, **k)
    for p in self.parameters():
        p.data.zero_()
_original_init = _envs.ActorCritic.__init__
for _owner, _name, _fake in [
        (_envs.ActorCritic, "__init__", _zero_init),
        (_envs.ActorCritic, "load_state_dict", lambda self, *a, **k: None),  # keep its own weights
        (_rlhf.PolicyValueModel, "load_state_dict", lambda self, *a, **k: None),
        (_torch.optim.Adam, "step", lambda self, *a, **k: None),
        (_torch.Generator, "set_state", lambda self, state: self),  # a C type: refused, and that is fine
        (_torch.autograd, "grad", lambda outputs, inputs, *a, **k: tuple(_torch.zeros_like(t) for t in inputs)),
        (_rlhf, "logprobs_per_token_loop", lambda logits, labels: _time.sleep(1.0))]:
    try:
        setattr(_owner, _name, _fake)
    except (TypeError, AttributeError):
        pass
'''


def submission(tmp_path: Path, code: str) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "unit6" / "ppo.py").write_text(code)
    return root


def graded(tmp_path: Path, name: str, code: str):
    report = grade(FAST, submission(tmp_path / name, code), ["unit6"])
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
            cache[base] = graded(tmp_path_factory.mktemp(base), "plain", BASES[base])
        return cache[base]

    return get


BASES = {"stub": STUB, "lazy": STUB + LAZY}
ATTACKS = {"course": PATCH_COURSE, "worker": PATCH_WORKER}


@pytest.mark.parametrize("base, attack", [("stub", "course"), ("lazy", "course"), ("lazy", "worker")])
def test_patched_course_code_earns_what_the_plain_submission_earns(tmp_path, plain, base, attack):
    before = {g.id: g.score for g in plain(base).groups}
    unit = graded(tmp_path, "patched", BASES[base] + ATTACKS[attack])
    after = {g.id: g.score for g in unit.groups}
    assert after == before, f"the patches changed the grade: {before} -> {after}"
    assert sum(before.values()) == 0, before
    if base == "lazy":  # the loops ran to the end here, and the verdict is the grader's own measurement
        verdicts = {t.name.split("::")[-1]: t.output for t in unit.tests if t.group == "end_to_end"}
        assert "expected >= 0.7" in verdicts["test_gridworld_learns"], verdicts
        assert "expected >= 0.7" in verdicts["test_gridworld_reaches_the_goal"], verdicts
        assert "expected >= 0.25" in verdicts["test_toy_rlhf_reward_rises_with_bounded_kl"], verdicts
