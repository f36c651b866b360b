"""Visible tests for Unit 7, Part A (the model). Run: pytest exercises/unit7/test_model.py"""

import math

import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check

# float64: a correct model agrees with Hugging Face's Llama to ~1e-15
EXACT = dict(rtol=1e-9, atol=1e-11)


def _oracles(learner):
    return learner.course("oracles")


@pytest.mark.group("norm_rope")
def test_rmsnorm_small_values(learner):
    x = torch.tensor([[3e-3, -4e-3], [1.0, 2.0]], dtype=torch.float64)
    norm = learner.module("model").RMSNorm(2, 1e-5)
    norm.to(torch.float64)
    norm.load_state_dict({"weight": torch.tensor([1.0, 2.0], dtype=torch.float64)})
    ms = x.pow(2).mean(-1, keepdim=True)
    want = x * torch.rsqrt(ms + 1e-5) * torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert_close(norm(x), want, **EXACT, call="RMSNorm(2, eps=1e-5)(x[[3e-3, -4e-3], [1, 2]]), weight [1, 2]",
                 mistakes={"eps goes inside the square root: x * rsqrt(mean(x^2) + eps)":
                           x / (ms.sqrt() + 1e-5) * torch.tensor([1.0, 2.0], dtype=torch.float64),
                           "normalise over the last dimension (the features), keepdim=True":
                           x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-5) * torch.tensor([1.0, 2.0], dtype=torch.float64),
                           "multiply by self.weight (it starts at ones, but it is learned)": x * torch.rsqrt(ms + 1e-5)})


@pytest.mark.group("norm_rope")
def test_rope_by_hand(learner):
    model = learner.module("model")
    cos, sin = model.rope_cos_sin(torch.tensor([0, 1, 2]), 4, 100.0)
    # theta = [1, 100^-0.5] = [1, 0.1]; angles at position p: [p, 0.1 p, p, 0.1 p]
    angles = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.1, 1.0, 0.1], [2.0, 0.2, 2.0, 0.2]], dtype=torch.float64)
    assert_close(cos, angles.cos(), **EXACT, dtype=torch.float64, call="rope_cos_sin([0, 1, 2], head_dim 4, base 100)[0]",
                 mistakes={"theta_i = base^(-2i / head_dim): the exponent counts pairs, i < head_dim / 2":
                           torch.tensor([[0.0] * 4, [1.0, 0.1 ** 0.5, 1.0, 0.1 ** 0.5], [2.0, 2 * 0.1 ** 0.5, 2.0, 2 * 0.1 ** 0.5]],
                                        dtype=torch.float64).cos(),
                           "both halves hold the same angles: cat([angles, angles]), not each angle twice in a row":
                           angles[:, [0, 2, 1, 3]].cos()})
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]] * 3]], dtype=torch.float64)  # [1, 1, 3, 4]
    got = model.apply_rope(x, cos, sin)
    x1, x2 = x[..., :2], x[..., 2:]
    want = x * cos + torch.cat([-x2, x1], -1) * sin
    assert_close(got, want, **EXACT, call="apply_rope([1, 2, 3, 4] at positions 0, 1, 2)",
                 mistakes={"rotate_half([x1, x2]) is [-x2, x1] (the halves, not neighbouring pairs)":
                           x * cos + torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2) * sin})


@pytest.mark.group("model")
def test_causal_mask_after_a_prefix(learner):
    got = learner.module("model").causal_mask(2, 2)
    want = torch.tensor([[True, True, True, False], [True, True, True, True]])
    check(isinstance(got, torch.Tensor) and torch.equal(got, want),
          f"causal_mask(2, 2) = {got.int().tolist() if isinstance(got, torch.Tensor) else got}; expected "
          f"{want.int().tolist()}: query i sits at position start + i and sees keys 0 .. start + i")


@pytest.mark.group("model")
def test_logits_match_llama_small(learner):
    o = _oracles(learner)
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, 0, torch.float64)
    idx = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    got = o.learner_gpt(learner, cfg, state)(idx)
    want = o.logits(o.to_llama(state, cfg), idx)
    # Post-norm blocks and an attention without its mask, for the hints (the same weights, through HF's pieces)
    assert_close(got, want, **EXACT, call="GPT(2 layers, d_model 32, 4 heads, vocab 50)(idx[2,11]) in float64, against "
                                          "LlamaForCausalLM with the same weights",
                 hint="embed_tokens; each block: x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)); "
                      "attention with RoPE on q and k, scores / sqrt(head_dim), the causal mask; model.norm; lm_head")


@pytest.mark.group("model")
def test_head_is_tied(learner):
    o = _oracles(learner)
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, 0, torch.float64)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0
    after = o.learner_gpt(learner, cfg, state).state_dict()
    check(torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"]),
          "lm_head.weight and model.embed_tokens.weight can hold different values: the head is not tied. "
          "Hint: self.lm_head.weight = self.model.embed_tokens.weight")


@pytest.mark.group("init")
def test_residual_projections_are_scaled(learner):
    o = _oracles(learner)
    cfg = o.gpt_config(d_model=128, n_layer=8, d_mlp=256, vocab_size=256)
    learner.lib("torch").manual_seed(0)
    state = o.learner_gpt(learner, cfg, None, torch.float32).state_dict()
    want = 0.02 / math.sqrt(2 * 8)
    for name in ("model.layers.3.self_attn.o_proj.weight", "model.layers.7.mlp.down_proj.weight"):
        std = state[name].std().item()
        check(abs(std - want) < 0.1 * want, f"initial {name} has std {std:.5f}; expected 0.02 / sqrt(2 * n_layer) = "
                                            f"{want:.5f}. Hint: the residual projections (o_proj, down_proj) are scaled down")
    std = state["model.layers.0.self_attn.q_proj.weight"].std().item()
    check(abs(std - 0.02) < 0.002, f"initial q_proj.weight has std {std:.5f}; expected 0.02")
    check(torch.equal(state["model.norm.weight"], torch.ones(128)), "the final norm's weight must start at ones")
