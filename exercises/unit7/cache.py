"""Course code (read it, do not edit it): the simplest cache with Unit 4's interface.

Your model's attention talks to a cache through three names only (those of Unit 4's ``KVCache``):
``cache.length`` (tokens already stored), ``cache.append(layer, k, v)`` (store this call's keys and
values of one layer and return all of that layer's so far) and ``cache.advance(t)`` (called once
per forward pass, after the last layer).  Any object with them works: the tests pass this one, and
``course capstone`` passes your Unit 4 ``KVCache`` (preallocated, the fast one) where you have
written it.  This one grows by concatenation: simple, and a new tensor every step.
"""

from __future__ import annotations

import torch


class ConcatCache:
    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [b, heads, t, head_dim], the new tokens; returns the layer's keys and values so far."""
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        if self.k[layer].shape[2] != self.length + k.shape[2]:
            raise RuntimeError(f"layer {layer} holds {self.k[layer].shape[2]} positions after this append; expected "
                               f"{self.length + k.shape[2]} (is advance() called more than once per forward pass?)")
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        self.length += t

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)
        self.length = 0
