"""Shared by Unit 7's hidden tests: the course's oracles (loaded here, on the trusted side), and
what the usual mistakes compute, for the hints (computed here only when a check fails)."""

from __future__ import annotations

import math

import torch

from autograder.course_code import course_module

# float64 end to end: any correct order of operations agrees with Hugging Face to ~1e-15; these leave
# room for a different summation order (SDPA's or a hand-written softmax), not for another formula.
EXACT = dict(rtol=1e-9, atol=1e-11)


def oracles():
    return course_module("unit7.oracles")


def source():
    return course_module("unit7.source")


def rope_angles(positions: torch.Tensor, head_dim: int, base: float, exponent: float = 2.0,
                offset: int = 0) -> torch.Tensor:
    """[t, head_dim / 2] angles p * base^(-exponent * i / head_dim), in float64 (``offset``: positions
    shifted, a mistake)."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    return (positions.to(torch.float64)[:, None] + offset) * base ** (-exponent * i / head_dim)


def rope_reference(x: torch.Tensor, angles: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """x [..., t, d] rotated by ``angles`` [t, d/2] as complex numbers: feature i pairs with i + d/2
    ("half", Hugging Face's Llama) or with i + 1 at even i ("interleaved", GPT-J's, a mistake here)."""
    d = x.shape[-1]
    if layout == "half":
        z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    else:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    z = z * torch.polar(torch.ones_like(angles), angles)
    if layout == "half":
        return torch.cat([z.real, z.imag], dim=-1)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def attention_reference(x, w: dict, positions, n_head: int, base: float = 10000.0, *, causal: bool = True,
                        scale: bool = True, rotate_v: bool = False, rope: bool = True, layout: str = "half"):
    """Llama attention in float64, written out, with switches for the usual mistakes (the hints)."""
    b, t, d = x.shape
    hd = d // n_head

    def heads(z):
        return z.view(b, t, n_head, hd).transpose(1, 2)

    q, k, v = heads(x @ w["q_proj.weight"].T), heads(x @ w["k_proj.weight"].T), heads(x @ w["v_proj.weight"].T)
    if rope:
        angles = rope_angles(positions, hd, base)
        q, k = rope_reference(q, angles, layout), rope_reference(k, angles, layout)
        if rotate_v:
            v = rope_reference(v, angles, layout)
    scores = q @ k.transpose(-2, -1)
    if scale:
        scores = scores / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return y.transpose(1, 2).reshape(b, t, d) @ w["o_proj.weight"].T


def rms_reference(x, weight, eps, *, dim=-1, eps_outside=False, use_weight=True, mean_square=True):
    """RMSNorm in float64, with switches for the usual mistakes."""
    x64 = x.double()
    ms = x64.pow(2).mean(dim=dim, keepdim=True)
    if not mean_square:  # LayerNorm's variance: the mean subtracted
        ms = (x64 - x64.mean(dim=dim, keepdim=True)).pow(2).mean(dim=dim, keepdim=True)
    h = x64 / (ms.sqrt() + eps) if eps_outside else x64 * torch.rsqrt(ms + eps)
    return h * weight.double() if use_weight else h
