"""Course code (read it, do not edit it): a toy RLHF task run with your functions from ppo.py.

The policy is the course GPT (common/gpt.py) with a value head; the reference is a frozen copy
of the policy as it starts.  A prompt is a few random tokens; the policy samples a response of
``response_len`` tokens; the programmatic "reward model" scores a response by the fraction of
its tokens equal to ``TARGET``.  Rewards are shaped per token with -beta * KL(policy || ref)
plus the score on the last response token (your ``rlhf_rewards``); advantages come from your
``compute_gae_masked``, whitened over the response tokens with your ``masked_whiten``.

Positions: a sequence ``seq`` [B, L] = prompt + response.  The model reads ``seq[:, :-1]`` and
position t predicts token ``seq[:, t + 1]``: the "action" at t.  ``mask`` [B, L - 1] is 1 where
that action is a response token.

Your functions come in through the ``ppo`` arguments: by default your ppo.py, imported when first
needed (this file imports none of your code).  The grader passes its own view of your ppo.py
instead and runs this loop on its side; the score and the KL it checks are measured by this file
(``rollout_stats``: with torch.distributions, not with your functions).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.distributions import Categorical

from common.gpt import GPT, GPTConfig
from unit6.envs import learner_ppo, one_thread

if TYPE_CHECKING:
    from unit6.ppo import PPOConfig

TARGET = 3


def toy_config(vocab_size: int = 16) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2)


class PolicyValueModel(nn.Module):
    """The GPT plus a linear value head on its final hidden states.  ``evaluate`` (what ppo_update
    calls) uses ``ppo``'s logprobs_from_logits and entropy_from_logits (None: your ppo.py)."""

    def __init__(self, config: GPTConfig, ppo=None):
        super().__init__()
        self.ppo = ppo
        self.gpt = GPT(config)
        self.value_head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor):
        """idx [B, T] -> (logits [B, T, V], values [B, T])."""
        tr = self.gpt.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device).unsqueeze(0))
        for block in tr.h:
            x = block(x)
        x = tr.ln_f(x)
        return self.gpt.lm_head(x), self.value_head(x).squeeze(-1)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor):
        """obs = seq[:, :-1], actions = seq[:, 1:] -> (logp, entropy, values), each [B, L - 1]."""
        ppo = learner_ppo() if self.ppo is None else self.ppo
        logits, values = self(obs)
        return ppo.logprobs_from_logits(logits, actions), ppo.entropy_from_logits(logits), values


def score(responses: torch.Tensor) -> torch.Tensor:
    """The programmatic reward model: fraction of response tokens equal to TARGET, [B]."""
    return (responses == TARGET).float().mean(dim=1)


@torch.no_grad()
def generate(model: PolicyValueModel, prompts: torch.Tensor, n_new: int, generator: torch.Generator) -> torch.Tensor:
    """Sample n_new tokens after each prompt (temperature 1); returns prompt + response [B, P + n_new]."""
    seq = prompts
    for _ in range(n_new):
        logits, _ = model(seq)
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return seq


def logprobs_per_token_loop(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The slow way to gather log-probs (one position at a time): a baseline for timings only."""
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            out[b, t] = torch.log_softmax(logits[b, t].float(), dim=-1)[labels[b, t]]
    return out


@torch.no_grad()
def rollout_stats(logits: torch.Tensor, ref_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor,
                  scores: torch.Tensor) -> dict:
    """What the loop reports about a rollout, measured with torch.distributions (not with your
    functions): the mean score, KL(policy || ref) summed over a response (the log-ratio of the
    sampled tokens, as rlhf_rewards shapes it) and the policy's mean entropy on response tokens."""
    policy, ref = Categorical(logits=logits.float()), Categorical(logits=ref_logits.float())
    kl = (policy.log_prob(actions) - ref.log_prob(actions)) * mask
    return {"score": float(scores.mean()), "kl": float(kl.sum(dim=1).mean()),
            "entropy_before": float((policy.entropy() * mask).sum() / mask.sum())}


@torch.no_grad()
def make_batch(policy: PolicyValueModel, ref: PolicyValueModel, generator: torch.Generator, batch_size: int,
               prompt_len: int, response_len: int, beta: float, gamma: float, lam: float,
               ppo=None) -> tuple[dict, dict]:
    """One rollout: sample, score, shape the rewards, compute advantages.  Returns (batch, stats)."""
    ppo = learner_ppo() if ppo is None else ppo
    vocab = policy.gpt.config.vocab_size
    prompts = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator)
    seq = generate(policy, prompts, response_len, generator)
    obs, actions = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros_like(actions, dtype=torch.float32)
    mask[:, prompt_len - 1 :] = 1.0  # actions at t >= prompt_len - 1 are response tokens
    logits, values = policy(obs)
    ref_logits, _ = ref(obs)
    logp = ppo.logprobs_from_logits(logits, actions)
    ref_logp = ppo.logprobs_from_logits(ref_logits, actions)
    scores = score(seq[:, prompt_len:])
    rewards, _ = ppo.rlhf_rewards(scores, logp, ref_logp, mask, beta)
    advantages, returns = ppo.compute_gae_masked(rewards, values, mask, gamma, lam)
    batch = {"obs": obs, "actions": actions, "mask": mask, "logp_old": logp, "values_old": values,
             "advantages": ppo.masked_whiten(advantages, mask), "returns": returns}
    return batch, rollout_stats(logits, ref_logits, actions, mask, scores)


def train_toy_rlhf(seed: int = 0, updates: int = 20, batch_size: int = 64, prompt_len: int = 4,
                   response_len: int = 8, beta: float = 0.05, gamma: float = 1.0, lam: float = 0.95,
                   lr: float = 3e-3, cfg: PPOConfig | None = None, ppo=None) -> list[dict]:
    """PPO on the toy task.  One entry per update: ppo_update's stats, then what ``rollout_stats``
    measured on that update's rollout (before its PPO step: mean score, mean KL(policy || ref)
    summed over a response, entropy; a statistic of ppo_update's with the same name does not
    replace them), and the seconds the update took (rollout included).

    ``ppo``: where the PPO functions and PPOConfig come from (None: your ppo.py).
    """
    ppo = learner_ppo() if ppo is None else ppo
    cfg = cfg or ppo.PPOConfig(epochs=4, minibatch_size=32, vf_clip_eps=0.2, max_grad_norm=1.0)
    with one_thread():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        policy = PolicyValueModel(toy_config(), ppo)
        ref = PolicyValueModel(toy_config(), ppo)  # the reference: a frozen copy of the policy as it starts
        ref.load_state_dict(policy.state_dict())
        ref.eval().requires_grad_(False)
        optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
        history = []
        for _ in range(updates):
            start = time.perf_counter()
            batch, stats = make_batch(policy, ref, generator, batch_size, prompt_len, response_len, beta, gamma, lam,
                                      ppo)
            rollout_s = time.perf_counter() - start
            update_stats = ppo.ppo_update(policy, optimizer, batch, cfg, generator)
            history.append({**update_stats, **stats, "rollout_seconds": rollout_s,
                            "seconds": time.perf_counter() - start})
        return history
