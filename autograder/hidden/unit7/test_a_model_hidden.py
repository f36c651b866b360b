"""Hidden tests, Unit 7 Part A: RMSNorm against torch's rms_norm (tiny variances, any leading
dims, bf16 computed in float32), rotary angles and rotations against complex multiplication and
Hugging Face's apply_rotary_pos_emb (large positions, several bases), the causal mask with an offset,
attention, SwiGLU and the block against Hugging Face's LlamaAttention, LlamaMLP and
LlamaDecoderLayer, the whole model against LlamaForCausalLM (logits in float64, strict weight names,
parameter count), the tied head, and the initialisation's statistics."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close, check
from autograder.hidden.unit7._common import (EXACT, attention_reference, oracles, rms_reference, rope_angles,
                                            rope_reference)

FEW = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
               phases=[Phase.explicit, Phase.generate])  # no shrinking: each example costs round trips


def _randn(gen, *shape, scale=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# --- RMSNorm -----------------------------------------------------------------------------------------


def _norm(learner, dim, eps, weight, dtype=torch.float64):
    norm = learner.module("model").RMSNorm(dim, eps)
    norm.to(dtype)
    norm.load_state_dict({"weight": weight.to(dtype)})
    return norm


@pytest.mark.group("norm_rope")
@FEW
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), dim=st.sampled_from([16, 5, 64, 1]),
       scale=st.sampled_from([1.0, 1e-3, 30.0]), eps=st.sampled_from([1e-5, 1e-6, 0.1]), draw=st.integers(0, 2**16))
# Tiny values, where eps inside or outside the square root differ by orders of magnitude; one feature.
@example(lead=[3, 4], dim=16, scale=1e-3, eps=1e-5, draw=0)
@example(lead=[2], dim=1, scale=1.0, eps=1e-6, draw=1)
def test_rmsnorm_matches_torch(learner, seed, lead, dim, scale, eps, draw):
    gen = torch.Generator().manual_seed(seed ^ draw)
    x = _randn(gen, *lead, dim, scale=scale)
    weight = 1.0 + 0.3 * _randn(gen, dim)
    got = _norm(learner, dim, eps, weight)(x)
    want = F.rms_norm(x, (dim,), weight, eps)
    mistakes = {"eps goes inside the square root: x * rsqrt(mean(x^2) + eps)": rms_reference(x, weight, eps, eps_outside=True),
                "multiply by self.weight (it starts at ones, but it is learned)": rms_reference(x, weight, eps, use_weight=False),
                "RMSNorm does not subtract the mean: mean(x^2), not the variance": rms_reference(x, weight, eps, mean_square=False)}
    if len(lead) >= 1 and lead[-1] > 1:
        mistakes["normalise over the last dimension (the features), keepdim=True"] = rms_reference(x, weight, eps, dim=-2)
    assert_close(got, want, **EXACT, mistakes=mistakes, call=f"RMSNorm({dim}, eps={eps:g})(x{list(x.shape)} float64, "
                 f"values ~{scale:g})", hint="y = x * rsqrt(mean(x^2 over the last dim, keepdim) + eps) * weight")


@pytest.mark.group("norm_rope")
def test_rmsnorm_bf16_statistic_in_float32(learner, torch_gen):
    """bf16 in, bf16 out, the mean of squares and rsqrt in float32: the result equals the float32
    computation rounded once to bf16 (a different float32 order flips the rounding of ~1 value in
    1000); the statistic taken in bf16 shifts whole rows by a rounding of rsqrt (~1 value in 4)."""
    dim = 256
    x = (torch.randn(16, dim, generator=torch_gen) * 3).to(torch.bfloat16)
    weight = (1.0 + 0.2 * torch.randn(dim, generator=torch_gen)).to(torch.bfloat16)
    got = _norm(learner, dim, 1e-5, weight, torch.bfloat16)(x)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    want = weight * h.to(torch.bfloat16)
    check(isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16 and got.shape == x.shape,
          f"RMSNorm (bf16 weights)(x[16,{dim}] bf16) gave {getattr(got, 'dtype', type(got))} "
          f"{tuple(getattr(got, 'shape', ()))}; expected bf16 {tuple(x.shape)} (cast the normalised x back to x's dtype)")
    differ = (got.float() != want.float()).float().mean().item()
    ulp = (want.float().abs() * 2.0 ** -7).clamp(min=1e-30)
    far = ((got.float() - want.float()).abs() > 1.01 * ulp).any().item()
    check(differ <= 0.05 and not far,
          f"RMSNorm(x[16,{dim}] bf16): {differ:.1%} of the values differ from the float32 computation rounded once to "
          f"bf16{' (some by more than one bf16 step)' if far else ''}; expected under 5%.\nHint: compute mean(x^2) and "
          "rsqrt in float32 (promote_types(x.dtype, float32)), then cast the normalised x back to bf16")


# --- rotary embeddings ---------------------------------------------------------------------------------


@pytest.mark.group("norm_rope")
@FEW
@given(t=st.integers(1, 12), head_dim=st.sampled_from([8, 2, 64, 16]), base=st.sampled_from([10000.0, 500000.0, 100.0]),
       far=st.booleans(), draw=st.integers(0, 2**16))
# Positions near 10^5: float32 angles are off by ~1e-2 radians there; t = 1 at position 0 (not rotated).
@example(t=6, head_dim=16, base=10000.0, far=True, draw=0)
@example(t=1, head_dim=8, base=10000.0, far=False, draw=1)
def test_rope_cos_sin(learner, seed, t, head_dim, base, far, draw):
    gen = torch.Generator().manual_seed(seed ^ draw)
    positions = torch.randint(90_000, 100_000, (t,), generator=gen) if far else torch.arange(t)
    cos, sin = learner.module("model").rope_cos_sin(positions, head_dim, base)
    angles = rope_angles(positions, head_dim, base)
    want = torch.cat([angles, angles], -1)
    what = f"rope_cos_sin(positions {positions.tolist()[:4]}{'...' if t > 4 else ''} [{t}], head_dim {head_dim}, base {base:g})"
    half = rope_angles(positions, head_dim, base, exponent=1.0)
    assert_close(cos, want.cos(), **EXACT, dtype=torch.float64, call=what + "[0] (cos)",
                 mistakes={"theta_i = base^(-2i / head_dim): the exponent counts pairs, i < head_dim / 2":
                           torch.cat([half, half], -1).cos(),
                           "the first position is 0 (not rotated): do not add 1": torch.cat(
                               [rope_angles(positions, head_dim, base, offset=1)] * 2, -1).cos(),
                           "both halves hold the same angles: cat([angles, angles]), not each angle twice in a row":
                           angles.repeat_interleave(2, -1).cos()},
                 hint="compute the angles in float64: positions[:, None] * theta (float32 loses ~1e-2 radians at "
                      "position 10^5)")
    assert_close(sin, want.sin(), **EXACT, dtype=torch.float64, call=what + "[1] (sin)")


@pytest.mark.group("norm_rope")
@FEW
@given(b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(1, 9), head_dim=st.sampled_from([8, 2, 16]),
       draw=st.integers(0, 2**16))
@example(b=2, h=3, t=7, head_dim=8, draw=0)
def test_apply_rope_matches_llama(learner, seed, b, h, t, head_dim, draw):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(seed ^ draw)
    q, k = _randn(gen, b, h, t, head_dim), _randn(gen, b, h, t, head_dim)
    positions = torch.randint(0, 50, (t,), generator=gen)
    angles = rope_angles(positions, head_dim, 10000.0)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    apply = learner.module("model").apply_rope
    got_q, got_k = apply(q, cos, sin), apply(k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert_close(got_q, want_q, **EXACT, call=f"apply_rope(q[{b},{h},{t},{head_dim}] float64, cos, sin [{t},{head_dim}])",
                 # The pairs mistake as a learner makes it: neighbouring features rotated, with the
                 # halves-layout cos and sin this function is given.
                 mistakes={"rotate_half([x1, x2]) is [-x2, x1] (the halves, not neighbouring pairs)":
                           q * cos + torch.stack([-q[..., 1::2], q[..., 0::2]], -1).flatten(-2) * sin,
                           "out = x * cos + rotate_half(x) * sin: rotate_half gives [-x2, x1], not [x2, -x1]":
                           rope_reference(q, -angles)})
    assert_close(got_k, want_k, **EXACT, call="apply_rope(k, cos, sin)")


@pytest.mark.group("norm_rope")
def test_apply_rope_bf16_in_float32(learner, torch_gen):
    """bf16 queries, float64 angles at positions up to 4000: computed in float32 and rounded once, as
    the contract says; cos and sin rounded to bf16 first are off by ~4e-3 and shift most values."""
    t, d = 64, 64
    x = torch.randn(2, 2, t, d, generator=torch_gen).to(torch.bfloat16)
    positions = torch.randint(1000, 4000, (t,), generator=torch_gen)
    angles = rope_angles(positions, d, 10000.0)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    got = learner.module("model").apply_rope(x, cos, sin)
    xf = x.float()
    x1, x2 = xf.chunk(2, -1)
    want = (xf * cos.float() + torch.cat([-x2, x1], -1) * sin.float()).to(torch.bfloat16)
    check(isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16 and got.shape == x.shape,
          f"apply_rope(x[2,2,{t},{d}] bf16, float64 cos/sin) gave {getattr(got, 'dtype', type(got))}; expected bf16 "
          "(return x's dtype)")
    differ = (got.float() != want.float()).float().mean().item()
    check(differ <= 0.05, f"apply_rope(x bf16, positions 1000-4000): {differ:.1%} of the values differ from the float32 "
                          "computation rounded once to bf16; expected under 5%.\nHint: cast x, cos and sin to float32 "
                          "(promote_types(x.dtype, float32)) before rotating, and round to bf16 only at the end")


# --- the causal mask, attention, MLP, block ----------------------------------------------------------------


@pytest.mark.group("model")
@pytest.mark.parametrize("start, t", [(0, 5), (4, 3), (7, 1), (0, 1)])
def test_causal_mask_with_offset(learner, start, t):
    got = learner.module("model").causal_mask(start, t)
    want = torch.arange(start + t)[None, :] <= (start + torch.arange(t))[:, None]
    check(isinstance(got, torch.Tensor) and got.dtype == torch.bool and tuple(got.shape) == (t, start + t),
          f"causal_mask({start}, {t}) gave {getattr(got, 'dtype', type(got))} {tuple(getattr(got, 'shape', ()))}; "
          f"expected bool ({t}, {start + t})")
    top_left = torch.ones(t, start + t, dtype=torch.bool).tril()
    hint = ("\nHint: query i sits at position start + i: it sees keys 0 .. start + i (a plain tril() of [t, start + t] "
            "is aligned to the top left, as is SDPA's is_causal: wrong once a cache holds earlier tokens)"
            if start and torch.equal(got, top_left) else "")
    check(torch.equal(got, want), f"causal_mask({start}, {t}) = {got.int().tolist()}; expected {want.int().tolist()}.{hint}")


def _hf_config(cfg):
    c = oracles().llama_config(cfg)
    c._attn_implementation = "sdpa"
    return c


def _exact_norms(module):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    import types

    for m in module.modules():
        if isinstance(m, LlamaRMSNorm):
            m.forward = types.MethodType(oracles()._rms_forward, m)
    return module


def _cos_sin(positions, head_dim, base=10000.0):
    angles = rope_angles(positions, head_dim, base)
    both = torch.cat([angles, angles], -1)
    return both.cos()[None], both.sin()[None]


@pytest.mark.group("model")
@pytest.mark.parametrize("heads, t, shift", [(4, 9, 0), (1, 5, 3), (2, 1, 11)])
def test_attention_matches_llama_attention(learner, seed, heads, t, shift):
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = oracles().gpt_config(n_head=heads, d_model=16)
    torch.manual_seed(seed)
    hf = LlamaAttention(_hf_config(cfg), 0).double().eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, 2, t, 16)
    positions = shift + torch.arange(t)
    model = learner.module("model")
    attn = model.CausalSelfAttention(model.GPTConfig(**cfg))
    attn.to(torch.float64)
    attn.load_state_dict(state)
    got = attn(x, positions)
    with torch.no_grad():
        want = hf(x, position_embeddings=_cos_sin(positions, 16 // heads), attention_mask=None)[0]
    ref = lambda **k: attention_reference(x, state, positions, heads, **k)  # noqa: E731
    mistakes = {"divide the scores by sqrt(head_dim) before the softmax": ref(scale=False),
                "rotate the queries and keys only, not the values": ref(rotate_v=True),
                "rotate q and k with rope_cos_sin(positions) before the scores": ref(rope=False)}
    if t > 1:
        mistakes["mask the later positions: query i sees keys 0 .. i (causal_mask)"] = ref(causal=False)
    assert_close(got, want, **EXACT, mistakes=mistakes,
                 call=f"CausalSelfAttention(d_model 16, {heads} heads)(x[2,{t},16] float64, positions {shift}..{shift + t - 1})",
                 hint="q, k, v as [b, heads, t, head_dim]; RoPE on q and k; softmax(q k^T / sqrt(head_dim) + causal "
                      "mask) v; heads merged back to [b, t, d_model]; o_proj")


@pytest.mark.group("model")
def test_swiglu_and_block_match_llama(learner, seed):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = oracles().gpt_config(d_mlp=40)
    torch.manual_seed(seed)
    hf = _exact_norms(LlamaDecoderLayer(_hf_config(cfg), 0).double().eval())
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        state[name] = 1.0 + 0.3 * _randn(gen, 32)
    hf.load_state_dict(state)
    x = _randn(gen, 2, 6, 32)
    model = learner.module("model")
    mlp = model.SwiGLU(model.GPTConfig(**cfg))
    mlp.to(torch.float64)
    mlp.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})
    w = {k[4:]: v for k, v in state.items() if k.startswith("mlp.")}
    with torch.no_grad():
        assert_close(mlp(x), hf.mlp(x), **EXACT, call="SwiGLU(d_model 32, d_mlp 40)(x[2,6,32] float64)",
                     mistakes={"silu goes on the gate: down(silu(gate(x)) * up(x))":
                               (x @ w["gate_proj.weight"].T * F.silu(x @ w["up_proj.weight"].T)) @ w["down_proj.weight"].T,
                               "SwiGLU uses silu(z) = z * sigmoid(z), not GELU":
                               (F.gelu(x @ w["gate_proj.weight"].T) * (x @ w["up_proj.weight"].T)) @ w["down_proj.weight"].T})
        positions = torch.arange(6)
        block = model.Block(model.GPTConfig(**cfg))
        block.to(torch.float64)
        block.load_state_dict(state)
        out = hf(x, position_embeddings=_cos_sin(positions, 8), attention_mask=None)
        want = out[0] if isinstance(out, tuple) else out
        # Post-norm (the original transformer's order), for the hint.
        a = attention_reference(x, {k[10:]: v for k, v in state.items() if k.startswith("self_attn.")}, positions, 4)
        mid = F.rms_norm(x + a, (32,), state["input_layernorm.weight"], 1e-5)
        post = F.rms_norm(mid + hf.mlp(mid), (32,), state["post_attention_layernorm.weight"], 1e-5)
        assert_close(block(x, positions), want, **EXACT, call="Block(d_model 32, 4 heads)(x[2,6,32] float64, positions 0..5)",
                     mistakes={"pre-norm: x + attn(norm(x)), then x + mlp(norm(x)): the norms go inside the branches":
                               post},
                     hint="x = x + self_attn(input_layernorm(x), positions); x + mlp(post_attention_layernorm(x))")


# --- the whole model -----------------------------------------------------------------------------------------


MODEL_CASES = [dict(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_mlp=48),
               dict(vocab_size=37, d_model=24, n_layer=3, n_head=2, d_mlp=40, rope_base=500.0, norm_eps=1e-6),
               dict(vocab_size=19, d_model=16, n_layer=1, n_head=1, d_mlp=8)]


@pytest.mark.group("model")
@pytest.mark.parametrize("case", range(len(MODEL_CASES)))
def test_logits_match_llama(learner, seed, case):
    o = oracles()
    cfg = o.gpt_config(**MODEL_CASES[case])
    state = o.fresh_weights(cfg, seed + case, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg["vocab_size"], (3, 13), generator=gen)
    gpt = o.learner_gpt(learner, cfg, state)
    got = gpt(idx)
    want = o.logits(o.to_llama(state, cfg), idx)
    assert_close(got, want, **EXACT, call=f"GPT({cfg['n_layer']} layers, d_model {cfg['d_model']}, {cfg['n_head']} heads, "
                 f"vocab {cfg['vocab_size']}, rope_base {cfg['rope_base']:g}, norm_eps {cfg['norm_eps']:g})(idx[3,13]) in "
                 "float64, against LlamaForCausalLM with the same weights",
                 hint="embed_tokens; each block with positions 0..t-1; the final model.norm; lm_head")


@pytest.mark.group("model")
def test_weight_names_and_parameter_count_match_llama(learner, seed):
    """Every weight has Hugging Face's name (the state_dict loads strictly into LlamaForCausalLM), and
    the parameter count is LlamaForCausalLM's (the tied head counted once; the count of each
    parameter's numel comes from your process, the names and shapes from the state_dict)."""
    o = oracles()
    cfg = o.gpt_config(**MODEL_CASES[1])
    gpt = o.learner_gpt(learner, cfg, None, torch.float32)
    state = gpt.state_dict()
    check(isinstance(state, dict), f"GPT(...).state_dict() returned {type(state).__name__}")
    hf = o.to_llama(o.fresh_weights(cfg, seed), cfg, torch.float32, exact=False)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    check(not missing and not extra and not wrong,
          f"GPT's state_dict does not match LlamaForCausalLM's: missing {missing[:4]}, unexpected {extra[:4]}, "
          f"wrong shapes {[(k, got[k], want[k]) for k in wrong[:3]]} (keep the given module names; no biases)")
    counts = learner.harness("parameter_summary", gpt)
    total = sum(n for n, _ in counts.values())
    check(total == hf.num_parameters(),
          f"GPT has {total} parameters; LlamaForCausalLM of the same sizes has {hf.num_parameters()}"
          + (" (the head is counted twice: tie lm_head.weight to model.embed_tokens.weight)"
             if total == hf.num_parameters() + cfg["vocab_size"] * cfg["d_model"] else ""))


