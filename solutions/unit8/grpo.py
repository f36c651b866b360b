"""Part C: GRPO (group relative policy optimisation), and one GRPO training step.

A batch holds N = n_prompts * group_size sampled responses, the group_size responses of one prompt
in consecutive rows (rows 0 .. G-1 answer the first prompt, G .. 2G-1 the second, ...).  Token
tensors are [N, T - 1] like token_logprobs: position t scores token t + 1; ``mask`` is
response_mask[:, 1:].  Every loss is minimised.  ratio = exp(logp - logp_old), as in Unit 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unit8.logprobs import model_logits, token_logprobs

AGGREGATIONS = ("sequence", "token")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages [N] for rewards [N] (any real or bool dtype), in float32 or wider.

        r = rewards viewed as [N / group_size, group_size]   (one row per prompt)
        A = r - mean(r over the group)
        A = A / (std(r over the group) + eps)      only if scale_rewards (std with Bessel's correction)
    scale_rewards=False is the std-free variant (Dr. GRPO).  A group whose rewards are all equal
    gets advantages of exactly 0.
    """
    # TODO: the lines above: every statistic within a group, never over the whole batch.
    ### BEGIN SOLUTION
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)
    ### END SOLUTION


def per_token_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(policy || reference) at each sampled token (>= 0, exact 0 where equal):

        k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1
    """
    # TODO: the line above.
    ### BEGIN SOLUTION
    delta = logp_ref - logp
    return torch.exp(delta) - delta - 1.0
    ### END SOLUTION


def clipped_token_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                       clip_eps: float) -> torch.Tensor:
    """The per-token clipped surrogate of Unit 6, each token with its sequence's advantage: [N, T - 1].

        ratio = exp(logp - logp_old);   A = advantages[:, None]
        loss  = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))
    """
    # TODO: the lines above (the ratio from a log-prob difference).
    ### BEGIN SOLUTION
    ratio = torch.exp(logp - logp_old)
    a = advantages.unsqueeze(-1)
    return torch.max(-a * ratio, -a * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps))
    ### END SOLUTION


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04, aggregation: str = "sequence"):
    """The GRPO loss (0-dim) and its statistics {"kl", "clipfrac"} (0-dim, detached).

        per_token = clipped_token_loss(logp, logp_old, advantages, clip_eps) + beta * per_token_kl(logp, logp_ref)
        "sequence": mean over sequences of (sum_t per_token * mask / sum_t mask)    (GRPO as published)
        "token":    sum over all tokens of per_token * mask / sum of mask             (DAPO: every token counts the same)
        kl       = per_token_kl summed over the masked tokens / their number
        clipfrac = the same mean of "clipped in the direction the advantage pushes":
                   (ratio > 1 + clip_eps and A > 0) or (ratio < 1 - clip_eps and A < 0)
    Masked-out positions may hold any finite garbage in logp, logp_old and logp_ref.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
    # TODO: the lines above; zero the masked-out tokens with torch.where before any sum.
    ### BEGIN SOLUTION
    m = mask.to(torch.bool)
    zeros = torch.zeros_like(logp)
    kl = per_token_kl(logp, logp_ref)
    per_token = torch.where(m, clipped_token_loss(logp, logp_old, advantages, clip_eps) + beta * kl, zeros)
    counts = m.sum(dim=-1).to(logp.dtype)
    if aggregation == "sequence":
        loss = (per_token.sum(dim=-1) / counts).mean()
    else:
        loss = per_token.sum() / counts.sum()
    with torch.no_grad():
        ratio = torch.exp(logp - logp_old)
        a = advantages.unsqueeze(-1)
        clipped = ((ratio > 1.0 + clip_eps) & (a > 0)) | ((ratio < 1.0 - clip_eps) & (a < 0))
        stats = {"kl": torch.where(m, kl, zeros).sum() / counts.sum(),
                 "clipfrac": (clipped & m).sum().to(logp.dtype) / counts.sum()}
    return loss, stats
    ### END SOLUTION


@dataclass
class GRPOConfig:
    group_size: int = 8
    clip_eps: float = 0.2
    beta: float = 0.04  # weight of the k3 KL penalty to the reference
    scale_rewards: bool = True  # divide the advantages by the group's std
    aggregation: str = "sequence"  # or "token"
    iterations: int = 1  # optimizer steps on each batch (GRPO's mu)
    max_grad_norm: float = 1.0


def grpo_step(policy, reference, optimizer: torch.optim.Optimizer, batch: dict, cfg: GRPOConfig) -> dict:
    """cfg.iterations optimizer steps of GRPO on one batch of sampled responses ("input_ids",
    "attention_mask", "response_mask" [N, T]; "rewards" [N], groups in consecutive rows).

        advantages = group_advantages(rewards, group_size, scale_rewards)
        under no_grad, once, before any step:
            logp_old = token_logprobs(model_logits(policy, ...), ...)     (the policy that sampled)
            logp_ref = token_logprobs(model_logits(reference, ...), ...)
        for each iteration:
            logp = token_logprobs(model_logits(policy, ...), ...)
            loss, stats = grpo_loss(logp, logp_old, logp_ref, advantages, response_mask[:, 1:], ...)
            zero_grad; backward; clip the gradient norm to max_grad_norm; step

    Returns "loss", "kl", "clipfrac" (floats, averaged over the iterations) and "steps" (int).
    """
    # TODO: the lines above.
    ### BEGIN SOLUTION
    input_ids, attention_mask, response_mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    mask = response_mask[:, 1:]
    advantages = group_advantages(batch["rewards"], cfg.group_size, cfg.scale_rewards)
    with torch.no_grad():
        logp_old = token_logprobs(model_logits(policy, input_ids, attention_mask), input_ids, response_mask)
        logp_ref = token_logprobs(model_logits(reference, input_ids, attention_mask), input_ids, response_mask)
    totals = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0}
    for _ in range(cfg.iterations):
        logp = token_logprobs(model_logits(policy, input_ids, attention_mask), input_ids, response_mask)
        loss, stats = grpo_loss(logp, logp_old, logp_ref, advantages.to(logp.dtype), mask, cfg.clip_eps, cfg.beta,
                                cfg.aggregation)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        for key, value in (("loss", loss), ("kl", stats["kl"]), ("clipfrac", stats["clipfrac"])):
            totals[key] += float(value.detach())
    steps = cfg.iterations
    return {**{key: value / max(steps, 1) for key, value in totals.items()}, "steps": steps}
    ### END SOLUTION
