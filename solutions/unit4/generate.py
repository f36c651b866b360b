"""Part B: decoding loops on top of the cache: one prompt batch, and prompts of different lengths.

``generate`` runs a prefill pass over the whole prompt, then one token per step.  With
``use_cache=False`` every step re-runs the full model over everything so far (the baseline the
cache must match token for token, and beat on speed).
"""

from __future__ import annotations

import torch

from common.gpt import GPT

from .kvcache import KVCache, forward_with_cache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One next token per row from ``logits`` [batch, vocab]; returns int64 [batch].
    temperature == 0: greedy (argmax).  Otherwise: divide by temperature, keep the top_k largest
    logits of each row (all when top_k is None), softmax, and draw ONE sample per row with
    ``torch.multinomial(probs, 1, generator=generator)``."""
    # TODO: greedy: argmax over the vocabulary; else logits / temperature; with top_k, set every logit
    # below the row's k-th largest to -inf; probs = softmax; torch.multinomial(probs, 1, generator=...).
    ### BEGIN SOLUTION
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    ### END SOLUTION


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _check_fits(model: GPT, length: int) -> None:
    if length > model.config.n_positions:
        raise ValueError(f"{length} positions requested; the model has {model.config.n_positions}")


@torch.no_grad()
def generate(model: GPT, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, use_cache: bool = True, seed: int | None = None,
             cache: KVCache | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` ([batch, t] int64, no padding) by ``max_new_tokens`` tokens; returns
    [batch, t + max_new_tokens] (the prompt, then the new tokens).  Sampling draws from a generator
    seeded with ``seed``, one ``sample_next`` call per step.  use_cache=True: one prefill pass with
    forward_with_cache over the prompt, then one token per step.  A ``cache`` passed in is reused
    (reset first); otherwise a new one of max_len t + max_new_tokens is made.  use_cache=False:
    each step runs ``model`` on the whole sequence so far."""
    _check_fits(model, prompt_ids.shape[1] + max_new_tokens)
    generator = _generator(seed, prompt_ids.device)
    # TODO: prefill (forward_with_cache over the prompt, or model(prompt)); then max_new_tokens times:
    # sample from the last position's logits, append, and run the model on just the new token
    # (cached) or on everything so far (uncached).  Reset a cache that was passed in.
    ### BEGIN SOLUTION
    batch, t = prompt_ids.shape
    if use_cache:
        if cache is None:
            cache = KVCache.for_model(model, batch, t + max_new_tokens)
        cache.reset()
        logits = forward_with_cache(model, prompt_ids, cache)
    else:
        logits = model(prompt_ids)
    tokens = [prompt_ids]
    for step in range(max_new_tokens):
        next_token = sample_next(logits[:, -1], temperature, top_k, generator)[:, None]
        tokens.append(next_token)
        if step == max_new_tokens - 1:
            break  # no forward pass for a token nobody will read
        if use_cache:
            logits = forward_with_cache(model, next_token, cache)
        else:
            logits = model(torch.cat(tokens, dim=1))
    return torch.cat(tokens, dim=1)
    ### END SOLUTION


def left_pad(prompts: list[list[int]], pad_id: int = 0, device: torch.device | str = "cpu"):
    """Prompts of different lengths as one batch, padded on the LEFT so that every row's last real
    token is in the last column (all rows then decode at the same slot).  Returns (ids, mask):
    int64 [batch, T] and bool [batch, T] (True at real tokens), T the longest prompt's length."""
    # TODO: T = max length; row i = [pad_id] * (T - len_i) + prompt_i; mask False on the padding.
    ### BEGIN SOLUTION
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
            mask[row, longest - len(prompt):] = True
    return ids, mask
    ### END SOLUTION


@torch.no_grad()
def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, seed: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """Continue prompts of different lengths (each non-empty) in one batch, with the cache; returns
    one list per prompt: its tokens, then its max_new_tokens new ones.  Greedy, each row gets
    exactly the tokens it would get alone: padding is never attended, and every row's positions
    count its real tokens from 0 (the padding takes no position)."""
    device = model.transformer.wte.weight.device
    _check_fits(model, max(len(p) for p in prompts) + max_new_tokens)
    generator = _generator(seed, torch.device(device))
    # TODO: ids, mask = left_pad(...); a key mask over all T + max_new_tokens slots (True after the
    # prompt); positions = cumsum(mask) - 1 (clamped at 0 on the padding); prefill with both;
    # then per step: sample, and forward the new tokens at position (number of real tokens so far).
    ### BEGIN SOLUTION
    ids, mask = left_pad(prompts, pad_id, device)
    batch, longest = ids.shape
    cache = KVCache.for_model(model, batch, longest + max_new_tokens)
    key_mask = torch.ones(batch, longest + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, :longest] = mask
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    logits = forward_with_cache(model, ids, cache, positions=positions, key_mask=key_mask)
    next_position = mask.sum(dim=-1, keepdim=True)  # [batch, 1]: each row's count of real tokens
    new_tokens = []
    for step in range(max_new_tokens):
        next_token = sample_next(logits[:, -1], temperature, top_k, generator)[:, None]
        new_tokens.append(next_token)
        if step == max_new_tokens - 1:
            break
        logits = forward_with_cache(model, next_token, cache, positions=next_position, key_mask=key_mask)
        next_position = next_position + 1
    new = torch.cat(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    return [list(prompt) + row for prompt, row in zip(prompts, new)]
    ### END SOLUTION
