"""Visible tests for Parts A and B. Run: pytest exercises/unit5/test_lora.py"""

import math

import pytest
import torch

from autograder.checks import assert_close, check


def _base(learner, kind, d_in, d_out, gen):
    """A Linear or GPT-2 Conv1D built on your side, with weights chosen here; (layer, W, b)."""
    if kind == "linear":
        layer = learner.lib("torch.nn").Linear(d_in, d_out)
        w = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
    else:
        layer = learner.lib("transformers.pytorch_utils").Conv1D(d_out, d_in)  # weight [d_in, d_out]
        w = torch.randn(d_in, d_out, generator=gen) / math.sqrt(d_in)
    b = torch.randn(d_out, generator=gen) * 0.1
    layer.load_state_dict({"weight": w, "bias": b})
    return layer, w, b


def _with_gradient(learner, model, base_names, x, grad_output):
    """{name: numel} of the parameters of your model that one backward pass (run on your side, with
    an output gradient chosen here) gives a gradient: the trainable ones (requires_grad is read in
    your process). Asked for: every name of your model's state_dict() and of the base model's
    parameters (as named here, with ".base" where a LoRALinear wraps the layer)."""
    keys = list(model.state_dict())

    def yours(name):  # "h.0.attn.c_attn.weight" -> "h.0.attn.c_attn.base.weight" where a LoRALinear wraps the layer
        prefix, _, leaf = name.rpartition(".")
        return name if name in keys else f"{prefix}.base.{leaf}"

    names = list(dict.fromkeys(keys + [yours(n) for n in base_names]))
    out = learner.harness("call_stored", model, [x])
    learner.harness("call_stored", learner.lib("torch").Tensor.backward, [out, grad_output])
    grads = learner.lib("operator").attrgetter(*[f"{n}.grad" for n in names])(model)
    return {n: g.numel() for n, g in zip(names, grads) if g is not None}


def _set_adapter(layer, a, b):
    result = layer.load_state_dict({"lora_A": a, "lora_B": b}, strict=False)
    check(not list(result.unexpected_keys), "LoRALinear must hold its adapters as parameters named lora_A and lora_B")


@pytest.mark.group("lora_layer")
def test_scaling_alpha_over_r(learner):
    lora = learner.module("lora")
    check(lora.lora_scaling(8, 16, False) == 2.0, "lora_scaling(r=8, alpha=16) should be alpha / r = 2")
    check(lora.lora_scaling(4, 8, True) == 4.0, "lora_scaling(r=4, alpha=8, use_rslora=True) should be alpha / sqrt(r) = 4")


@pytest.mark.group("lora_layer")
def test_init_leaves_the_model_unchanged(learner):
    lora = learner.module("lora")
    base, w, b = _base(learner, "linear", 16, 12, torch.Generator().manual_seed(0))
    layer = lora.LoRALinear(base, 4, 8.0)
    a_init, b_init = layer.lora_A, layer.lora_B
    check(tuple(a_init.shape) == (4, 16) and tuple(b_init.shape) == (12, 4),
          f"lora_A should be [r, d_in] = [4, 16] and lora_B [d_out, r] = [12, 4]; got {list(a_init.shape)} and {list(b_init.shape)}")
    check(bool((b_init == 0).all()), "lora_B must start at zero, so the adapted model equals the base model")
    check(bool((a_init.abs() <= 1 / math.sqrt(16)).all()) and float(a_init.abs().max()) > 0,
          "lora_A: kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(d_in), 1/sqrt(d_in))")
    x = torch.randn(3, 16)
    assert_close(layer(x), x @ w.T + b, rtol=1e-6, atol=1e-6, call="LoRALinear(Linear(16, 12), r=4)(x[3,16]) at init")


@pytest.mark.group("lora_layer")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_adds_the_scaled_branch(learner, kind):
    lora = learner.module("lora")
    g = torch.Generator().manual_seed(1)
    base, w, b = _base(learner, kind, 10, 6, g)
    layer = lora.LoRALinear(base, 2, 6.0)
    A, B = torch.randn(2, 10, generator=g), torch.randn(6, 2, generator=g)
    _set_adapter(layer, A, B)
    x = torch.randn(2, 5, 10, generator=g)
    wx = x @ w.T if kind == "linear" else x @ w
    # float32 matmuls over 10 numbers; different association orders differ by ~1e-6.
    assert_close(layer(x), wx + b + (x @ A.T @ B.T) * 3.0, rtol=1e-5, atol=1e-5,
                 call=f"LoRALinear({kind} 10->6, r=2, alpha=6)(x[2,5,10])",
                 mistakes={"scale the update by alpha / r, not alpha": wx + b + (x @ A.T @ B.T) * 6.0})


