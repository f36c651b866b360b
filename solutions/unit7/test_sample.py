"""Visible tests for Unit 7, Part D (decoding). Run: pytest exercises/unit7/test_sample.py"""

import pytest
import torch

from autograder.checks import assert_close, check

EXACT = dict(rtol=1e-9, atol=1e-11)


@pytest.mark.group("decode")
def test_cached_forward_equals_the_full_pass(learner):
    o = learner.course("oracles")
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, 0, torch.float64)
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    want = o.logits(o.to_llama(state, cfg), idx)
    gpt = o.learner_gpt(learner, cfg, state)
    cache = learner.module("cache").ConcatCache(cfg["n_layer"])
    got = [gpt(idx[:, :5], cache=cache), gpt(idx[:, 5:7], cache=cache), gpt(idx[:, 7:], cache=cache)]
    for (a, b), logits in zip([(0, 5), (5, 7), (7, 8)], got):
        assert_close(logits, want[:, a:b], **EXACT, call=f"GPT(idx[:, {a}:{b}], cache holding {a} tokens)",
                     hint="with a cache, positions start at cache.length and the mask is causal_mask(cache.length, t): "
                          "SDPA's is_causal aligns its mask to the top left, wrong once the cache holds tokens")


@pytest.mark.group("decode")
def test_top_k_and_top_p(learner):
    filt = learner.module("sample").filter_logits
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64))
    got = filt(logits, 1.0, None, 0.6)  # sorted 0.4, 0.3 (total 0.7 >= 0.6): keep tokens 1 and 3
    check(torch.isfinite(got).tolist() == [[False, True, False, True]],
          f"filter_logits(log [0.1, 0.4, 0.2, 0.3], top_p=0.6) keeps {torch.isfinite(got).int().tolist()}; expected "
          "[[0, 1, 0, 1]]: the most likely tokens until their total reaches top_p")
    got = filt(torch.tensor([[1.0, 3.0, 2.0, 3.0]], dtype=torch.float64), 2.0, 2, None)
    want = torch.tensor([[float("-inf"), 1.5, float("-inf"), 1.5]], dtype=torch.float64)
    check(torch.equal(got, want), f"filter_logits([1, 3, 2, 3], temperature 2, top_k 2) = {got.tolist()}; expected "
                                  f"{want.tolist()} (divide by the temperature, keep logits >= the k-th largest)")


@pytest.mark.group("decode")
def test_generate_greedy(learner):
    o = learner.course("oracles")
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, 3, torch.float64)
    state["model.norm.weight"] = state["model.norm.weight"] * 40  # sharper logits: no near-ties
    hf = o.to_llama(state, cfg)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    tokens = prompt
    for _ in range(6):
        tokens = torch.cat([tokens, o.logits(hf, tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    gpt = o.learner_gpt(learner, cfg, state)
    sample = learner.module("sample")
    for cache in (None, learner.module("cache").ConcatCache(cfg["n_layer"])):
        got = sample.generate(gpt, prompt, 6, cache=cache)
        check(isinstance(got, torch.Tensor) and torch.equal(got, tokens),
              f"generate(GPT, [[1, 2, 3], [4, 5, 6]], 6, {'with' if cache is not None else 'without'} a cache) gave "
              f"{got.tolist() if isinstance(got, torch.Tensor) else got}; greedy decoding of Llama gives {tokens.tolist()}")