@pytest.mark.group("model")
def test_head_is_tied_to_the_embedding(learner, seed):
    """Loaded with a head that differs from the embedding, a tied model holds one tensor under both
    names (the value loaded last), and a gradient step moves both names together."""
    o = oracles()
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, seed, torch.float64)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.5
    gpt = o.learner_gpt(learner, cfg, state)
    after = gpt.state_dict()
    check(torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"]),
          "after load_state_dict with a head different from the embedding, GPT's lm_head.weight and "
          "model.embed_tokens.weight differ: the head is not tied.\nHint: self.lm_head.weight = "
          "self.model.embed_tokens.weight (one Parameter, used twice)")


@pytest.mark.group("init")
def test_initialisation_statistics(learner, seed):
    """Standard deviations from 16k-262k draws each (relative error of the estimate ~1%): 0.02 for
    the embedding and the projections that read the residual stream, 0.02 / sqrt(2 * n_layer) for
    o_proj and down_proj, exactly 1 for the norms; mean 0; normal, not uniform (kurtosis 3, not 1.8)."""
    o = oracles()
    cfg = o.gpt_config(vocab_size=512, d_model=128, n_layer=4, n_head=4, d_mlp=344)
    learner.lib("torch").manual_seed(seed % 2**31)
    state = o.learner_gpt(learner, cfg, None, torch.float32).state_dict()
    small = 0.02 / math.sqrt(2 * 4)
    for name, w in state.items():
        w = w.double()
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            check(torch.equal(w, torch.ones_like(w)), f"initial {name} is not all ones (RMSNorm weights start at 1)")
            continue
        want = small if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")) else 0.02
        std, mean = w.std().item(), w.mean().item()
        kurt = (((w - mean) / std) ** 4).mean().item()
        scaled_hint = (" (the residual projections o_proj and down_proj use init_std / sqrt(2 * n_layer))"
                       if want == small and abs(std - 0.02) < 0.002 else
                       " (only o_proj and down_proj are scaled down)" if want == 0.02 and abs(std - small) < 0.001 else "")
        check(abs(std - want) <= 0.05 * want, f"initial {name} {tuple(w.shape)} has std {std:.5f}; expected {want:.5f}"
                                              + scaled_hint)
        check(abs(mean) <= 5 * want / math.sqrt(w.numel()), f"initial {name} has mean {mean:.2e}; expected ~0")
        check(2.7 <= kurt <= 3.3, f"initial {name} has kurtosis {kurt:.2f}; a normal distribution has 3 "
                                  "(nn.init.normal_, not uniform_)")