@pytest.mark.group("lora_layer")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_masks_the_lora_input_only(learner, kind):
    lora = learner.module("lora")
    learner.lib("torch").manual_seed(0)
    g = torch.Generator().manual_seed(5)
    base, w, b = _base(learner, kind, 12, 7, g)
    layer = lora.LoRALinear(base, 3, 3.0, 0.5)
    layer.train()
    x = torch.randn(6, 12, generator=g)
    wx = x @ w.T if kind == "linear" else x @ w
    # B is still zero: whatever dropout does to the LoRA branch, the output is the base layer's.
    assert_close(layer(x), wx + b, rtol=1e-5, atol=1e-5, call=f"LoRALinear({kind} 12->7, r=3, dropout=0.5)(x[6,12]) in train mode, B = 0",
                 hint="dropout applies to the LoRA branch's input only: base(x) + B(A(dropout(x))) * scaling")
    A, B = torch.randn(3, 12, generator=g), torch.randn(7, 3, generator=g)
    _set_adapter(layer, A, B)
    layer.eval()
    assert_close(layer(x), wx + b + x @ A.T @ B.T, rtol=1e-5, atol=1e-5, call=f"LoRALinear({kind}, dropout=0.5)(x[6,12]) in eval mode",
                 mistakes={"scale the update by alpha / r, not alpha": wx + b + 3 * x @ A.T @ B.T},
                 hint="in eval mode dropout does nothing")
    layer.train()
    check(not torch.allclose(layer(x), wx + b + x @ A.T @ B.T, rtol=1e-4, atol=1e-4),
          "in train mode with dropout=0.5 the LoRA branch gave exactly the eval-mode output: is dropout applied to it?")


@pytest.mark.group("merge")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_then_unmerge(learner, kind):
    lora = learner.module("lora")
    g = torch.Generator().manual_seed(2)
    base, w, b = _base(learner, kind, 8, 5, g)
    layer = lora.LoRALinear(base, 3, 3.0)
    A, B = torch.randn(3, 8, generator=g), torch.randn(5, 3, generator=g)
    _set_adapter(layer, A, B)
    x = torch.randn(4, 8, generator=g)
    before = layer(x)
    try:
        layer.merge()
    except RuntimeError as exc:
        if getattr(exc, "is_todo", False):  # a TODO not written yet says so itself
            raise
        check(False, f"merge() of LoRALinear({kind} 8->5, r=3) raised {getattr(exc, 'type_name', type(exc).__name__)}: {exc}"
              + ("\nHint: Conv1D stores its weight as [d_in, d_out]: transpose the update" if kind == "conv1d" else
                 "\nHint: the update (B @ A) * scaling must have base.weight's shape [d_out, d_in]"))
    delta = B @ A if kind == "linear" else (B @ A).T
    assert_close(layer.base.weight, w + delta, rtol=1e-5, atol=1e-6, call=f"base.weight after merge() ({kind})",
                 hint="Conv1D stores its weight as [d_in, d_out]: transpose the update" if kind == "conv1d" else None)
    check(layer.merged is True, "merge() should set self.merged = True")
    # float32: W x + (B A) x versus (W + B A) x round differently, by ~1e-6 here.
    assert_close(layer(x), before, rtol=1e-5, atol=1e-5, call="the merged layer's output")
    layer.merge()
    assert_close(layer.base.weight, w + delta, rtol=1e-5, atol=1e-6, call=f"base.weight after merging twice ({kind})",
                 mistakes={"a second merge() does nothing (check self.merged)": w + 2 * delta})
    layer.unmerge()
    assert_close(layer.base.weight, w, rtol=1e-5, atol=1e-6, call="base.weight after merge() then unmerge()",
                 mistakes={"unmerge is the inverse of merge: W -= (B @ A) * scaling": w + 2 * delta})
    layer.unmerge()
    assert_close(layer.base.weight, w, rtol=1e-5, atol=1e-6, call="base.weight after a second unmerge()",
                 mistakes={"unmerge() of an unmerged layer does nothing (check self.merged)": w - delta})


