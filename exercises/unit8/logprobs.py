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
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in token_logprobs in exercises/unit8/logprobs.py")


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """The log-probability of each row's response: the sum of its token log-probs, [B].

    average=True divides each row's sum by its number of scored response tokens (the
    length-normalised log-prob of IPO and SimPO).  Every row has at least one scored token.
    """
    # TODO: sum token_logprobs over positions; with average, divide by response_mask[:, 1:]'s row sums.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in sequence_logprobs in exercises/unit8/logprobs.py")


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The course GPT's logits [B, T, V] for a batch padded on the left, the right or both.

    Each row must get exactly the logits it would get alone, without its padding: its first real
    token sits at position 0 (positions = cumsum(attention_mask) - 1, clamped at 0), and no query
    looks at a padding key (attn_mask = causal AND attention_mask of the key, shape [B, 1, T, T]).
    Logits at padding positions may hold anything finite.
    """
    # TODO: positions and a boolean attn_mask as above; return model(input_ids, positions=..., attn_mask=...).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in model_logits in exercises/unit8/logprobs.py")


def reference_logprobs(reference, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                       average: bool = False) -> torch.Tensor:
    """sequence_logprobs of the frozen reference model, [B], computed without keeping a graph.

    The reference is never trained: its forward pass runs under torch.no_grad(), so none of its
    activations are kept for a backward pass that will never come (they would double the memory
    of a DPO step), and no gradient can reach its weights.
    """
    # TODO: model_logits, then sequence_logprobs, all under torch.no_grad().
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in reference_logprobs in exercises/unit8/logprobs.py")
