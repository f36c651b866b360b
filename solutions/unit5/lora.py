"""Part A and B: LoRA adapters, written to match Hugging Face ``peft`` exactly.

A frozen linear layer ``W`` (d_out x d_in) gets a trainable low-rank update::

    h = W x + (B A x) * scaling,     A: [r, d_in] (random),  B: [d_out, r] (zeros)

Only A and B train: r * (d_in + d_out) numbers instead of d_in * d_out.  Because B starts at
zero, the adapted model is exactly the base model at initialisation.  After training, the update
can be folded into W (``merge``): inference then costs nothing extra.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def _features(base: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a layer LoRA can adapt.

    ``nn.Linear`` stores its weight as [d_out, d_in].  GPT-2's ``transformers.pytorch_utils.Conv1D``
    stores it transposed, [d_in, d_out] (peft calls this ``fan_in_fan_out``).
    """
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D" and getattr(base, "weight", None) is not None and base.weight.dim() == 2:
        d_in, d_out = base.weight.shape
        return d_in, d_out, True
    raise TypeError(f"LoRA adapts nn.Linear and GPT-2's Conv1D layers, not {type(base).__name__}")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor the low-rank update is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    # TODO: return alpha / r, or alpha / math.sqrt(r) when use_rslora.
    ### BEGIN SOLUTION
    return alpha / math.sqrt(r) if use_rslora else alpha / r
    ### END SOLUTION


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` or ``Conv1D`` (``self.base``) and adds ``lora_B @ lora_A``.

    Attributes (the contract the tests rely on): ``base``, ``lora_A`` [r, d_in], ``lora_B``
    [d_out, r], ``scaling``, ``dropout`` (applied to the LoRA branch's input only), ``merged``.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"the rank r must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features, self.fan_in_fan_out = _features(base)
        self.r, self.alpha = r, alpha
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=weight.dtype, device=weight.device))
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform with a = sqrt(5) (nn.Linear's default); B: zeros."""
        # TODO: nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5)); nn.init.zeros_(self.lora_B)
        ### BEGIN SOLUTION
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        ### END SOLUTION

    def delta_weight(self) -> torch.Tensor:
        """(B @ A) * scaling, laid out like ``base.weight`` ([d_out, d_in], or [d_in, d_out] for
        Conv1D) and in its dtype. Computed in float32 when the weights are in a 16-bit type."""
        # TODO: delta = (B @ A) * scaling in float32 or wider; transpose it when fan_in_fan_out; cast to W's dtype.
        ### BEGIN SOLUTION
        compute = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.base.weight.dtype)
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + B(A(dropout(x))) * scaling; just base(x) once merged."""
        # TODO: when merged, return self.base(x); else add the LoRA branch (dropout on its input only).
        ### BEGIN SOLUTION
        result = self.base(x)
        if self.merged:
            return result
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return result + lora * self.scaling
        ### END SOLUTION

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into base.weight (W += delta); a second merge does nothing."""
        # TODO: if not merged: add delta_weight() to self.base.weight in place; set self.merged.
        ### BEGIN SOLUTION
        if self.merged:
            return
        self.base.weight.add_(self.delta_weight())
        self.merged = True
        ### END SOLUTION

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge (W -= delta); does nothing when not merged."""
        # TODO: if merged: subtract delta_weight() from self.base.weight in place; clear self.merged.
        ### BEGIN SOLUTION
        if not self.merged:
            return
        self.base.weight.sub_(self.delta_weight())
        self.merged = False
        ### END SOLUTION

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def target_matches(name: str, targets: str | list[str]) -> bool:
    """Does module ``name`` match ``targets``, as peft decides it?

    A string is a regular expression that must match the WHOLE name; a list matches a name equal
    to one of its entries or ending in "." + entry (so "c_attn" matches "h.0.attn.c_attn" but
    neither "h.0.attn.c_attn_extra" nor "h.0.attn.xc_attn").
    """
    # TODO: str -> re.fullmatch(targets, name); list -> name == t or name.endswith("." + t) for some t.
    ### BEGIN SOLUTION
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
    ### END SOLUTION


def inject_lora(model: nn.Module, targets: str | list[str], r: int = 8, alpha: float = 8.0,
                dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Freeze every parameter of ``model``, then replace each matching Linear/Conv1D with a
    LoRALinear wrapping it (in place). Returns ``model``. Raises ValueError if nothing matches."""
    # TODO: freeze all; collect matching names first; swap each module on its parent via setattr.
    ### BEGIN SOLUTION
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, module in model.named_modules()
             if name and target_matches(name, targets) and not isinstance(module, LoRALinear)]
    if not names:
        raise ValueError(f"no module of the model matches target_modules={targets!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora))
    return model
    ### END SOLUTION


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: {"<module name>.lora_A": A, "<module name>.lora_B": B}, detached copies."""
    # TODO: one entry per lora_A and lora_B of every LoRALinear (use lora_modules); nothing else.
    ### BEGIN SOLUTION
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A"] = module.lora_A.detach().clone()
        state[f"{name}.lora_B"] = module.lora_B.detach().clone()
    return state
    ### END SOLUTION


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapters saved by lora_state_dict into a model with the same adapters injected.
    Raises KeyError if a key is missing or unexpected, ValueError on a shape mismatch."""
    # TODO: check the keys match exactly; copy each tensor into its parameter in place (no_grad).
    ### BEGIN SOLUTION
    params = {}
    for name, module in lora_modules(model).items():
        params[f"{name}.lora_A"] = module.lora_A
        params[f"{name}.lora_B"] = module.lora_B
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(f"adapter keys do not match: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    with torch.no_grad():
        for key, param in params.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"{key}: shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
            param.copy_(state[key])
    ### END SOLUTION


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter of the model (inference at the base model's cost)."""
    for module in lora_modules(model).values():
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora."""
    for module in lora_modules(model).values():
        module.unmerge()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
