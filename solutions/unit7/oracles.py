"""Course code for the tests (read it, do not edit it): the grader's oracles, built from libraries.

The tests never compare your code only with the course's solution.  They load your weights into
Hugging Face's ``LlamaForCausalLM`` built from the same sizes (``to_llama``), and replay your training
steps with ``torch.optim.AdamW``, ``torch.nn.functional.cross_entropy``,
``torch.nn.utils.clip_grad_norm_`` and transformers' cosine schedule (``reference_step``,
``reference_train``).  Everything here runs in the grader's process, on weights and data made there.

One adjustment: in a float64 model, Hugging Face still computes RMSNorm and the rotary angles in
float32 (``hidden_states.to(torch.float32)``; ``inv_freq`` is float32), which caps the agreement at
about 1e-7.  ``to_llama(..., exact=True)`` replaces those two pieces with the same formulas computed in
the model's dtype, so that float64 logits agree to about 1e-12.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F


# model.GPTConfig's defaults, for configs given as partial dicts
DEFAULTS = dict(vocab_size=64, d_model=64, n_layer=2, n_head=4, d_mlp=172, max_seq_len=256, norm_eps=1e-5,
                rope_base=10000.0, init_std=0.02)


def llama_config(cfg):
    """The ``transformers.LlamaConfig`` of a ``model.GPTConfig`` (or a dict of its fields)."""
    from transformers import LlamaConfig

    c = dict(DEFAULTS, **cfg) if isinstance(cfg, dict) else {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    return LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["d_model"], intermediate_size=c["d_mlp"],
                       num_hidden_layers=c["n_layer"], num_attention_heads=c["n_head"],
                       num_key_value_heads=c["n_head"], max_position_embeddings=c["max_seq_len"],
                       rms_norm_eps=c["norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": c["rope_base"]},
                       tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu",
                       initializer_range=c["init_std"], bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _rms_forward(self, hidden_states):
    compute = torch.promote_types(hidden_states.dtype, torch.float32)
    h = hidden_states.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(hidden_states.dtype)


def _rotary_forward(self, x, position_ids):
    dim = self.inv_freq.shape[0] * 2
    base = self.config.rope_parameters["rope_theta"]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
    angles = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    compute = torch.promote_types(x.dtype, torch.float32)
    return emb.cos().to(compute).to(x.dtype), emb.sin().to(compute).to(x.dtype)


def to_llama(state_dict: dict, cfg, dtype: torch.dtype = torch.float64, exact: bool = True):
    """A ``LlamaForCausalLM`` (eval mode, ``dtype``) holding exactly these weights: the learner's
    ``state_dict()``, whose names are Hugging Face's.  Raises RuntimeError naming missing or extra
    weights (strict loading)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = llama_config(cfg)
    config._attn_implementation = "sdpa"  # eager attention takes its softmax in float32 even in float64
    with torch.random.fork_rng(devices=[]):  # HF's own init draws from the global generator
        torch.manual_seed(0)
        hf = LlamaForCausalLM(config)
    hf = hf.to(dtype).eval()
    hf.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True)
    if exact:
        for module in hf.modules():
            if isinstance(module, LlamaRMSNorm):
                module.forward = types.MethodType(_rms_forward, module)
        hf.model.rotary_emb.forward = types.MethodType(_rotary_forward, hf.model.rotary_emb)
    return hf


def fresh_weights(cfg, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """Weights made here to send to the learner's model: a LlamaForCausalLM of these sizes
    initialised by Hugging Face (normal(0, init_std), norms at 1), then every RMSNorm weight moved
    off 1 (so that a norm that ignores its weight shows)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(llama_config(cfg))
        state = {k: v.detach().clone().to(dtype) for k, v in hf.state_dict().items()}
        for name in state:
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                state[name] = (1.0 + 0.2 * torch.randn(state[name].shape)).to(dtype)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def logits(hf, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=idx, use_cache=False).logits


def windows_loss(hf, windows: np.ndarray, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats) of ``hf`` on windows [n, T + 1] (inputs [:, :-1], targets
    [:, 1:]), with torch's F.cross_entropy."""
    windows = torch.as_tensor(np.asarray(windows, dtype=np.int64)).to(next(hf.parameters()).device)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i : i + batch]
            out = hf(input_ids=w[:, :-1], use_cache=False).logits.double()
            total += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
            count += w[:, 1:].numel()
    return total / count


# --- the training loop, with torch's and transformers' own pieces ---------------------------------


def decay_names(hf) -> tuple[list[str], list[str]]:
    """The handout's split for a LlamaForCausalLM: Linear weights decay; norms and the (tied) embedding do not."""
    decay, no_decay = [], []
    embedding = hf.model.embed_tokens.weight
    for name, p in hf.named_parameters():
        (decay if p.dim() >= 2 and p is not embedding else no_decay).append(name)
    return decay, no_decay


