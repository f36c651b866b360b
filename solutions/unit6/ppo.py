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
    ### BEGIN SOLUTION
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    m = mask.to(x.dtype)
    x = torch.where(m > 0, x, torch.zeros_like(x))  # garbage in masked positions never reaches the sum
    if dim is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim) / m.sum(dim)
    ### END SOLUTION


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to mean 0 and variance 1 over the masked positions (TRL's whiten).

    mean = masked_mean(x, mask); var = masked_mean((x - mean)^2, mask) * n / (n - 1) with
    n = sum(mask) (Bessel's correction); out = (x - mean) * rsqrt(var + eps).  With
    shift_mean=False the mean is added back: out + mean.  Masked-out positions of the output are 0.
    """
    # TODO: the formulas above, every statistic over the masked positions only.
    ### BEGIN SOLUTION
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    n = m.sum()
    var = masked_mean((x - mean) ** 2, m) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m > 0, out, torch.zeros_like(out))
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    T = rewards.shape[0]
    if next_value is None:
        next_value = torch.zeros_like(values[0])
    advantages = torch.zeros_like(rewards)
    last_adv = torch.zeros_like(values[0])
    for t in reversed(range(T)):
        nonterminal = 1.0 - dones[t].to(rewards.dtype)
        v_next = next_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * v_next * nonterminal - values[t]
        last_adv = delta + gamma * lam * nonterminal * last_adv
        advantages[t] = last_adv
    return advantages, advantages + values
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    m = mask.to(torch.bool)
    zeros = torch.zeros_like(values)
    values = torch.where(m, values, zeros)
    rewards = torch.where(m, rewards, zeros)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        here = m[:, t]
        advantages[:, t] = torch.where(here, adv, zeros[:, t])
        next_value = torch.where(here, values[:, t], next_value)
        next_adv = torch.where(here, adv, next_adv)
    return advantages, torch.where(m, advantages + values, zeros)
    ### END SOLUTION


# --- quantities from logits ------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., label] for each position: logits [..., V], labels [...] (int64).

    No Python loop over positions.  bf16/fp16 logits are computed in float32 and the result is
    float32 (float64 logits give float64): the log-probs feed a ratio exp(new - old).
    """
    # TODO: log_softmax over the last dim in (at least) float32, then gather the labels.
    ### BEGIN SOLUTION
    compute = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(compute), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ### END SOLUTION


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) - sum(softmax(z) * z).

    Finite for logits as large as +-1e4 (where some probabilities are exactly 0), and accurate
    there (subtract the row max first).  Computed in float32 or wider; shape logits.shape[:-1].
    """
    # TODO: the formula above (it never takes log of a probability).
    ### BEGIN SOLUTION
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z = z - z.amax(dim=-1, keepdim=True)  # H is shift-invariant; shifting keeps the two terms small
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    logratio = logp_new - logp_old
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_eps).to(ratio.dtype), mask)
        k1 = masked_mean(-logratio, mask)
        k3 = masked_mean((ratio - 1.0) - logratio, mask)
    return loss, clipfrac, k1, k3
    ### END SOLUTION


def ppo_value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor,
                   clip_eps: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * mean((V_new - R)^2), or with clip_eps the clipped version:

        V_clip = V_old + clip(V_new - V_old, -eps, eps)
        loss   = 0.5 * mean(max((V_new - R)^2, (V_clip - R)^2))
    Means are masked_mean(., mask).  Only clip_eps=None turns clipping off (0.0 clips every change).
    """
    # TODO: the lines above.
    ### BEGIN SOLUTION
    loss = (values_new - returns) ** 2
    if clip_eps is not None:
        v_clip = values_old + torch.clamp(values_new - values_old, -clip_eps, clip_eps)
        loss = torch.max(loss, (v_clip - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    m = mask.to(torch.bool)
    zeros = torch.zeros_like(logp_policy)
    kl = torch.where(m, logp_policy - logp_ref, zeros)
    rewards = -beta * kl
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values
    rewards[torch.arange(m.shape[0], device=m.device), last] += scores.to(rewards.dtype)
    return rewards, kl
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    n = batch["advantages"].shape[0]
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
    steps = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.minibatch_size):
            idx = perm[start : start + cfg.minibatch_size]
            mb = {key: value[idx] for key, value in batch.items()}
            mask = mb.get("mask")
            logp, entropy, values = agent.evaluate(mb["obs"], mb["actions"])
            pg_loss, clipfrac, _, k3 = ppo_policy_loss(logp, mb["logp_old"], mb["advantages"], cfg.clip_eps, mask)
            v_loss = ppo_value_loss(values, mb["values_old"], mb["returns"], cfg.vf_clip_eps, mask)
            ent = masked_mean(entropy, mask)
            loss = pg_loss - cfg.ent_coef * ent + cfg.vf_coef * v_loss

            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()

            steps += 1
            for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", ent),
                               ("approx_kl", k3), ("clipfrac", clipfrac)):
                stats[key] += float(value.detach())
            if cfg.target_kl is not None and float(k3) > cfg.target_kl:
                return {**{k: v / steps for k, v in stats.items()}, "steps": steps}
    return {**{k: v / max(steps, 1) for k, v in stats.items()}, "steps": steps}
    ### END SOLUTION
