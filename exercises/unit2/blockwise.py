"""Parts D-E: memory-efficient attention in plain PyTorch.

Materialised attention builds the whole [n_q, n_k] score matrix: at 16k tokens that is 1 GiB per
head in float32.  Here keys and values arrive in blocks of ``block_size``; for each query row we
keep only three running quantities, updated as each block arrives (the "online softmax"):

  m   the largest score seen so far                      [..., n_q]
  l   sum over seen keys of exp(score - m)               [..., n_q]
  acc sum over seen keys of exp(score - m) * value        [..., n_q, d_v]

When a block raises the max from m to m', everything accumulated so far was scaled by exp(-m)
and must be rescaled by exp(m - m') before the block's own terms are added.  At the end
out = acc / l and the log-sum-exp of the scores is lse = m + log(l).

Part E (stretch) keeps only q, k, v, out and lse for backward and recomputes each block's
probabilities there, so training also never holds an [n_q, n_k] matrix.
"""

from __future__ import annotations

import math

import torch


def block_causal_mask(n_q: int, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [n_q, end - start]: True where key ``start + j`` <= query ``i`` (top-left aligned causal)."""
    keys = torch.arange(start, end, device=device)
    queries = torch.arange(n_q, device=device)
    return keys[None, :] <= queries[:, None]


def online_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                             block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over key/value blocks with an online softmax; never builds [n_q, n_k] scores.

    q [..., n_q, d], k [..., n_k, d], v [..., n_k, d_v], the same leading dimensions.
    Returns (out, lse): out [..., n_q, d_v] in q's dtype, and lse [..., n_q], the log-sum-exp of
    each row's scaled scores over its allowed keys, in the compute dtype (float32, or float64 for
    float64 inputs).  Low-precision inputs are computed in float32.  With ``is_causal`` (top-left
    aligned, as in Part A) a block that starts after the last query is skipped.
    """
    # TODO: for each key block: scores = (q / sqrt(d)) @ k_blk^T (masked if causal);
    # m' = max(m, rowmax(scores)); c = exp(m - m'); p = exp(scores - m');
    # l = l * c + rowsum(p); acc = acc * c + p @ v_blk; m = m'.  Then out = acc / l, lse = m + log(l).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in online_softmax_attention in exercises/unit2/blockwise.py")


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                        block_size: int = 128) -> torch.Tensor:
    """The output of ``online_softmax_attention`` alone (differentiable through plain autograd)."""
    return online_softmax_attention(q, k, v, is_causal, block_size)[0]


class BlockwiseAttentionFunction(torch.autograd.Function):
    """Stretch: blockwise attention whose backward recomputes the probabilities block by block.

    With s = q k^T / sqrt(d) and P = exp(s - lse) (the forward's softmax, recomputed per block),
    O = P V and dO the incoming gradient:
      dV_blk = P_blk^T dO
      dP_blk = dO V_blk^T
      D      = rowsum(dO * O)                 (= rowsum(P * dP), one number per query)
      dS_blk = P_blk * (dP_blk - D)
      dQ    += dS_blk K_blk / sqrt(d)
      dK_blk = dS_blk^T Q / sqrt(d)
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, block_size: int) -> torch.Tensor:
        # TODO: out, lse = online_softmax_attention(...); save exactly (q, k, v, out, lse) with
        # ctx.save_for_backward; keep is_causal and block_size on ctx; return out.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in BlockwiseAttentionFunction.forward in exercises/unit2/blockwise.py")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        """Return (dq, dk, dv, None, None) in the dtypes of q, k, v; compute in lse's dtype."""
        # TODO: the formulas in the class docstring, one key block at a time (mask causal blocks
        # as in the forward; blocks after the last query get zero dK, dV).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in BlockwiseAttentionFunction.backward in exercises/unit2/blockwise.py")


def memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                               block_size: int = 128) -> torch.Tensor:
    """Blockwise attention with the recomputation backward (Part E)."""
    return BlockwiseAttentionFunction.apply(q, k, v, is_causal, block_size)
