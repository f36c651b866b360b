"""Part A: a GPT of your own, Llama-style: RMSNorm, rotary positions, causal self-attention, a
SwiGLU MLP, pre-norm residual blocks, token embeddings tied to the output head, and the scaled
initialisation of the residual projections.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.0.self_attn.q_proj``, ``model.norm``, ``lm_head``), so the grader can load your
``state_dict()`` into a ``LlamaForCausalLM`` built from the same sizes and compare the logits.  The
structure (which modules exist) is given; you write what they compute.

The attention core may use ``torch.nn.functional.scaled_dot_product_attention`` (you wrote it
yourself in Unit 2); the rotary embedding, the masks and everything around them are yours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 64
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_mlp: int = 172  # the SwiGLU hidden size (about 8/3 of d_model, as in Llama)
    max_seq_len: int = 256  # the longest sequence generate() accepts (RoPE itself has no table)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# --- RMSNorm ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2 over the last dim) + eps) * weight; weight starts at ones."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> same shape and dtype.  The statistic is computed in float32 at least
        (bf16/fp16 upcast, float64 stays float64), the normalised x cast back to x's dtype, then
        multiplied by the weight."""
        # TODO: compute = promote_types(x.dtype, float32); h = x in that dtype;
        # h = h * rsqrt(mean(h^2, last dim, keepdim) + eps); return weight * h.to(x.dtype).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in RMSNorm.forward in exercises/unit7/model.py")


# --- rotary position embeddings --------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [t, head_dim] float64, for int64 ``positions`` [t].

    Pair i (i < head_dim / 2) turns at theta_i = base^(-2i / head_dim); its angle at position p is
    p * theta_i.  Hugging Face's "half-split" layout pairs feature i with feature i + head_dim / 2,
    so both halves of the last dimension hold the same angles.
    """
    # TODO: theta = base ** (-arange(0, head_dim, 2) / head_dim) in float64;
    # angles = positions[:, None] * theta; cat([angles, angles], -1); return cos, sin.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in rope_cos_sin in exercises/unit7/model.py")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``x`` [b, heads, t, head_dim] by the angles of ``cos``/``sin``
    [t, head_dim]: x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1] (the two
    halves of the last dim).  Computed in float32 at least; returns x's dtype."""
    # TODO: compute in promote_types(x.dtype, float32); x1, x2 = halves of x;
    # out = x * cos + cat([-x2, x1], -1) * sin; back to x.dtype.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in apply_rope in exercises/unit7/model.py")


# --- attention, MLP, block -------------------------------------------------------------------------


def causal_mask(start: int, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [t, start + t]: query i (at position start + i) may look at key j when j <= start + i."""
    # TODO: key positions arange(start + t) against query positions start + arange(t).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in causal_mask in exercises/unit7/model.py")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys; no biases (as in Llama)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.rope_base = config.n_head, config.head_dim, config.rope_base
        d = config.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        """x: [b, t, d_model]; positions: int64 [t], the absolute positions of these t tokens.
        ``cache`` (optional, e.g. Unit 4's KVCache): ``cache.length`` tokens are already in it;
        ``keys, values = cache.append(layer, k, v)`` stores this call's keys and values and returns
        all of them so far, [b, heads, length + t, head_dim].  Returns [b, t, d_model]."""
        # TODO: q, k, v = the three projections, each as [b, heads, t, head_dim];
        # cos, sin = rope_cos_sin(positions, head_dim, rope_base); rotate q and k (not v);
        # with a cache: start = cache.length, keys/values from cache.append; else start = 0;
        # attention of q over the keys with causal_mask(start, t) (scores / sqrt(head_dim), softmax
        # in float32 at least; or scaled_dot_product_attention with attn_mask=that mask);
        # merge the heads back to [b, t, d_model]; o_proj.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in CausalSelfAttention.forward in exercises/unit7/model.py")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_mlp, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_mlp, bias=False)
        self.down_proj = nn.Linear(config.d_mlp, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TODO: down_proj(silu(gate_proj(x)) * up_proj(x)), silu(z) = z * sigmoid(z).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in SwiGLU.forward in exercises/unit7/model.py")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = CausalSelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        # TODO: x = x + self_attn(input_layernorm(x), positions, cache, layer);
        # return x + mlp(post_attention_layernorm(x)).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Block.forward in exercises/unit7/model.py")


# --- the model -------------------------------------------------------------------------------------


class Decoder(nn.Module):
    """The body (Hugging Face's ``LlamaModel``): embeddings, blocks, the final norm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class GPT(nn.Module):
    """``GPT(config)(idx)`` maps token ids [b, t] (int64) to logits [b, t, vocab_size]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # TODO: tie the output head to the token embeddings (one Parameter, used twice), then
        # self.init_weights().
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in GPT.__init__ in exercises/unit7/model.py")

    def init_weights(self) -> None:
        """Every Linear and the Embedding: normal(0, init_std); the two residual projections of each
        block (self_attn.o_proj and mlp.down_proj), which add into the residual stream:
        normal(0, init_std / sqrt(2 * n_layer)); every RMSNorm weight: ones."""
        # TODO: loop over self.named_modules(); nn.init.normal_ / ones_ as above (the tied weight is
        # initialised once, as the embedding).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in GPT.init_weights in exercises/unit7/model.py")

    def forward(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """idx: int64 [b, t].  Positions are 0 .. t-1, or cache.length .. cache.length + t - 1 with a
        cache; after the last block, ``cache.advance(t)`` (once).  Returns logits [b, t, vocab]."""
        # TODO: start = cache.length (or 0); positions = start + arange(t); x = embed_tokens(idx);
        # each block i: x = block(x, positions, cache, i); cache.advance(t); lm_head(norm(x)).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in GPT.forward in exercises/unit7/model.py")


def num_parameters(model: nn.Module) -> int:
    """Parameters counted once each (the tied embedding / head counts once)."""
    return sum(p.numel() for p in model.parameters())
