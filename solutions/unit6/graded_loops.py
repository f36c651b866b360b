"""Course code for the tests (read it, do not edit it): your ppo.py as the course's training loops
see it when the grader runs them.

The end-to-end tests run ``envs.train_gridworld`` and ``rlhf.train_toy_rlhf`` in the grader's own
process (its environment, sampling, reward model, returns and KL), and pass a ``LearnerPPO`` as the
loops' ``ppo``: each of your functions is called across the boundary, tensors in and tensors out,
and ``ppo_update`` runs on a copy of the agent on your side whose weights come back after every
update.  With a correct ppo.py the run equals the course's loop run in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from types import SimpleNamespace

import torch

from autograder.checks import check
from autograder.client import LearnerError, describe_args, describe_value


class LearnerPPO:
    """The learner's ppo.py as the course's training loops see it here (their ``ppo`` argument).

    The loop (``learner.course("envs").train_gridworld``, ``learner.course("rlhf").train_toy_rlhf``)
    runs on this side: its environment, sampling, score, KL and returns are the course's own.  Each
    learner function is called through the boundary, tensors in and tensors out.  ``ppo_update``
    needs the agent and its optimizer where the learner's code runs: at the first update a copy of
    the agent is made there (``make_agent``) and loaded with this agent's weights, with an Adam of
    this optimizer's settings; every update then runs the learner's ppo_update on that copy with
    the batch made here and a generator in this generator's state, and copies the updated weights
    into this agent, which collects the next rollout and is judged here.  This generator then moves
    on as the handout's loop moves it (``epochs`` permutations of N) whatever the other side did, so
    with a correct ppo.py the run equals the course's loop run in one process.  Inside ``with``:
    one torch thread on the learner's side (as the loop uses here) and ``seconds`` for the whole run.
    """

    def __init__(self, learner, make_agent, seconds: float, what: str):
        self.learner, self.make_agent, self.seconds, self.what = learner, make_agent, seconds, what
        self.ppo, self.fn = learner.module("ppo"), {}  # each function looked up once: fewer round trips
        self.torch = learner.lib("torch")
        self.agent = None  # the learner's side's copy of the agent, made at the first update
        self.calls = self.updates = 0

    def __enter__(self):
        self.deadline = time.monotonic() + self.seconds
        self.threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared machine
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(LearnerError):  # a worker that died during the loop has nothing to restore
            self.torch.set_num_threads(self.threads)

    def _call(self, name, *args):
        left = self.deadline - time.monotonic()
        check(left > 0, f"{self.what} ran past {self.seconds:g} s (after {self.updates} updates): the loop runs in the "
                        "grader and calls your functions; is one of them far too slow?")
        self.calls += 1
        if name not in self.fn:
            self.fn[name] = getattr(self.ppo, name)
        with self.learner.time_limit(left):
            return self.fn[name](*args)

    def _tensors(self, name, args, count, shape):
        out = self._call(name, *args)
        outs = tuple(out) if count > 1 and isinstance(out, (tuple, list)) else (out,)
        good = len(outs) == count and all(isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) for t in outs)
        want = f"{count} tensors, each" if count > 1 else "a tensor"
        check(good, f"{self.what}, update {self.updates + 1}: {name}({describe_args(args, {})}) returned "
                    f"{describe_value(out)}; the loop needs {want} of shape {tuple(shape)}")
        return out

    # the data-in, data-out functions the loops call
    def compute_gae(self, rewards, values, dones, gamma, lam, next_value=None):
        return self._tensors("compute_gae", (rewards, values, dones, gamma, lam, next_value), 2, rewards.shape)

    def compute_gae_masked(self, rewards, values, mask, gamma, lam):
        return self._tensors("compute_gae_masked", (rewards, values, mask, gamma, lam), 2, rewards.shape)

    def masked_whiten(self, x, mask):
        return self._tensors("masked_whiten", (x, mask), 1, x.shape)

    def logprobs_from_logits(self, logits, labels):
        return self._tensors("logprobs_from_logits", (logits, labels), 1, labels.shape)

    def entropy_from_logits(self, logits):
        return self._tensors("entropy_from_logits", (logits,), 1, logits.shape[:-1])

    def rlhf_rewards(self, scores, logp_policy, logp_ref, mask, beta):
        return self._tensors("rlhf_rewards", (scores, logp_policy, logp_ref, mask, beta), 2, logp_policy.shape)

    def PPOConfig(self, **fields):
        """The loop's settings stay here; the learner's PPOConfig is made from them at each update."""
        return SimpleNamespace(**fields)

    def ppo_update(self, agent, optimizer, batch, cfg, generator):
        assert type(optimizer) is torch.optim.Adam, "the course loops use Adam"
        if self.agent is None:
            self.agent = self.make_agent(agent)
            self.agent.load_state_dict(agent.state_dict())
            settings = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
            self.optimizer = self.torch.optim.Adam(self.agent.parameters(), **settings)
            self.generator = self.torch.Generator()
            self.set_state, self.weights = self.generator.set_state, self.agent.state_dict
        self.set_state(generator.get_state())
        stats = self._call("ppo_update", self.agent, self.optimizer, batch, self.ppo.PPOConfig(**vars(cfg)),
                           self.generator)
        for _ in range(cfg.epochs):
            torch.randperm(batch["advantages"].shape[0], generator=generator)
        self.updates += 1
        what = f"{self.what}, update {self.updates}: ppo_update(agent, Adam, batch of {batch['advantages'].shape[0]})"
        check(isinstance(stats, dict), f"{what} returned {describe_value(stats)}; expected a dict of statistics")
        weights, expected = self.weights(), agent.state_dict()
        check(isinstance(weights, dict) and weights.keys() == expected.keys()
              and all(isinstance(weights[k], torch.Tensor) and weights[k].shape == v.shape for k, v in expected.items()),
              f"{what}: the agent's state_dict() afterwards does not match the agent's parameters")
        broken = [k for k in expected if not torch.isfinite(weights[k]).all()]
        check(not broken, f"{what} left nan or inf in the agent's weights ({', '.join(broken[:3])}): check the losses "
                          "for a log of 0 or a division by 0")
        agent.load_state_dict(weights)
        return stats


def gridworld_agent(learner):
    """The learner's side's copy of the gridworld agent: the course's ActorCritic there (a container)."""
    envs = learner.module("envs")
    return lambda agent: envs.ActorCritic(agent.actor[0].in_features, agent.actor[-1].out_features,
                                          agent.actor[0].out_features)


def rlhf_policy(learner):
    """The learner's side's copy of the toy RLHF policy: the course's PolicyValueModel there, whose
    evaluate uses the learner's logprobs_from_logits and entropy_from_logits."""
    rlhf, gpt = learner.module("rlhf"), learner.module("common.gpt")
    return lambda policy: rlhf.PolicyValueModel(gpt.GPTConfig(**dataclasses.asdict(policy.gpt.config)))
