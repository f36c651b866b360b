"""A small GPT (GPT-2 architecture, pre-LayerNorm) shared by Units 4-6.

Course code: learners read it and build on it, but do not edit it; the grader always uses the
course's copy.  Module names follow Hugging Face's GPT-2 (``transformer.h.0.attn.c_attn`` ...), so
weights move to and from ``transformers.GPT2LMHeadModel`` with ``to_hf`` / ``from_hf`` (HF's
``Conv1D`` stores weights as (in, out); ``nn.Linear`` as (out, in): the conversion transposes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    n_positions: int = 128
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_hf(self):
        """The matching ``transformers.GPT2Config`` (no dropout, GELU tanh as in GPT-2)."""
        from transformers import GPT2Config

        return GPT2Config(vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd,
                          n_layer=self.n_layer, n_head=self.n_head, layer_norm_epsilon=self.layer_norm_epsilon,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                          bos_token_id=self.vocab_size - 1, eos_token_id=self.vocab_size - 1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # [b, heads, t, head_dim]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, t, n_embd]. attn_mask: boolean [b or 1, 1, t, t], True where a query may look;
        None means causal."""
        b, t, c = x.shape
        q, k, v = (self.split_heads(z) for z in self.c_attn(x).split(c, dim=2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if attn_mask is None:
            attn_mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        y = scores.softmax(dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """``GPT(config)(idx)`` maps token ids [b, t] to logits [b, t, vocab]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx: [b, t] token ids; positions: [b or 1, t] (default 0..t-1); attn_mask as in Attention."""
        b, t = idx.shape
        if positions is None:
            positions = torch.arange(t, device=idx.device).unsqueeze(0)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, attn_mask)
        return self.lm_head(self.transformer.ln_f(x))

    # --- weights to and from Hugging Face GPT2LMHeadModel ---------------------------------------

    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def to_hf(self):
        """A ``transformers.GPT2LMHeadModel`` with exactly these weights."""
        from transformers import GPT2LMHeadModel

        weight = self.transformer.wte.weight
        # In this model's dtype and device first: loading float64 weights into float32 ones rounds them.
        hf = GPT2LMHeadModel(self.config.to_hf()).to(dtype=weight.dtype, device=weight.device).eval()
        state = {}
        for name, tensor in self.state_dict().items():
            if name == "lm_head.weight":
                continue
            state[name] = tensor.t().contiguous() if name.endswith(self._CONV1D) else tensor
        missing, unexpected = hf.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.endswith(".attn.bias")]
        missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
        if missing or unexpected:
            raise RuntimeError(f"weight names do not match: missing {missing}, unexpected {unexpected}")
        return hf

    @classmethod
    def from_hf(cls, hf) -> "GPT":
        c = hf.config
        model = cls(GPTConfig(c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head, c.layer_norm_epsilon))
        state = {}
        for name, tensor in hf.state_dict().items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            state[name] = tensor.t().contiguous() if name.endswith(cls._CONV1D) else tensor
        state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state)
        return model.eval()


def config_dict(config: GPTConfig) -> dict:
    return asdict(config)
