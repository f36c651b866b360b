"""Hidden tests, Part D on a CUDA GPU: bf16 LoRA against a float32 reference, memory of LoRA vs
full fine-tuning (gradients and AdamW state only for the adapters), and the unmerged overhead."""

import time

import pytest
import torch

from autograder.checks import assert_close, check

from autograder.hidden.unit5._models import gpt2_config, peft_model, random_adapters


def _gpt2_pair(learner, seed, dtype, **config):
    """Trusted float32 GPT-2 and the learner's copy on cuda in ``dtype``, same weights."""
    import transformers as tf

    torch.manual_seed(seed)
    trusted = tf.GPT2LMHeadModel(gpt2_config(tf, **config)).eval()
    ltf = learner.lib("transformers")
    theirs = ltf.GPT2LMHeadModel(gpt2_config(ltf, **config))
    theirs.load_state_dict(trusted.state_dict())
    theirs = theirs.to(device="cuda", dtype=dtype)
    theirs.eval()
    return trusted, theirs


@pytest.mark.gpu
@pytest.mark.group("lora_gpu")
def test_bf16_matches_float32_peft(learner, seed, torch_gen):
    lora = learner.module("lora")
    trusted, theirs = _gpt2_pair(learner, seed, torch.bfloat16, n_embd=64)
    lora.inject_lora(theirs, ["c_attn", "c_fc"], 8, 16.0)
    oracle = peft_model(trusted, ["c_attn", "c_fc"], 8, 16.0, True).cuda()
    adapters = random_adapters(oracle, torch_gen)
    theirs.load_state_dict({k: v.to(torch.bfloat16) for k, v in adapters.items()}, strict=False)
    ids = torch.randint(97, (2, 16), generator=torch_gen)
    with torch.no_grad():
        want = oracle(input_ids=ids.cuda()).logits.float().cpu()
    got = theirs(ids.cuda()).logits
    check(got.dtype == torch.bfloat16, f"a bf16 model with LoRA should give bf16 logits, got {got.dtype}")
    # bf16 keeps 8 significant bits: each of ~10 rounded matmuls and LayerNorms adds ~0.4% relative
    # error; logits here are O(1), so 0.1 absolute is a few bf16 ulps of accumulated error, far below
    # the O(1) change a missing or mis-scaled adapter makes.
    assert_close(got.float().cpu(), want, rtol=5e-2, atol=1e-1, call="bf16 GPT-2 with LoRA on cuda: logits vs float32 peft")
    lora.merge_lora(theirs)
    assert_close(theirs(ids.cuda()).logits.float().cpu(), want, rtol=5e-2, atol=1e-1,
                 call="bf16 GPT-2 after merge_lora: logits vs float32 peft",
                 hint="compute B @ A in float32, then round once into the bf16 weight")


@pytest.mark.gpu
@pytest.mark.group("lora_gpu")
def test_lora_training_memory_far_below_full(learner, seed, torch_gen):
    lora = learner.module("lora")
    # 6 blocks of width 1024: ~76M weights (300 MB in float32). Full fine-tuning adds gradients and
    # two AdamW moments for all of them (~900 MB); LoRA adds them only for ~0.6M adapter numbers.
    config = dict(n_embd=1024, n_layer=6, vocab=1024)
    _, full = _gpt2_pair(learner, seed, torch.float32, **config)
    ids = torch.randint(1024, (2, 32), generator=torch_gen).cuda()
    full_peak, _ = learner.harness("cuda_training_peak_memory", full, ids, 2)
    del full
    _, adapted = _gpt2_pair(learner, seed, torch.float32, **config)
    lora.inject_lora(adapted, ["c_attn", "c_proj", "c_fc"], 8, 16.0)
    lora_peak, loss = learner.harness("cuda_training_peak_memory", adapted, ids, 2)
    check(loss == loss, "LoRA training on cuda gave a NaN loss")
    check(lora_peak < 0.25 * full_peak,
          f"two AdamW steps with LoRA peaked at {lora_peak / 2**20:.0f} MiB above the weights; full fine-tuning "
          f"{full_peak / 2**20:.0f} MiB. Gradients and optimizer state should exist only for the adapters: freeze the "
          "base weights and give the optimizer only the parameters that require grad")


@pytest.mark.gpu
@pytest.mark.group("lora_gpu")
def test_merged_and_unmerged_speed_on_gpu(learner, seed, torch_gen):
    lora = learner.module("lora")
    config = dict(n_embd=1024, n_layer=6, vocab=1024, n_positions=256)  # the timed inputs are 256 tokens long
    _, base = _gpt2_pair(learner, seed, torch.bfloat16, **config)
    _, adapted = _gpt2_pair(learner, seed, torch.bfloat16, **config)
    lora.inject_lora(adapted, ["c_attn", "c_proj", "c_fc"], 8, 16.0)
    ltorch = learner.lib("torch")
    getattr_ = learner.lib("builtins").getattr
    ltorch.set_grad_enabled(False)
    try:
        def timed(model, k):
            ids = learner.harness("random_stored", [8, 256], torch.float32, "cuda", seed + k, 150.0)  # |ids| < 1024: 6.8 sigma
            ids = learner.harness("call_stored", ltorch.Tensor.long, [learner.harness("call_stored", ltorch.Tensor.abs, [ids])])
            start = time.perf_counter()
            out = learner.harness("call_stored", model, [ids])
            logits = learner.harness("call_stored", getattr_, [out, "logits"])
            learner.harness("fetch", logits, (slice(None), 0))  # a slice fetched inside the timed window
            return time.perf_counter() - start

        def best(model, offset):
            return min(timed(model, offset + k) for k in range(7))

        for model in (base, adapted):
            best(model, 0)  # warm-up
        base_t, unmerged_t = best(base, 100), best(adapted, 200)
        lora.merge_lora(adapted)
        merged_t, base_again = best(adapted, 300), best(base, 400)
    finally:
        ltorch.set_grad_enabled(True)
    base_t = min(base_t, base_again)
    check(merged_t <= base_t * 1.15,
          f"merged: {merged_t * 1e3:.2f} ms per forward, {merged_t / base_t:.2f}x the base model ({base_t * 1e3:.2f} ms); "
          f"unmerged: {unmerged_t * 1e3:.2f} ms ({unmerged_t / base_t:.2f}x). A merged model should cost what the base costs")
    check(unmerged_t <= base_t * 2.0,
          f"unmerged LoRA: {unmerged_t * 1e3:.2f} ms per forward, {unmerged_t / base_t:.2f}x the base model; two thin matmuls "
          "per layer should add far less than that")
