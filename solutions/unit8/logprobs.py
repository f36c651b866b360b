"""Part A: log-probabilities of responses under a causal language model.

A batch is a tensor of token ids ``input_ids`` [B, T] (prompt then response, padded on either
side), ``attention_mask`` [B, T] (1 on real tokens, 0 on padding) and ``response_mask`` [B, T]
(1 on the response tokens: the tokens whose log-probability is scored).  Position t of the logits
predicts token t + 1, so token t is scored by ``logits[:, t - 1]`` and the first token is never
scored.  Everything the DPO and GRPO losses need comes from here.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) for t = 0 .. T - 2: [B, T - 1].

    0 wherever the scored token input_ids[:, t + 1] is not a response token (response_mask[:, t + 1]
    is 0), whatever the logits hold there.  Computed in float32 for bf16/fp16 logits (float64 stays
    float64), with no Python loop over positions or rows.
    """
    # TODO: log_softmax of logits[:, :-1] in at least float32, gather the next tokens input_ids[:, 1:],
    # then 0 where response_mask[:, 1:] is 0 (torch.where, so nothing from those positions leaks in).
    ### BEGIN SOLUTION
    compute = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits[:, :-1].to(compute), dim=-1)
    logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = response_mask[:, 1:].to(torch.bool)
    return torch.where(scored, logp, torch.zeros_like(logp))
    ### END SOLUTION


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """The log-probability of each row's response: the sum of its token log-probs, [B].

    average=True divides each row's sum by its number of scored response tokens (the
    length-normalised log-prob of IPO and SimPO).  Every row has at least one scored token.
    """
    # TODO: sum token_logprobs over positions; with average, divide by response_mask[:, 1:]'s row sums.
    ### BEGIN SOLUTION
    total = token_logprobs(logits, input_ids, response_mask).sum(dim=-1)
    if average:
        total = total / response_mask[:, 1:].to(total.dtype).sum(dim=-1)
    return total
    ### END SOLUTION


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The course GPT's logits [B, T, V] for a batch padded on the left, the right or both.

    Each row must get exactly the logits it would get alone, without its padding: its first real
    token sits at position 0 (positions = cumsum(attention_mask) - 1, clamped at 0), and no query
    looks at a padding key (attn_mask = causal AND attention_mask of the key, shape [B, 1, T, T]).
    Logits at padding positions may hold anything finite.
    """
    # TODO: positions and a boolean attn_mask as above; return model(input_ids, positions=..., attn_mask=...).
    ### BEGIN SOLUTION
    real = attention_mask.to(torch.bool)
    positions = (real.long().cumsum(dim=-1) - 1).clamp(min=0)
    t = input_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    attn_mask = causal & real[:, None, None, :]
    return model(input_ids, positions=positions, attn_mask=attn_mask)
    ### END SOLUTION


def reference_logprobs(reference, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                       average: bool = False) -> torch.Tensor:
    """sequence_logprobs of the frozen reference model, [B], computed without keeping a graph.

    The reference is never trained: its forward pass runs under torch.no_grad(), so none of its
    activations are kept for a backward pass that will never come (they would double the memory
    of a DPO step), and no gradient can reach its weights.
    """
    # TODO: model_logits, then sequence_logprobs, all under torch.no_grad().
    ### BEGIN SOLUTION
    with torch.no_grad():
        logits = model_logits(reference, input_ids, attention_mask)
        return sequence_logprobs(logits, input_ids, response_mask, average)
    ### END SOLUTION
