"""PPO with clipping: the pieces, then the update loop that uses them.

Conventions (the handout states each one):

* Time runs along dim 0 for environment rollouts (``[T, num_envs]``) and along dim 1 for
  token sequences (``[batch, T]``).
* ``dones[t] == 1`` means step t ended its episode: ``rewards[t]`` was its last reward and
  ``values[t + 1]`` (if any) belongs to a new episode.
* Masks are 1 (or True) where a position counts and 0 where it does not; masked-out positions
  may hold any finite garbage and must not change any result.
* No function changes its arguments in place: the caller reuses them.
* Every loss here is minimised.  ``ratio = exp(logp_new - logp_old)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# --- masked statistics -----------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1: sum(x * m) / sum(m).

    dim=None averages over everything; otherwise over that dimension only.  mask=None is the
    plain mean.  mask may be bool or float and has x's shape.
    """
    # TODO: m = mask as x's dtype; sum(x * m) / sum(m), over `dim` (or over all when dim is None).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in masked_mean in exercises/unit6/ppo.py")


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to mean 0 and variance 1 over the masked positions (TRL's whiten).

    mean = masked_mean(x, mask); var = masked_mean((x - mean)^2, mask) * n / (n - 1) with
    n = sum(mask) (Bessel's correction); out = (x - mean) * rsqrt(var + eps).  With
    shift_mean=False the mean is added back: out + mean.  Masked-out positions of the output are 0.
    """
    # TODO: the formulas above, every statistic over the masked positions only.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in masked_whiten in exercises/unit6/ppo.py")


# --- advantages --------------------------------------------------------------------------------


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float,
                next_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a rollout, time along dim 0.

    rewards, values, dones: [T, ...] (dones 0/1, any dtype); next_value: [...], the value of the
    state after the last step (None: 0).  With nonterminal_t = 1 - dones[t] and V_T = next_value:
        delta_t = r_t + gamma * V_{t+1} * nonterminal_t - V_t
        A_t     = delta_t + gamma * lam * nonterminal_t * A_{t+1}      (A_T = 0)
    Returns (advantages, returns = advantages + values), both [T, ...] like rewards.
    """
    # TODO: one backward loop over t = T-1 .. 0 with the two lines above.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in compute_gae in exercises/unit6/ppo.py")


def compute_gae_masked(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                       lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE for token sequences: rewards, values, mask are [batch, T], time along dim 1.

    Each row is one episode made of its masked positions, in order; masked-out positions are
    skipped (they are not steps).  For consecutive masked positions t < t' of a row:
        delta_t = r_t + gamma * V_t' - V_t,   A_t = delta_t + gamma * lam * A_t'
    and after a row's last masked position V = A = 0 (the episode ends).  Advantages and returns
    are 0 at masked-out positions.  Returns (advantages, returns = advantages + values).
    """
    # TODO: a backward loop over t that carries (next value, next advantage) per row and updates
    # them only where mask[:, t] is 1.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in compute_gae_masked in exercises/unit6/ppo.py")


# --- quantities from logits ------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., label] for each position: logits [..., V], labels [...] (int64).

    No Python loop over positions.  bf16/fp16 logits are computed in float32 and the result is
    float32 (float64 logits give float64): the log-probs feed a ratio exp(new - old).
    """
    # TODO: log_softmax over the last dim in (at least) float32, then gather the labels.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in logprobs_from_logits in exercises/unit6/ppo.py")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) - sum(softmax(z) * z).

    Finite for logits as large as +-1e4 (where some probabilities are exactly 0), and accurate
    there (subtract the row max first).  Computed in float32 or wider; shape logits.shape[:-1].
    """
    # TODO: the formula above (it never takes log of a probability).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in entropy_from_logits in exercises/unit6/ppo.py")


# --- losses ------------------------------------------------------------------------------------


def ppo_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                    mask: torch.Tensor | None = None):
    """The clipped surrogate, to minimise, and three statistics (detached).

        logratio = logp_new - logp_old;  ratio = exp(logratio)
        loss     = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
        clipfrac = mean(|ratio - 1| > eps)      (strictly: a ratio of exactly 1 +- eps is not clipped)
        k1       = mean(-logratio);  k3 = mean((ratio - 1) - logratio)
    Every mean is masked_mean(., mask).  clip_eps=0.0 clips every ratio to 1.  Returns (loss,
    clipfrac, k1, k3), 0-dim tensors.
    """
    # TODO: the lines above; the ratio comes from a log-prob difference, never from probabilities.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in ppo_policy_loss in exercises/unit6/ppo.py")


def ppo_value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor,
                   clip_eps: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * mean((V_new - R)^2), or with clip_eps the clipped version:

        V_clip = V_old + clip(V_new - V_old, -eps, eps)
        loss   = 0.5 * mean(max((V_new - R)^2, (V_clip - R)^2))
    Means are masked_mean(., mask).  Only clip_eps=None turns clipping off (0.0 clips every change).
    """
    # TODO: the lines above.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in ppo_value_loss in exercises/unit6/ppo.py")


# --- RLHF reward shaping -------------------------------------------------------------------------


def rlhf_rewards(scores: torch.Tensor, logp_policy: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for RLHF (TRL's shaping).

    scores: [batch], one reward-model score per sequence; logp_policy, logp_ref, mask: [batch, T]
    (mask 1 on response tokens; every row has at least one).
        kl_t      = logp_policy_t - logp_ref_t           (an estimate of KL(policy || ref))
        reward_t  = -beta * kl_t,  plus scores[b] at the row's LAST masked position
    Both are 0 at masked-out positions.  Returns (rewards, kl), both [batch, T].
    """
    # TODO: the lines above; find each row's last masked position without a Python loop over rows.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in rlhf_rewards in exercises/unit6/ppo.py")


# --- the update loop ---------------------------------------------------------------------------


@dataclass
class PPOConfig:
    clip_eps: float = 0.2  # policy ratio clip
    vf_clip_eps: float | None = 0.2  # value clip around the old value (None: no clipping)
    vf_coef: float = 0.5  # weight of the value loss
    ent_coef: float = 0.0  # weight of the entropy bonus
    epochs: int = 4  # passes over the batch
    minibatch_size: int = 64
    max_grad_norm: float = 0.5  # clip the global gradient norm to this
    target_kl: float | None = None  # stop the update once a minibatch's k3 exceeds this


def ppo_update(agent, optimizer: torch.optim.Optimizer, batch: dict, cfg: PPOConfig,
               generator: torch.Generator) -> dict:
    """Several epochs of minibatch PPO steps on one batch of experience.

    batch: "obs", "actions", "logp_old", "values_old", "advantages", "returns", and optionally
    "mask"; every entry has the number of samples N as its first dim.  ``agent.evaluate(obs,
    actions)`` returns (logp, entropy, values) shaped like batch["logp_old"].

    For each epoch: perm = torch.randperm(N, generator=generator); minibatches are the
    consecutive slices perm[i : i + minibatch_size].  For each minibatch:
        loss = pg_loss - ent_coef * masked_mean(entropy) + vf_coef * v_loss
    then zero_grad, backward, clip the gradient norm to max_grad_norm, optimizer.step().  If
    target_kl is set and this minibatch's k3 > target_kl, stop the whole update (after its step).

    Returns floats averaged over the steps taken: "policy_loss", "value_loss", "entropy",
    "approx_kl" (k3), "clipfrac" (0.0 each when no step is taken); and "steps", the number of
    optimizer steps.  The batch is left as it was.
    """
    # TODO: the loop above.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in ppo_update in exercises/unit6/ppo.py")
