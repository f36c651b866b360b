"""Part A: a preallocated KV-cache, and attention and a forward pass that use it.

Generating token t+1 with the plain model re-runs attention over all t tokens, although the keys
and values of tokens 0..t-1 have not changed since the last step.  A KV-cache keeps them: the
prefill pass writes the prompt's keys and values, and every decode step computes q, k, v for ONE
new token, writes its k and v at the next free slot, and attends over the filled prefix.

The cache is allocated once, at its full size (``max_len`` slots): no ``torch.cat`` per step, no
reallocation, and the same memory every step (what CUDA graphs and ``torch.compile`` need).

Part C (at the end) takes the last step: a decode step whose shapes and Python values never change
from one token to the next, so that one compiled graph, or one captured CUDA graph, serves them all.

Everything runs on the course model (``common.gpt.GPT``): read its ``Attention.forward`` and
``GPT.forward`` first; the cached versions below are the same computation, done in pieces.
"""

from __future__ import annotations

import math

import torch

from common.gpt import GPT, Attention


class KVCache:
    """Keys and values of every layer.  ``k[layer]`` and ``v[layer]`` are
    ``[batch, n_head, max_len, head_dim]``; slots ``0 .. length-1`` are filled, the rest are not."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.n_layer, self.batch, self.n_head, self.max_len, self.head_dim = n_layer, batch, n_head, max_len, head_dim
        # TODO: preallocate self.k and self.v, zeros of shape [n_layer, batch, n_head, max_len, head_dim]
        # (this dtype and device), and set self.length = 0 (no slot filled yet).
        ### BEGIN SOLUTION
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        ### END SOLUTION

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_len: int) -> "KVCache":
        """A cache sized for ``model``, in the dtype and on the device of its weights."""
        c = model.config
        weight = model.transformer.wte.weight
        return cls(c.n_layer, batch, c.n_head, max_len, c.head_dim, weight.dtype, weight.device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (``[batch, n_head, t, head_dim]``, the new tokens) into ``layer`` at slots
        ``length .. length+t-1`` and return that layer's keys and values over the filled prefix
        INCLUDING them: two views ``[batch, n_head, length+t, head_dim]``.  Does not move ``length``
        (every layer writes at the same slots; ``advance`` moves it once all layers have).
        Raises ValueError if the new tokens do not fit in ``max_len``."""
        # TODO: end = length + t; raise ValueError past max_len; k[layer, :, :, length:end] = k (and v);
        # return the views k[layer, :, :, :end], v[layer, :, :, :end] (slices: no copy).
        ### BEGIN SOLUTION
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {end} do not fit")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        ### END SOLUTION

    def advance(self, t: int) -> None:
        """Mark ``t`` more slots as filled (called once per forward pass, after the last layer)."""
        # TODO: length += t
        ### BEGIN SOLUTION
        self.length += t
        ### END SOLUTION

    def reset(self) -> None:
        """Forget everything: the next append writes at slot 0 again.  Keeps the storage."""
        # TODO: length = 0 (no need to zero the storage: unfilled slots are never read)
        ### BEGIN SOLUTION
        self.length = 0
        ### END SOLUTION

    def nbytes(self) -> int:
        """Bytes of the preallocated storage: keys and values, all layers and slots."""
        # TODO: 2 * n_layer * batch * n_head * max_len * head_dim * bytes per element
        ### BEGIN SOLUTION
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        ### END SOLUTION


