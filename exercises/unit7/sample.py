"""Part D: decoding your model: temperature, top-k and nucleus (top-p) filtering, and a generate()
loop that uses a cache (the course's ``cache.ConcatCache`` in the tests, your Unit 4 ``KVCache`` in
``course capstone``).  Hugging Face's logits warpers (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, applied in that order) are the grader's oracle.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits [b, V] -> a new tensor: logits / temperature, then every logit outside the top-k set to
    -inf, then every logit outside the nucleus set to -inf.  The input is not changed.

    top-k: remove every logit smaller than the k-th largest (ties with it stay); k > V keeps all.
    top-p: with the probabilities (softmax of what is left) sorted from the most likely down and c_i
    the total of the first i of them (c_0 = 0), keep token i while c_i < top_p: the smallest set of most
    likely tokens whose total reaches top_p (the most likely token always stays; top_p = 1 keeps all).
    """
    # TODO: z = logits / temperature; top-k with topk(...).values[:, -1:] (min(k, V));
    # top-p: sort descending, p = softmax, before = cumsum(p) - p; remove where before >= top_p
    # (scatter the sorted decision back to the vocabulary order); masked_fill(-inf).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in filter_logits in exercises/unit7/sample.py")


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, cache=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` ([b, t] int64, t >= 1, no padding) by ``max_new_tokens`` tokens; returns
    [b, t + max_new_tokens].  Each step takes the last position's logits: temperature 0 is greedy
    (argmax); otherwise probs = softmax(filter_logits(logits, temperature, top_k, top_p)) and one
    ``torch.multinomial(probs, 1, generator=generator)`` draw per step (one token per row).
    ``cache`` (empty, with Unit 4's interface): one forward pass over the prompt through it, then one
    pass per new token, of that token alone, except the last (it is never fed back).  Without a
    cache every step runs the model on the whole sequence so far.  ValueError if t + max_new_tokens
    exceeds model.config.max_seq_len."""
    # TODO: check the length; logits = model(prompt_ids, cache=cache) (or model(prompt_ids));
    # loop: pick the next token from logits[:, -1]; append; unless it was the last, run the model on
    # the new token (cached) or on everything (uncached).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in generate in exercises/unit7/sample.py")
