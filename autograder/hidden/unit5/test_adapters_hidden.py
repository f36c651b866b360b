"""Hidden tests, Part B: saving only the adapters and loading them back into a fresh model
reproduces the adapted model's outputs (peft's, computed here with the same adapters); wrong keys are
refused.  Whether the base stays frozen after loading is read in the learner's process, as which
parameters a backward pass there gives a gradient."""

import pytest
import torch

from autograder.checks import assert_close, check

from autograder.hidden.unit5._models import build_pair, peft_model, random_adapters, received_gradient


def _adapted(learner, seed, gen, targets=("c_attn", "c_fc")):
    """(lora, the learner's adapted GPT-2, the adapters chosen here, vocab, peft's model with them)."""
    lora = learner.module("lora")
    trusted, theirs, vocab = build_pair(learner, "gpt2", seed)
    lora.inject_lora(theirs, list(targets), 4, 8.0)
    oracle = peft_model(trusted, list(targets), 4, 8.0, True)
    adapters = random_adapters(oracle, gen)
    theirs.load_state_dict(adapters, strict=False)
    return lora, theirs, adapters, vocab, oracle


@pytest.mark.group("adapters_io")
def test_state_dict_is_the_adapters_only(learner, seed, torch_gen):
    lora, theirs, adapters, _, _ = _adapted(learner, seed, torch_gen)
    state = lora.lora_state_dict(theirs)
    check(isinstance(state, dict), f"lora_state_dict should return a dict of tensors, got {type(state).__name__}")
    extra = sorted(set(state) - set(adapters))
    check(not extra, f"lora_state_dict saved {len(extra)} tensor(s) that are not adapters, e.g. {extra[:3]}: "
                     "an adapter file holds only lora_A and lora_B (the base model is shipped once, separately)")
    missing = sorted(set(adapters) - set(state))
    check(not missing, f"lora_state_dict lacks {missing[:3]}; keys are '<module name>.lora_A' and '<module name>.lora_B'")
    for key, value in adapters.items():
        assert_close(state[key], value, rtol=0, atol=0, call=f"lora_state_dict(model)[{key!r}]")


@pytest.mark.group("adapters_io")
def test_round_trip_reproduces_outputs_exactly(learner, seed, torch_gen):
    lora, theirs, adapters, vocab, oracle = _adapted(learner, seed, torch_gen)
    state = lora.lora_state_dict(theirs)
    base, fresh, _ = build_pair(learner, "gpt2", seed)
    learner.lib("torch").manual_seed(seed + 1)  # the fresh adapters start from other random values
    lora.inject_lora(fresh, ["c_attn", "c_fc"], 4, 8.0)
    lora.load_lora_state_dict(fresh, state)
    # The adapters arrive bit for bit...
    reloaded = lora.lora_state_dict(fresh)
    for key, value in adapters.items():
        assert_close(reloaded.get(key), value, rtol=0, atol=0, call=f"{key} after load_lora_state_dict",
                     hint="copy every saved tensor into its lora_A / lora_B parameter, in place")
    # ...and so do the outputs: those of peft's model with the same adapters, computed here, up to
    # float32 kernels that pick alignment-dependent SIMD paths in separately allocated models
    # (seen: 1e-5 absolute on logits of size ~1).
    ids = torch.randint(vocab, (3, 10), generator=torch_gen)
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
    # Which mistake: the model the adapters came from (yours, its logits only pick the hint) computing
    # the same wrong logits means the forward is wrong, not the saving or loading.
    assert_close(fresh(ids).logits, want, rtol=1e-4, atol=1e-4,
                 call="a fresh model after inject_lora + load_lora_state_dict(lora_state_dict(trained)), logits on ids[3,10]",
                 mistakes={"the adapters arrived intact and the fresh model computes what the model they came from computes, "
                           "but not what peft computes with them: the forward (base(x) + B(A(x)) * scaling) is wrong, "
                           "see the lora_layer tests": theirs(ids).logits},
                 hint="load every saved tensor into its lora_A / lora_B parameter, in place")
    grads = received_gradient(learner, fresh, [n for n, _ in base.named_parameters()], ids,
                              torch.randn(want.shape, generator=torch_gen))
    thawed = [n for n in grads if ".lora_" not in n]
    check(not thawed, f"after loading adapters, base parameters must stay frozen; a backward pass gave these a gradient: {thawed[:3]}")


@pytest.mark.group("adapters_io")
def test_wrong_keys_are_refused(learner, seed, torch_gen):
    lora, theirs, adapters, _, _ = _adapted(learner, seed, torch_gen)
    state = lora.lora_state_dict(theirs)
    key = sorted(state)[0]
    partial = {k: v for k, v in state.items() if k != key}
    with pytest.raises(KeyError):
        lora.load_lora_state_dict(theirs, partial)
    with pytest.raises(KeyError):
        lora.load_lora_state_dict(theirs, {**state, "transformer.h.0.attn.c_attn.base.weight": torch.zeros(32, 96)})


