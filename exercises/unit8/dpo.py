"""Part B: the DPO loss family, and one DPO training step.

Every loss here is minimised; every log-prob is a sequence log-prob from logprobs.py.  A batch of
preference pairs holds 2B rows: rows 0 .. B-1 are the chosen responses, rows B .. 2B-1 the rejected
ones, row i and row B + i sharing a prompt (TRL's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unit8.logprobs import model_logits, reference_logprobs, sequence_logprobs

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, gamma: float = 0.5):
    """Per-pair losses [B] and the implicit rewards of the chosen and rejected responses [B] (detached).

    sigmoid (DPO; with label_smoothing eps > 0, conservative DPO):
        chosen = policy_chosen - ref_chosen;  rejected = policy_rejected - ref_rejected
        z = beta * (chosen - rejected)
        loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
    ipo (the log-probs are length-averaged by the caller):
        loss = (chosen - rejected - 1 / (2 * beta)) ** 2
    simpo (no reference: chosen = policy_chosen, rejected = policy_rejected, length-averaged):
        z = beta * (chosen - rejected) - gamma;   loss as for sigmoid
    Rewards: beta * chosen and beta * rejected, detached.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    # TODO: the lines above; logsigmoid (never log(sigmoid(z)), which is log(0) = -inf for z below ~-100).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in dpo_loss in exercises/unit8/dpo.py")


def preference_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """What DPO trainers log, as Python floats: "accuracy" (the share of pairs whose chosen reward is
    strictly above the rejected one: a tie is not a win), "margin" (mean of chosen - rejected),
    "chosen" and "rejected" (the mean rewards)."""
    # TODO: the four means above.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in preference_stats in exercises/unit8/dpo.py")


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # "sigmoid", "ipo" or "simpo"
    label_smoothing: float = 0.0  # conservative DPO (sigmoid and simpo)
    gamma: float = 0.5  # SimPO's target margin
    max_grad_norm: float = 1.0


def dpo_step(policy, reference, optimizer: torch.optim.Optimizer, batch: dict, cfg: DPOConfig) -> dict:
    """One optimizer step of DPO on a batch of 2B rows ("input_ids", "attention_mask",
    "response_mask", chosen rows first).

        policy log-probs    = sequence_logprobs(model_logits(policy, ...), ..., average)   (with a graph)
        reference log-probs = reference_logprobs(reference, ..., average)                  (no graph)
        average = loss_type is "ipo" or "simpo"
        loss = mean over the B pairs of dpo_loss(...)
        zero_grad; backward; clip the policy's gradient norm to max_grad_norm; step

    Returns {"loss": the loss, and preference_stats of the step's rewards}, floats.
    """
    # TODO: the lines above.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in dpo_step in exercises/unit8/dpo.py")