def causal_mask(start: int, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[t, start+t]``: query i (at absolute position start+i) may look at key j (at
    position j) when ``j <= start + i``.  With start = 0 it is the usual lower-triangular mask."""
    # TODO: key positions arange(start+t) against query positions start + arange(t), as [t, start+t]
    ### BEGIN SOLUTION
    queries = start + torch.arange(t, device=device)
    keys = torch.arange(start + t, device=device)
    return keys[None, :] <= queries[:, None]
    ### END SOLUTION


def cached_attention(attn: Attention, x: torch.Tensor, cache: KVCache, layer: int,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``attn``'s self-attention for the NEW tokens ``x`` ([batch, t, n_embd]) over the cached prefix
    and themselves; returns [batch, t, n_embd].  ``key_mask``: optional boolean [batch, >= length+t],
    True where a key is a real token, False where it is padding (only its first length+t columns
    are used).  The output for query i equals row start+i of the uncached attention."""
    # TODO: q, k, v from attn.c_attn(x) split in three and attn.split_heads;
    # start = cache.length; keys, values = cache.append(layer, k, v);
    # scores = q @ keys^T / sqrt(head_dim)  -> [b, heads, t, start+t];
    # allowed = causal_mask(start, t) (and key_mask[:, None, None, :start+t]);
    # masked_fill(~allowed, finfo(dtype).min); softmax over keys; @ values; merge heads; attn.c_proj.
    ### BEGIN SOLUTION
    b, t, c = x.shape
    q, k, v = (attn.split_heads(z) for z in attn.c_attn(x).split(c, dim=2))
    start = cache.length
    keys, values = cache.append(layer, k, v)
    scores = q @ keys.transpose(-2, -1) / math.sqrt(attn.head_dim)
    allowed = causal_mask(start, t, x.device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, : start + t]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    y = scores.softmax(dim=-1) @ values
    return attn.c_proj(y.transpose(1, 2).reshape(b, t, c))
    ### END SOLUTION


def forward_with_cache(model: GPT, idx: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
                       key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, t, vocab] for the new tokens ``idx`` ([batch, t]) given the ``cache.length``
    tokens already in ``cache``; writes their keys and values and advances the cache by t.
    ``positions`` ([batch or 1, t]) default to cache.length + 0..t-1 (a padded batch passes its own);
    ``key_mask`` as in cached_attention."""
    # TODO: positions default start + arange(t); x = wte(idx) + wpe(positions); for each block i:
    # x = x + cached_attention(block.attn, block.ln_1(x), cache, i, key_mask); x = x + block.mlp(block.ln_2(x));
    # then cache.advance(t); return lm_head(ln_f(x)).
    ### BEGIN SOLUTION
    t = idx.shape[1]
    if positions is None:
        positions = (cache.length + torch.arange(t, device=idx.device)).unsqueeze(0)
    x = model.transformer.wte(idx) + model.transformer.wpe(positions)
    for i, block in enumerate(model.transformer.h):
        x = x + cached_attention(block.attn, block.ln_1(x), cache, i, key_mask)
        x = x + block.mlp(block.ln_2(x))
    cache.advance(t)
    return model.lm_head(model.transformer.ln_f(x))
    ### END SOLUTION


# --- Part C: a decode step with static shapes -------------------------------------------------------


def static_attention(attn: Attention, x: torch.Tensor, cache: KVCache, layer: int, slot: torch.Tensor) -> torch.Tensor:
    """``attn``'s self-attention for ONE new token per row, ``x`` [batch, 1, n_embd], written at cache
    slot ``slot`` (int64 tensor [1], on x's device).  Returns [batch, 1, n_embd].  Every shape is the
    same at every slot: k and v go in with ``index_copy_``, and the query attends over ALL max_len
    slots, with the slots after ``slot`` masked out.  No Python number here may depend on ``slot``."""
    # TODO: q, k, v as in cached_attention; cache.k[layer].index_copy_(2, slot, k) (and v);
    # scores = q @ cache.k[layer]^T / sqrt(head_dim) -> [b, heads, 1, max_len];
    # allowed = arange(max_len) <= slot; masked_fill(~allowed, finfo(dtype).min); softmax; @ cache.v[layer].
    ### BEGIN SOLUTION
    b, t, c = x.shape
    q, k, v = (attn.split_heads(z) for z in attn.c_attn(x).split(c, dim=2))
    keys, values = cache.k[layer], cache.v[layer]
    keys.index_copy_(2, slot, k)
    values.index_copy_(2, slot, v)
    scores = q @ keys.transpose(-2, -1) / math.sqrt(attn.head_dim)
    allowed = torch.arange(cache.max_len, device=x.device) <= slot
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    y = scores.softmax(dim=-1) @ values
    return attn.c_proj(y.transpose(1, 2).reshape(b, t, c))
    ### END SOLUTION


def decode_step(model: GPT, token: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
    """Logits [batch, 1, vocab] for one new token per row, ``token`` [batch, 1] int64, at position and
    cache slot ``slot`` (int64 tensor [1] on the model's device: the number of tokens before it).
    Writes its keys and values at that slot in every layer.  Unlike forward_with_cache it neither reads
    nor moves ``cache.length`` and never turns ``slot`` into a Python number (no ``.item()``, ``int()``,
    ``if`` on it): a captured CUDA graph replays tensor work only, and torch.compile would recompile
    for every new Python value."""
    # TODO: x = wte(token) + wpe(slot as [1, 1]); each block: x = x + static_attention(block.attn,
    # block.ln_1(x), cache, i, slot); x = x + block.mlp(block.ln_2(x)); return lm_head(ln_f(x)).
    ### BEGIN SOLUTION
    x = model.transformer.wte(token) + model.transformer.wpe(slot.view(1, 1))
    for i, block in enumerate(model.transformer.h):
        x = x + static_attention(block.attn, block.ln_1(x), cache, i, slot)
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))
    ### END SOLUTION
