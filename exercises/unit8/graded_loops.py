"""Course code for the tests (read it, do not edit it): your dpo.py and grpo.py as the course's
training loops see them when the grader runs them.

The end-to-end tests run ``tasks.train_dpo`` and ``tasks.train_grpo`` in the grader's own process
(its data, batches, sampling and rewards), passing a ``LearnerSteps`` as the loops' ``dpo`` or
``grpo``: your dpo_step / grpo_step run in your process on copies of the policy and the reference
(the course GPT, loaded with the grader's weights) with an Adam of the loop's settings, and the
updated policy weights come back after every step.  The held-out accuracy, margin, KL and reward
that are checked are measured here on those weights, by ``tasks``, never by your functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from types import SimpleNamespace

import torch

from autograder.checks import check
from autograder.client import LearnerError, describe_value


class LearnerSteps:
    """The learner's dpo.py or grpo.py (``module``) as a course loop sees it here.

    ``dpo_step`` / ``grpo_step`` (whichever the module has) take the loop's policy, reference and
    Adam: at the first step a copy of each model is made on the learner's side (the course GPT of
    the same config) and loaded with these weights, with an Adam of the same settings; every step
    then runs the learner's step function on those copies with the batch made here, and loads the
    updated policy weights into the loop's policy, which samples (GRPO) and is judged here.  Inside
    ``with``: one torch thread on the learner's side, and ``seconds`` for the whole run."""

    def __init__(self, learner, module: str, seconds: float, what: str):
        self.learner, self.name, self.seconds, self.what = learner, module, seconds, what
        self.module, self.fn = learner.module(module), None
        self.torch, self.gpt = learner.lib("torch"), learner.module("common.gpt")
        self.policy = None
        self.steps = 0

    def __enter__(self):
        self.deadline = time.monotonic() + self.seconds
        self.threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(LearnerError):
            self.torch.set_num_threads(self.threads)

    # the loops' configs stay here; the learner's dataclass is made from them at each step
    def DPOConfig(self, **fields):
        return SimpleNamespace(**fields)

    def GRPOConfig(self, **fields):
        return SimpleNamespace(**fields)

    def dpo_step(self, policy, reference, optimizer, batch, cfg):
        return self._step("dpo_step", "DPOConfig", policy, reference, optimizer, batch, cfg)

    def grpo_step(self, policy, reference, optimizer, batch, cfg):
        return self._step("grpo_step", "GRPOConfig", policy, reference, optimizer, batch, cfg)

    def _copy(self, model):
        copy = self.gpt.GPT(self.gpt.GPTConfig(**dataclasses.asdict(model.config)))
        copy.load_state_dict(model.state_dict())
        return copy

    def _step(self, name, config_name, policy, reference, optimizer, batch, cfg):
        assert type(optimizer) is torch.optim.Adam, "the course loops use Adam"
        left = self.deadline - time.monotonic()
        check(left > 0, f"{self.what} ran past {self.seconds:g} s (after {self.steps} steps): the loop runs in the "
                        f"grader and calls your {name}; is it far too slow?")
        if self.policy is None:
            self.policy, self.reference = self._copy(policy), self._copy(reference)
            settings = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
            self.optimizer = self.torch.optim.Adam(self.policy.parameters(), **settings)
            self.fn, self.config, self.weights = getattr(self.module, name), getattr(self.module, config_name), \
                self.policy.state_dict
        with self.learner.time_limit(left):
            stats = self.fn(self.policy, self.reference, self.optimizer, batch, self.config(**vars(cfg)))
        self.steps += 1
        what = f"{self.what}, step {self.steps}: {name}(policy, reference, Adam, batch of {batch['input_ids'].shape[0]} rows)"
        check(isinstance(stats, dict), f"{what} returned {describe_value(stats)}; expected a dict of statistics")
        weights, expected = self.weights(), policy.state_dict()
        check(isinstance(weights, dict) and weights.keys() == expected.keys()
              and all(isinstance(weights[k], torch.Tensor) and weights[k].shape == v.shape for k, v in expected.items()),
              f"{what}: the policy's state_dict() afterwards does not match the policy's parameters")
        broken = [k for k in expected if not torch.isfinite(weights[k]).all()]
        check(not broken, f"{what} left nan or inf in the policy's weights ({', '.join(broken[:3])}): look for a "
                          "log of 0, a division by 0 or an overflowing exp in the loss")
        policy.load_state_dict(weights)
        return stats