def reference_optimizer(hf, tc: dict, decay: list[str] | None = None) -> torch.optim.AdamW:
    """torch.optim.AdamW over the two groups (``decay``: the decayed names; default the handout's split)."""
    decay = decay_names(hf)[0] if decay is None else decay
    params = dict(hf.named_parameters())
    groups = [{"params": [params[n] for n in params if n in decay], "weight_decay": tc["weight_decay"]},
              {"params": [params[n] for n in params if n not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc["max_lr"], betas=tuple(tc["betas"]), eps=tc["eps"], foreach=False)


def schedule(tc: dict, steps: int) -> list[float]:
    """The learning rate of each step 0 .. steps-1 from transformers' cosine schedule with warm-up and
    a floor (its factor times max_lr; min_lr past total_steps, where transformers' cosine would rise)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=tc["max_lr"])
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, tc["warmup_steps"], tc["total_steps"],
                                                        min_lr=tc["min_lr"])
    out = []
    for step in range(steps):
        out.append(opt.param_groups[0]["lr"] if step < tc["total_steps"] else tc["min_lr"])
        opt.step()
        sched.step()
    return out


def reference_step(hf, optimizer, micro_batches, lr: float, max_grad_norm: float | None,
                   clip_after_step: bool = False, divide: bool = True,
                   autocast_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """One optimizer step as the handout states it (the two flags replay known mistakes)."""
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = 0.0
    for x, y in micro_batches:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            out = hf(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).to(torch.promote_types(out.dtype, torch.float32)),
                                   y.reshape(-1))
        (loss / n if divide else loss).backward()
        total += float(loss.detach()) / n
    limit = math.inf if max_grad_norm is None else max_grad_norm
    norm = 0.0
    if not clip_after_step:
        norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), limit))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if clip_after_step:
        norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), limit))
    return total, norm


def reference_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator):
    starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=generator)
    w = torch.from_numpy(np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64) for s in starts.tolist()]))
    return w[:, :-1], w[:, 1:]


def reference_train(hf, data: np.ndarray, tc: dict, steps: int, resume_at: int | None = None,
                    forget: tuple[str, ...] = (), **mistake) -> list[float]:
    """The handout's loop from the start (step 0), with torch's AdamW and transformers' schedule.
    ``resume_at`` with ``forget`` replays a resume at that step that loses "schedule" (starts again at
    step 0), "generator" (reseeded) or "optimizer" (a fresh AdamW): what each of those mistakes gives."""
    optimizer = reference_optimizer(hf, tc)
    generator = torch.Generator().manual_seed(tc["seed"])
    lrs = schedule(tc, steps)
    losses, offset = [], 0
    for step in range(steps):
        if step == resume_at:
            offset = step if "schedule" in forget else 0
            if "generator" in forget:
                generator = torch.Generator().manual_seed(tc["seed"])
            if "optimizer" in forget:
                optimizer = reference_optimizer(hf, tc)
        batches = [reference_batch(data, tc["batch_size"], tc["block_size"], generator) for _ in range(tc["accum_steps"])]
        losses.append(reference_step(hf, optimizer, batches, lrs[step - offset], tc["max_grad_norm"], **mistake)[0])
    return losses


# --- reaching the learner's objects (the tests' plumbing; values cross as plain data) ---------------


def gpt_config(**changes) -> dict:
    """A small model's sizes, as the dict a test sends (every field of model.GPTConfig)."""
    return dict(DEFAULTS, **dict(dict(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_mlp=48, max_seq_len=64),
                                 **changes))


def learner_gpt(learner, cfg: dict, state: dict | None = None, dtype: torch.dtype = torch.float64):
    """The learner's model.GPT of these sizes, on the learner's side, in ``dtype``, holding ``state``."""
    model = learner.module("model")
    gpt = model.GPT(model.GPTConfig(**cfg))
    gpt.to(dtype)
    if state is not None:
        gpt.load_state_dict(state)
    return gpt


def learner_grads(learner, module, names) -> dict:
    """{name: the .grad of that parameter} of a module on the learner's side (None where it has none)."""
    get = learner.lib("operator").attrgetter
    return {name: get(f"{name}.grad")(module) for name in names}


def learner_parameters(learner, tensors: list[torch.Tensor]):
    """A torch.nn.ParameterList on the learner's side holding copies of ``tensors`` (names "0", "1", ...)."""
    return learner.lib("torch").nn.ParameterList([t.clone() for t in tensors])


def set_grads(learner, params, grads: list[torch.Tensor | None]) -> None:
    """Set the .grad of each parameter of a learner-side ParameterList (None: no gradient)."""
    getter, setter = learner.lib("operator").attrgetter, learner.lib("builtins").setattr
    for i, g in enumerate(grads):
        stored = learner.harness("call_stored", getter(str(i)), [params])
        learner.harness("call_stored", setter, [stored, "grad", None if g is None else g.clone()])


def set_group_lr(learner, optimizer, lrs: list[float]) -> None:
    """Set each param group's "lr" of a learner-side optimizer (its param_groups list stays there)."""
    getattr_, item, setitem = learner.lib("builtins").getattr, learner.lib("operator").getitem, learner.lib("operator").setitem
    groups = learner.harness("call_stored", getattr_, [optimizer, "param_groups"])
    for i, lr in enumerate(lrs):
        group = learner.harness("call_stored", item, [groups, i])
        learner.harness("call_stored", setitem, [group, "lr", lr])


def digest(ids) -> int:
    d = 0
    for i in ids:
        d = (d * 1_000_003 + int(i) + 1) % (1 << 61)
    return d