@pytest.mark.group("adapters_io")
def test_saved_adapters_are_copies(learner, seed, torch_gen):
    """What lora_state_dict returns stays what the adapters were when it was called: the dict is kept
    on your side while the model's adapters change (in place, as an optimizer step changes them), then
    read back.  Live parameters, or detach() without clone(), would follow the model."""
    lora, theirs, adapters, _, _ = _adapted(learner, seed, torch_gen)
    saved = learner.harness("call_stored", lora.lora_state_dict, [theirs])
    later = {k: torch.randn(v.shape, generator=torch_gen) for k, v in adapters.items()}
    theirs.load_state_dict(later, strict=False)  # copies into the parameters in place
    state = learner.harness("fetch", saved)
    check(isinstance(state, dict), f"lora_state_dict should return a dict of tensors, got {type(state).__name__}")
    for key, value in adapters.items():
        assert_close(state.get(key), value, rtol=0, atol=0,
                     call=f"lora_state_dict(model)[{key!r}], read after the model's adapters changed",
                     mistakes={"lora_state_dict returns the live parameters (or detach() without clone()): the saved "
                               "adapters change with the model; save module.lora_A.detach().clone()": later[key]},
                     hint="save copies: module.lora_A.detach().clone()")
    key = sorted(adapters)[0]
    entry = learner.harness("call_stored", learner.lib("operator").itemgetter(key), [saved])
    grad = learner.harness("fetch", learner.harness("call_stored", learner.lib("builtins").getattr, [entry, "requires_grad"]))
    check(grad is False, f"lora_state_dict(model)[{key!r}].requires_grad is {grad!r}: the saved adapters are detached "
                         "copies (detach().clone()), not part of the autograd graph")


@pytest.mark.group("adapters_io")
def test_loading_copies_into_the_parameters(learner, seed, torch_gen):
    """load_lora_state_dict copies each tensor into its parameter in place: a reference to the
    parameter taken (on your side) before loading sees the loaded values, and changing the dict
    that was loaded afterwards (zeroing its tensors, on your side) changes nothing in the model."""
    lora, theirs, adapters, vocab, oracle = _adapted(learner, seed, torch_gen)
    _, fresh, _ = build_pair(learner, "gpt2", seed)
    learner.lib("torch").manual_seed(seed + 2)
    lora.inject_lora(fresh, ["c_attn", "c_fc"], 4, 8.0)
    key = sorted(adapters)[0]
    kept = learner.harness("call_stored", learner.lib("operator").attrgetter(key), [fresh])
    sent = learner.harness("call_stored", learner.lib("builtins").dict, [adapters])
    learner.harness("call_stored", lora.load_lora_state_dict, [fresh, sent])
    assert_close(learner.harness("fetch", kept), adapters[key], rtol=0, atol=0,
                 call=f"the parameter {key} (a reference kept from before load_lora_state_dict) after loading",
                 hint="copy into the existing parameters in place (param.copy_(state[key]) under torch.no_grad()); "
                      "a new Parameter leaves an optimizer that holds the old one training stale tensors")
    zero = learner.lib("torch").Tensor.zero_
    getter = learner.lib("operator").itemgetter
    for name in adapters:
        learner.harness("call_stored", zero, [learner.harness("call_stored", getter(name), [sent])])
    ids = torch.randint(vocab, (2, 10), generator=torch_gen)
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
    # float32, separately allocated models: ~1e-5 absolute on logits of size ~1 (see above).
    assert_close(fresh(ids).logits, want, rtol=1e-4, atol=1e-4,
                 call="logits of a model after load_lora_state_dict(model, state), once the tensors of state were zeroed",
                 hint="load_lora_state_dict must copy the values (param.copy_(...)), not keep the caller's tensors: "
                      "the model changed when the dict it was loaded from did")


@pytest.mark.group("adapters_io")
def test_wrong_shapes_are_refused(learner, seed, torch_gen):
    """A tensor of the wrong shape raises ValueError, also one that would broadcast into the
    parameter (copy_ alone would accept [1, d_in] for an [r, d_in] parameter)."""
    lora, theirs, adapters, _, _ = _adapted(learner, seed, torch_gen)
    key = sorted(k for k in adapters if k.endswith("lora_A"))[0]
    r, d_in = adapters[key].shape
    for shape in ((r + 1, d_in), (1, d_in)):
        bad = {**adapters, key: torch.randn(shape, generator=torch_gen)}
        try:
            lora.load_lora_state_dict(theirs, bad)
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001 - any other outcome is the learner's mistake, named below
            check(False, f"load_lora_state_dict with {key} of shape {list(shape)} (the parameter is [{r}, {d_in}]) raised "
                         f"{type(exc).__name__}; check every shape first and raise ValueError, naming the key and both shapes")
        check(False, f"load_lora_state_dict accepted {key} of shape {list(shape)} for a parameter [{r}, {d_in}]"
                     + (" (copy_ broadcast it)" if shape[0] == 1 else "") + "; check every shape first and raise ValueError")