@pytest.mark.group("inject")
def test_target_matches(learner):
    lora = learner.module("lora")
    cases = [("transformer.h.0.attn.c_attn", ["c_attn"], True), ("c_attn", ["c_attn"], True),
             ("transformer.h.0.attn.c_attn_extra", ["c_attn"], False), ("h.0.xc_attn", ["c_attn"], False),
             ("h.0.attn.c_attn", r".*\.c_attn", True), ("h.0.attn.c_attn", "c_attn", False)]
    for name, targets, want in cases:
        got = lora.target_matches(name, targets)
        check(got == want, f"target_matches({name!r}, {targets!r}) returned {got!r}; peft says {want}")


@pytest.mark.group("inject")
def test_inject_freezes_and_counts(learner):
    lora = learner.module("lora")
    gpt = learner.module("common.gpt")
    config = dict(n_embd=32, n_layer=2, n_head=4)
    model = gpt.GPT(gpt.GPTConfig(**config))
    lora.inject_lora(model, ["c_attn"], 4, 4.0)
    course_gpt = learner.course("common.gpt")  # the course's copy, here: the base model's parameter names
    base_names = [n for n, _ in course_gpt.GPT(course_gpt.GPTConfig(**config)).named_parameters()]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(256, (2, 6), generator=g)
    trainable = _with_gradient(learner, model, base_names, ids, torch.randn(2, 6, 256, generator=g))
    want = {f"transformer.h.{i}.attn.c_attn.lora_{x}": 4 * (32 if x == "A" else 96) for i in range(2) for x in "AB"}
    thawed = sorted(set(trainable) - set(want))
    check(trainable == want, f"after inject_lora(model, ['c_attn'], r=4) exactly the adapters should get a gradient in a "
                             f"backward pass (the trainable parameters): {sorted(want)}; got {len(trainable)} tensors"
                             + (f", among them base parameters {thawed[:3]}" if thawed else f": {sorted(trainable)}")
                             + ("\nHint: inject_lora freezes every parameter of the model first (p.requires_grad_(False)); "
                                "only the adapters it adds train" if thawed else ""))


@pytest.mark.group("inject")
def test_inject_refuses_what_it_cannot_adapt(learner):
    lora = learner.module("lora")
    gpt = learner.module("common.gpt")
    model = gpt.GPT(gpt.GPTConfig(n_embd=32, n_layer=1, n_head=4))
    outcome = "returned without an error"
    try:
        lora.inject_lora(model, ["ln_1"], 4, 4.0)
    except TypeError:
        return
    except Exception as exc:  # noqa: BLE001 - named below
        outcome = f"raised {type(exc).__name__}"
    check(False, f"inject_lora(model, ['ln_1'], r=4) {outcome}; transformer.h.0.ln_1 is a LayerNorm, neither nn.Linear "
                 "nor Conv1D.\nHint: a target that matches a module LoRA cannot adapt raises TypeError (LoRALinear's "
                 "constructor raises it): never skip a match silently")


@pytest.mark.group("adapters_io")
def test_lora_state_dict_holds_only_adapters(learner):
    lora = learner.module("lora")
    gpt = learner.module("common.gpt")
    model = lora.inject_lora(gpt.GPT(gpt.GPTConfig(n_embd=32, n_layer=1, n_head=4)), ["c_fc"], 2, 2.0)
    state = lora.lora_state_dict(model)
    check(sorted(state) == ["transformer.h.0.mlp.c_fc.lora_A", "transformer.h.0.mlp.c_fc.lora_B"],
          f"lora_state_dict should hold exactly the adapter tensors; its keys are {sorted(state)[:6]}")


@pytest.mark.group("performance")
def test_trainable_parameters_per_layer(learner):
    lora = learner.module("lora")
    nn = learner.lib("torch.nn")
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 7))
    lora.inject_lora(model, ["0", "2"], 3, 3.0)
    g = torch.Generator().manual_seed(4)
    grads = _with_gradient(learner, model, ["0.weight", "0.bias", "2.weight", "2.bias"], torch.randn(4, 20, generator=g),
                           torch.randn(4, 7, generator=g))
    trainable = sum(grads.values())
    check(trainable == 3 * (20 + 30) + 3 * (30 + 7),
          f"r * (d_in + d_out) per adapted layer gives {3 * (20 + 30) + 3 * (30 + 7)} trainable parameters; you have {trainable}")
