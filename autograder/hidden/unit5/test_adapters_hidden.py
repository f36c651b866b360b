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
    assert_close(fresh(ids).logits, want, rtol=1e-4, atol=1e-4,
                 call="a fresh model after inject_lora + load_lora_state_dict(lora_state_dict(trained)), logits on ids[3,10]",
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
