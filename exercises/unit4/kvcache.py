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
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in KVCache.__init__ in exercises/unit4/kvcache.py")

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
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in KVCache.append in exercises/unit4/kvcache.py")

    def advance(self, t: int) -> None:
        """Mark ``t`` more slots as filled (called once per forward pass, after the last layer)."""
        # TODO: length += t
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in KVCache.advance in exercises/unit4/kvcache.py")

    def reset(self) -> None:
        """Forget everything: the next append writes at slot 0 again.  Keeps the storage."""
        # TODO: length = 0 (no need to zero the storage: unfilled slots are never read)
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in KVCache.reset in exercises/unit4/kvcache.py")

    def nbytes(self) -> int:
        """Bytes of the preallocated storage: keys and values, all layers and slots."""
        # TODO: 2 * n_layer * batch * n_head * max_len * head_dim * bytes per element
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in KVCache.nbytes in exercises/unit4/kvcache.py")


def causal_mask(start: int, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[t, start+t]``: query i (at absolute position start+i) may look at key j (at
    position j) when ``j <= start + i``.  With start = 0 it is the usual lower-triangular mask."""
    # TODO: key positions arange(start+t) against query positions start + arange(t), as [t, start+t]
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in causal_mask in exercises/unit4/kvcache.py")


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
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in cached_attention in exercises/unit4/kvcache.py")


def forward_with_cache(model: GPT, idx: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
                       key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, t, vocab] for the new tokens ``idx`` ([batch, t]) given the ``cache.length``
    tokens already in ``cache``; writes their keys and values and advances the cache by t.
    ``positions`` ([batch or 1, t]) default to cache.length + 0..t-1 (a padded batch passes its own);
    ``key_mask`` as in cached_attention."""
    # TODO: positions default start + arange(t); x = wte(idx) + wpe(positions); for each block i:
    # x = x + cached_attention(block.attn, block.ln_1(x), cache, i, key_mask); x = x + block.mlp(block.ln_2(x));
    # then cache.advance(t); return lm_head(ln_f(x)).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in forward_with_cache in exercises/unit4/kvcache.py")


# --- Part C: a decode step with static shapes -------------------------------------------------------


def static_attention(attn: Attention, x: torch.Tensor, cache: KVCache, layer: int, slot: torch.Tensor) -> torch.Tensor:
    """``attn``'s self-attention for ONE new token per row, ``x`` [batch, 1, n_embd], written at cache
    slot ``slot`` (int64 tensor [1], on x's device).  Returns [batch, 1, n_embd].  Every shape is the
    same at every slot: k and v go in with ``index_copy_``, and the query attends over ALL max_len
    slots, with the slots after ``slot`` masked out.  No Python number here may depend on ``slot``."""
    # TODO: q, k, v as in cached_attention; cache.k[layer].index_copy_(2, slot, k) (and v);
    # scores = q @ cache.k[layer]^T / sqrt(head_dim) -> [b, heads, 1, max_len];
    # allowed = arange(max_len) <= slot; masked_fill(~allowed, finfo(dtype).min); softmax; @ cache.v[layer].
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in static_attention in exercises/unit4/kvcache.py")


def decode_step(model: GPT, token: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
    """Logits [batch, 1, vocab] for one new token per row, ``token`` [batch, 1] int64, at position and
    cache slot ``slot`` (int64 tensor [1] on the model's device: the number of tokens before it).
    Writes its keys and values at that slot in every layer.  Unlike forward_with_cache it neither reads
    nor moves ``cache.length`` and never turns ``slot`` into a Python number (no ``.item()``, ``int()``,
    ``if`` on it): a captured CUDA graph replays tensor work only, and torch.compile would recompile
    for every new Python value."""
    # TODO: x = wte(token) + wpe(slot as [1, 1]); each block: x = x + static_attention(block.attn,
    # block.ln_1(x), cache, i, slot); x = x + block.mlp(block.ln_2(x)); return lm_head(ln_f(x)).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in decode_step in exercises/unit4/kvcache.py")
