"""Part B: the training loop, piece by piece: the loss, AdamW with decoupled weight decay and the
parameters it must not decay, a cosine schedule with linear warm-up, gradient clipping by the global
norm, gradient accumulation, token data read from disk through ``datasets`` and a memory map, and
checkpoints that resume bit for bit.  Part C runs ``train`` on the course's corpus.

Everything here works on any ``nn.Module`` that maps token ids [b, t] to logits [b, t, vocab]; the
tests use your ``model.GPT``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    block_size: int = 64  # tokens per sequence
    accum_steps: int = 1  # micro-batches per optimizer step
    total_steps: int = 300
    warmup_steps: int = 30
    max_lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0  # seeds the generator that draws the batches
    device: str = "cpu"  # where train() sends each batch (the model is already there)
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16: forward passes under torch.autocast


# --- the loss ----------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [..., V], targets [...] int64 (the token that follows
    each position).  loss_i = logsumexp(logits_i) - logits_i[targets_i], computed in float32 at least
    (bf16 logits upcast; float64 stays float64); the mean over the positions whose target is not
    ``ignore_index``.  Returns a 0-dim tensor."""
    # TODO: upcast; z = logits.reshape(-1, V); keep = targets != ignore_index;
    # picked = z.gather(1, safe targets); mean of (logsumexp(z, 1) - picked) over keep.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in cross_entropy in exercises/unit7/train.py")


# --- AdamW ---------------------------------------------------------------------------------------------


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names that get weight decay, names that do not), in ``model.named_parameters()`` order, each
    parameter once.  Decayed: the weight matrices of ``nn.Linear`` layers.  Not decayed: biases, norm
    weights (every parameter with fewer than 2 dims) and embeddings (including a head tied to them:
    ``named_parameters`` lists a shared tensor once, under its first name)."""
    # TODO: embedding parameters = those of every nn.Embedding in model.modules() (compare by identity);
    # for name, p in named_parameters(): decay if p.dim() >= 2 and p is not an embedding parameter.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in split_decay in exercises/unit7/train.py")


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), step for step what torch.optim.AdamW
    computes (without amsgrad, foreach or fused variants)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """For each parameter p with a gradient g, with its group's lr, betas, eps, weight_decay:
            p = p * (1 - lr * weight_decay)                        (decoupled: not through g)
            m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2      (m, v start at 0)
            t = t + 1;  m_hat = m / (1 - beta1^t);  v_hat = v / (1 - beta2^t)
            p = p - lr * m_hat / (sqrt(v_hat) + eps)
        The state of p lives in ``self.state[p]`` ("step", "exp_avg", "exp_avg_sq"), so that
        ``state_dict()`` / ``load_state_dict()`` carry it into a checkpoint."""
        # TODO: the loop above; read lr etc. from each group at every step (the schedule changes lr).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in AdamW.step in exercises/unit7/train.py")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """Your AdamW over two groups: split_decay's decayed names with cfg.weight_decay, the rest with 0."""
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    return AdamW(groups, lr=cfg.max_lr, betas=cfg.betas, eps=cfg.eps)


