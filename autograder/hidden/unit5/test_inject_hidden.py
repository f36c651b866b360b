"""Hidden tests, Part B: target matching against peft's own rule, inject_lora on GPT-2 (Conv1D)
and Llama (nn.Linear) against peft.get_peft_model with the same adapters, freezing, parameter counts.

Which parameters are trainable (requires_grad) is state of the learner's process: the tests read it
there, as the gradients one backward pass leaves on the parameters (run there, on ids and an output
gradient chosen here), ask for every parameter of the base model by names made here, count the
trainable numbers from those gradients' shapes, and check the adapters' gradients against peft's,
computed here with the same weights and adapters."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close, check

from autograder.hidden.unit5._models import build_pair, oracle_gradients, peft_model, random_adapters, received_gradient

PARTS = ["h", "0", "1", "attn", "c_attn", "c_attn_extra", "xc_attn", "mlp", "c_proj", "q_proj", "proj", "layers"]
REGEXES = ["c_attn", r".*\.c_attn", r".*attn.*", r"h\.0\..*proj", r".*(q|c)_proj", r"attn", r".*\.\d\.attn"]


@pytest.mark.group("inject")
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(PARTS), min_size=1, max_size=4),
       targets=st.one_of(st.lists(st.sampled_from(PARTS + ["0.attn", "attn.c_attn"]), min_size=1, max_size=3),
                         st.sampled_from(REGEXES)))
# Always tried, whatever the draw: the names where a substring search and a whole-name match differ
# (a regex found inside the name, a list entry inside a longer part) are what the mistakes get wrong.
@example(parts=["h", "0", "attn", "c_attn"], targets="c_attn")
@example(parts=["h", "0", "c_proj", "layers"], targets=r"h\.0\..*proj")
@example(parts=["attn", "c_attn_extra"], targets=["c_attn"])
@example(parts=["layers", "xc_attn"], targets=["c_attn"])
def test_target_matches_like_peft(learner, parts, targets):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    name = ".".join(parts)
    want = bool(check_target_module_exists(LoraConfig(target_modules=targets), name))
    got = learner.module("lora").target_matches(name, targets)
    check(isinstance(got, bool), f"target_matches should return a bool, not {type(got).__name__}")
    rule = ("a string is a regular expression that must match the WHOLE name (re.fullmatch)" if isinstance(targets, str)
            else "a list entry matches a name equal to it or ending in '.' + entry, never a mere substring")
    check(got == want, f"target_matches({name!r}, {targets!r}) returned {got}; peft says {want}: {rule}")


CASES = [
    ("gpt2", ["c_attn", "c_proj"], True, False),
    ("gpt2", r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)", True, True),
    ("llama", ["q_proj", "v_proj", "down_proj"], False, False),
    ("llama", r".*\.self_attn\.(k|o)_proj", False, True),
]


@pytest.mark.group("inject")
@pytest.mark.parametrize("arch,targets,fan_in_fan_out,rslora", CASES, ids=["gpt2-list", "gpt2-regex-rslora", "llama-list", "llama-regex-rslora"])
def test_inject_matches_peft(learner, rng, torch_gen, seed, arch, targets, fan_in_fan_out, rslora):
    lora = learner.module("lora")
    trusted, theirs, vocab = build_pair(learner, arch, seed)
    base_names = [name for name, _ in trusted.named_parameters()]  # before peft wraps the model
    r, alpha = int(rng.choice([2, 4, 8])), float(rng.integers(1, 33))
    returned = lora.inject_lora(theirs, targets, r, alpha, 0.0, rslora)
    check(returned is not None, "inject_lora should return the model it changed in place")
    oracle = peft_model(trusted, targets, r, alpha, fan_in_fan_out, rslora)
    adapters = random_adapters(oracle, torch_gen)
    result = theirs.load_state_dict(adapters, strict=False)
    unexpected = list(result.unexpected_keys)
    call = f"inject_lora({arch}, {targets!r}, r={r}, alpha={alpha:g}, use_rslora={rslora})"
    check(not unexpected, f"{call}: peft adapts {sorted({k.rsplit('.', 1)[0] for k in adapters})}, but your model has no "
                          f"LoRA parameters {unexpected[:3]}...: check which modules you replace")

    ids = torch.randint(vocab, (2, 12), generator=torch_gen)
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
    # float32 with the same weights: only matmul association order may differ (~1e-6 of the logits).
    assert_close(theirs(ids).logits, want, rtol=1e-4, atol=1e-5, call=f"{call}: logits on ids[2,12]",
                 hint="forward is base(x) + B(A(x)) * scaling with A and B as loaded; "
                      + ("GPT-2's Conv1D computes x @ W + b with W [d_in, d_out]" if arch == "gpt2" else ""))

    want_trainable, _ = oracle.get_nb_trainable_parameters()
    grad_output = torch.randn(want.shape, generator=torch_gen)
    mine = received_gradient(learner, theirs, base_names, ids, grad_output)
    check(set(mine) == set(adapters), f"{call}: after a backward pass exactly the adapters {sorted(adapters)[:4]}... should have "
                                      f"gradients; yours are {sorted(mine)[:4]}... ({len(mine)} tensors)"
                                      + (" (freeze every base parameter)" if len(mine) > len(adapters) else ""))
    count = sum(g.numel() for g in mine.values())
    check(count == want_trainable, f"{call}: {count} trainable parameters; peft has {want_trainable}")
    # float32, the same layers as peft's: only association order may differ (0 seen; allowed: 1e-5 of the largest).
    for key, grad in oracle_gradients(oracle, ids, grad_output).items():
        assert_close(mine[key], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()),
                     call=f"{call}: the gradient of {key} (backward of the logits on ids[2,12], output gradient chosen here)",
                     hint="with forward = base(x) + B(A(x)) * scaling and the base frozen, these are peft's gradients")


@pytest.mark.group("inject")
def test_no_match_raises(learner, seed):
    lora = learner.module("lora")
    _, theirs, _ = build_pair(learner, "gpt2", seed)
    with pytest.raises(ValueError):
        lora.inject_lora(theirs, ["query_key_value"], 4, 4.0)


@pytest.mark.group("inject")
def test_frozen_base_gets_no_gradient(learner, rng, seed, torch_gen):
    lora = learner.module("lora")
    trusted, theirs, vocab = build_pair(learner, "gpt2", seed)
    lora.inject_lora(theirs, ["c_fc"], 4, 8.0)
    ids = torch.randint(vocab, (2, 8), generator=torch_gen)
    grads = received_gradient(learner, theirs, [n for n, _ in trusted.named_parameters()], ids,
                              torch.randn(2, 8, vocab, generator=torch_gen))
    thawed = [name for name in grads if ".lora_" not in name]
    check(not thawed, f"after inject_lora, a backward pass gave these base parameters a gradient: {thawed[:4]}; "
                      "freeze all of them (requires_grad_(False))")
    check(len(grads) == 2 * 2, f"two GPT-2 blocks with c_fc adapted have 4 trainable tensors; these got a gradient: {sorted(grads)}")


@pytest.mark.group("performance")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainable_parameters_exactly_r_times_din_plus_dout(learner, rng, seed, torch_gen, arch):
    lora = learner.module("lora")
    trusted, theirs, vocab = build_pair(learner, arch, seed)
    r = int(rng.integers(1, 9))
    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora.inject_lora(theirs, targets, r, 2.0 * r)
    want, per_layer = 0, {}
    for name, module in trusted.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            w = module.weight
            d_in, d_out = (w.shape[0], w.shape[1]) if arch == "gpt2" else (w.shape[1], w.shape[0])
            per_layer[name] = r * (d_in + d_out)
            want += per_layer[name]
    # Trainable = what a backward pass gives a gradient (B = 0 at first: A's gradient is zero, not absent).
    ids = torch.randint(vocab, (2, 8), generator=torch_gen)
    mine = received_gradient(learner, theirs, [n for n, _ in trusted.named_parameters()], ids,
                             torch.randn(2, 8, vocab, generator=torch_gen))
    got = {}
    for name, grad in mine.items():
        got[name.rsplit(".", 1)[0]] = got.get(name.rsplit(".", 1)[0], 0) + grad.numel()
    total = sum(g.numel() for g in mine.values())
    bad = {k: (got.get(k), v) for k, v in per_layer.items() if got.get(k) != v}
    check(not bad and total == want,
          f"each adapted layer trains exactly r * (d_in + d_out) numbers (r={r}); total should be {want}, yours is "
          f"{total}; layers that differ (yours, expected): {dict(list(bad.items())[:3])}")


@pytest.mark.group("inject")
@pytest.mark.parametrize("targets", [["attn"], ["ln_1"], r".*\.mlp(\.c_fc)?"], ids=["attention-block", "layernorm", "regex-mlp"])
def test_target_that_is_not_linear_or_conv1d_raises_type_error(learner, seed, targets):
    """A target that matches a module LoRA cannot adapt (an attention block, a LayerNorm, an MLP
    container) raises TypeError, as LoRALinear (through the given _features) does; peft refuses it
    too.  Skipping it silently would leave the learner believing it was adapted."""
    lora = learner.module("lora")
    _, theirs, _ = build_pair(learner, "gpt2", seed)
    outcome = "returned without an error"
    try:
        lora.inject_lora(theirs, targets, 4, 4.0)
    except TypeError:
        return
    except Exception as exc:  # noqa: BLE001 - named in the message below
        outcome = f"raised {type(exc).__name__}: {str(exc)[:120]}"
    check(False, f"inject_lora(gpt2, {targets!r}, r=4) {outcome}; the target matches GPT-2 modules that are neither "
                 "nn.Linear nor Conv1D (e.g. transformer.h.0." + ("attn" if targets == ["attn"] else "ln_1" if targets == ["ln_1"] else "mlp")
                 + "), which must raise TypeError: wrap every match in LoRALinear (its constructor raises it), never "
                   "skip one silently")


@pytest.mark.group("inject")
def test_inject_passes_dropout_on(learner, rng, seed, torch_gen):
    """inject_lora(..., dropout=p) gives every adapter dropout p: in train mode the logits vary with
    the dropout masks; in eval mode they are peft's (dropout does nothing there)."""
    lora = learner.module("lora")
    learner.lib("torch").manual_seed(int(rng.integers(1 << 30)))
    trusted, theirs, vocab = build_pair(learner, "gpt2", seed)
    lora.inject_lora(theirs, ["c_attn", "c_fc"], 4, 8.0, 0.5)
    oracle = peft_model(trusted, ["c_attn", "c_fc"], 4, 8.0, True)
    adapters = random_adapters(oracle, torch_gen)
    theirs.load_state_dict(adapters, strict=False)
    ids = torch.randint(vocab, (2, 10), generator=torch_gen)
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
    theirs.train()
    train_logits = theirs(ids).logits
    theirs.eval()
    call = "inject_lora(gpt2, ['c_attn', 'c_fc'], r=4, alpha=8, dropout=0.5)"
    # float32, the same layers as peft's: only association order may differ.
    assert_close(theirs(ids).logits, want, rtol=1e-4, atol=1e-5, call=f"{call}, eval mode: logits on ids[2,10]",
                 hint="in eval mode dropout does nothing: the logits are base(x) + B(A(x)) * scaling")
    check(not torch.allclose(train_logits, want, rtol=1e-4, atol=1e-4),
          f"{call}: in train mode the logits equal the eval-mode ones, so no adapter applies dropout: pass dropout on to "
          "every LoRALinear you create")
