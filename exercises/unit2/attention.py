"""Parts A-C: scaled dot-product attention, multi-head attention with grouped queries, and RoPE.

Shapes follow torch: queries ``q [..., n_q, d]``, keys ``k [..., n_k, d]``, values
``v [..., n_k, d_v]``; any leading dimensions (batch, heads) are batch dimensions.  A boolean mask
is True where a query MAY look at a key (torch.nn.functional.scaled_dot_product_attention's
convention; torch.nn.MultiheadAttention's ``attn_mask`` means the opposite).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


# ---------------------------------------------------------------------------------------------
# Part A: scaled dot-product attention
# ---------------------------------------------------------------------------------------------


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dimension (the keys), where ``mask`` (bool, broadcastable to
    ``scores``) is True for the keys a row may use; masked keys get weight exactly 0.

    Numerically stable: subtract each row's largest allowed score before ``exp``.  A row with
    every key masked has no distribution to give: it returns all zeros (never NaN).
    """
    # TODO: fill masked scores with -inf; shift by the row max (0 for an all-masked row); exp;
    # divide by the row sum (by 1 where the sum is 0).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in masked_softmax in exercises/unit2/attention.py")


def causal_mask(n_q: int, n_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [n_q, n_k], True where key j <= query i (top-left aligned, like torch's is_causal):
    a query sees itself and the keys before it."""
    # TODO: a lower-triangular matrix of True, diagonal included.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in causal_mask in exercises/unit2/attention.py")


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) restricted to the allowed keys) v, batched over leading dimensions.

    ``mask``: bool, broadcastable to [..., n_q, n_k], True = may attend.  ``is_causal`` adds the
    causal mask (both may be given: a key must pass both).  Fully-masked rows give zeros.
    Returns [..., n_q, d_v] in v's dtype; low-precision scores go through the softmax in float32.
    """
    # TODO: scores = (q / sqrt(d)) @ k^T; combine mask and causal_mask; masked_softmax in at
    # least float32; cast the weights to v's dtype; return weights @ v.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in scaled_dot_product_attention in exercises/unit2/attention.py")


# ---------------------------------------------------------------------------------------------
# Part C: rotary position embeddings (before Part B, which uses them)
# ---------------------------------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [..., t, head_dim] in float64, for integer
    ``positions`` of shape [..., t].  Positions start at 0: the first token is not rotated.

    Pair i (i < head_dim / 2) turns at frequency theta_i = base^(-2i / head_dim); its angle at
    position p is p * theta_i.  The "half-split" layout (as in GPT-NeoX and HF Llama) pairs
    feature i with feature i + head_dim / 2, so both halves of the last dimension repeat the angles.
    """
    # TODO: theta = base ** (-arange(0, head_dim, 2) / head_dim) in float64;
    # angles = positions[..., None] * theta; cat([angles, angles], -1); return cos, sin.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in rope_cos_sin in exercises/unit2/attention.py")


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate queries or keys ``x [..., t, head_dim]`` (e.g. [b, heads, t, head_dim]) to their
    ``positions``: [t] (shared by the batch) or [b, t] (per sequence, with x [b, heads, t, d]).

    out = x * cos + rotate_half(x) * sin, where rotate_half([x1, x2]) = [-x2, x1] splits the last
    dimension in two halves.  Computed in at least float32; returns x's dtype.
    """
    # TODO: cos, sin = rope_cos_sin(...); for positions [b, t] and x [b, h, t, d] insert the head
    # axis; x1, x2 = halves of x; return x * cos + cat([-x2, x1]) * sin.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in apply_rope in exercises/unit2/attention.py")


# ---------------------------------------------------------------------------------------------
# Part B: multi-head attention with a fused QKV projection and grouped queries
# ---------------------------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, n_kv, t, d] -> [b, n_kv * n_rep, t, d]: key/value head j serves the query heads
    j * n_rep, ..., j * n_rep + n_rep - 1 (consecutive query heads share a key/value head)."""
    # TODO: repeat each head n_rep times in place (h0, h0, h1, h1, ...), not the whole stack.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in repeat_kv in exercises/unit2/attention.py")


class MultiHeadAttention(nn.Module):
    """Self-attention over x [b, t, d_model] with ``n_heads`` query heads of size
    head_dim = d_model / n_heads and ``n_kv_heads`` key/value heads (grouped-query attention;
    n_kv_heads = n_heads is ordinary multi-head attention, 1 is multi-query attention).

    Parameters (given; the tests load weights into them):
      qkv: one Linear d_model -> (n_heads + 2 n_kv_heads) * head_dim. Its output features are
           [queries (n_heads * head_dim) | keys (n_kv_heads * head_dim) | values (same)], and
           within each part head h owns features h * head_dim ... (h + 1) * head_dim - 1.
      out: Linear d_model -> d_model, applied to the heads concatenated in order.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, causal: bool = False,
                 bias: bool = True, rope: bool = False, rope_base: float = 10000.0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.causal, self.rope, self.rope_base = causal, rope, rope_base
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """[b, t, n_heads * head_dim] -> [b, n_heads, t, head_dim]."""
        # TODO: view the last dimension as (n_heads, head_dim), then swap the t and heads axes.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in MultiHeadAttention.split_heads in exercises/unit2/attention.py")

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[b, n_heads, t, head_dim] -> [b, t, n_heads * head_dim] (the inverse of split_heads)."""
        # TODO: swap the axes back, then flatten the heads (reshape: the result is not contiguous).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in MultiHeadAttention.merge_heads in exercises/unit2/attention.py")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, t, d_model] -> [b, t, d_model].

        ``mask``: bool, broadcastable to [b, n_heads, t, t], True = may attend (a padding mask is
        [b, 1, 1, t]); combined with the causal mask when ``causal``.  ``positions`` ([t] or
        [b, t], default 0..t-1) are used only when ``rope``: RoPE rotates q and k after the split.
        """
        # TODO: qkv(x) split into q, k, v parts; split_heads; RoPE on q and k if self.rope;
        # repeat_kv to n_heads; scaled_dot_product_attention; merge_heads; out.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in MultiHeadAttention.forward in exercises/unit2/attention.py")