# --- the schedule -------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based):
        step < warmup_steps:  max_lr * step / warmup_steps                 (0 at step 0)
        otherwise:            min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * progress)),
                              progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        step >= total_steps:  min_lr
    (transformers' get_cosine_with_min_lr_schedule_with_warmup up to total_steps)."""
    # TODO: the three cases above, as a Python float.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in lr_at in exercises/unit7/train.py")


# --- clipping, accumulation, one step ------------------------------------------------------------------


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (total + 1e-6)), where total is the L2 norm of all
    the gradients together (parameters without a gradient are skipped).  ``parameters`` may be a
    generator (``model.parameters()``): go through it once.  Returns total (before clipping), a float."""
    # TODO: grads = [p.grad for p in parameters if p.grad is not None]; total = sqrt(sum of squares);
    # coef = max_norm / (total + 1e-6); if coef < 1: multiply each grad in place by coef.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in clip_grad_norm in exercises/unit7/train.py")


def accumulate_gradients(model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         autocast_dtype: torch.dtype | None = None) -> float:
    """The gradient of the mean loss over all the micro-batches (each (x, y) of ids [b, t], all of the
    same size), left in the parameters' ``.grad``, starting from zero (whatever .grad held before).
    Returns the mean of the micro-batches' losses, a float.  With n micro-batches:
        for each (x, y):  (cross_entropy(model(x), y) / n).backward()
    equals one backward of the loss of the concatenated batch.  With ``autocast_dtype`` (e.g.
    torch.bfloat16) the forward pass and the loss run under
    ``torch.autocast(device_type=x.device.type, dtype=autocast_dtype)``; backward runs outside it."""
    # TODO: model.zero_grad(set_to_none=True); the loop above (the forward and the loss inside the
    # autocast context when autocast_dtype is given); return the mean loss as a float.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in accumulate_gradients in exercises/unit7/train.py")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, lr: float,
               max_grad_norm: float | None = None, autocast_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """One optimizer step: accumulate_gradients (with autocast_dtype); clip_grad_norm(model.parameters(), max_grad_norm)
    (max_grad_norm None: no clipping, but the norm is still measured); set every param group's "lr"
    to ``lr``; optimizer.step().  Returns (mean loss, the gradient norm before clipping)."""
    # TODO: the four steps above, in this order.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in train_step in exercises/unit7/train.py")


# --- data ----------------------------------------------------------------------------------------------


def encode_dataset(path: str, vocab: dict[str, int]) -> np.ndarray:
    """Token ids of a text file, through Hugging Face ``datasets``: load it with
    ``datasets.load_dataset("text", data_files=path, split="train", cache_dir=<a fresh temporary
    folder>)`` (one row per line), map each line to the ids of its words (``line.split()``, every word
    in ``vocab``) with ``Dataset.map(..., batched=True)``, and concatenate the rows in order.
    Returns uint16 [n_tokens]."""
    # TODO: load_dataset as above; ds.map(lambda batch: {"ids": [[vocab[w] for w in line.split()] ...]},
    # batched=True, remove_columns=["text"]); np.concatenate the rows (uint16).
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in encode_dataset in exercises/unit7/train.py")


def write_tokens(ids, path: str) -> None:
    """Write ids to ``path`` as raw little-endian uint16 (numpy's ``tofile``); ValueError if an id does
    not fit in 0 .. 65535."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError("token ids must fit in uint16 (0 .. 65535)")
    ids.astype("<u2").tofile(path)


def load_tokens(path: str) -> np.ndarray:
    """The token file at ``path`` as a read-only ``numpy.memmap`` of uint16: nothing is read into
    memory until a window is asked for, so the data may be larger than memory."""
    # TODO: np.memmap(path, dtype=np.uint16, mode="r").
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in load_tokens in exercises/unit7/train.py")


def get_batch(data: np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``data`` (a 1-d array or memmap of token ids):
        starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=generator)
        x[i] = data[s : s + block_size],  y[i] = data[s + 1 : s + 1 + block_size]     (s = starts[i])
    both int64 [batch_size, block_size]; exactly that one randint call per batch, so that a run is
    reproduced by its generator.  Reads only the windows (never the whole array).  ValueError if data
    has fewer than block_size + 1 tokens."""
    # TODO: check the length; starts as above; stack the windows (np.asarray(data[s : s + block_size + 1]));
    # x = first block_size of each, y = the last block_size; torch int64.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in get_batch in exercises/unit7/train.py")


# --- checkpoints and the loop ----------------------------------------------------------------------------


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    generator: torch.Generator) -> None:
    """Everything a resumed run needs to continue exactly: torch.save of a dict with the model's
    state_dict, the optimizer's state_dict, the next step and the generator's state."""
    # TODO: torch.save({"model": ..., "optimizer": ..., "step": step, "generator": generator.get_state()}, path)
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in save_checkpoint in exercises/unit7/train.py")


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
    """Restore what save_checkpoint saved into these objects; returns the step to continue from."""
    # TODO: ckpt = torch.load(path); load the three states; return ckpt["step"].
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in load_checkpoint in exercises/unit7/train.py")


def train(model: nn.Module, data: np.ndarray, cfg: TrainConfig, steps: int | None = None,
          checkpoint_path: str | None = None, resume_from: str | None = None) -> list[float]:
    """Train ``model`` on the token array ``data``; returns the loss of every step run.

        optimizer = make_optimizer(model, cfg); generator = torch.Generator().manual_seed(cfg.seed)
        start = load_checkpoint(resume_from, ...) if resume_from else 0
        end = start + steps (steps None: cfg.total_steps)
        for step in range(start, end):
            batches = [get_batch(data, cfg.batch_size, cfg.block_size, generator) for each of accum_steps],
                      each (x, y) moved to cfg.device
            loss, _ = train_step(model, optimizer, batches, lr_at(step, cfg), cfg.max_grad_norm, cfg.autocast_dtype)
        if checkpoint_path: save_checkpoint(checkpoint_path, model, optimizer, end, generator)

    A run of 6 steps and a run of 3 steps, saved, then resumed for 3 more (into a fresh model and
    optimizer), give the same 6 losses, bit for bit, and the same weights."""
    # TODO: the loop above.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in train in exercises/unit7/train.py")
