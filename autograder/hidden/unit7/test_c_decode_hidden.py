"""Hidden tests, Unit 7 Part D: the cached forward against Hugging Face's full-sequence logits
(prefill, chunks of several tokens after a prefix, single tokens), filter_logits against Hugging
Face's Temperature/TopK/TopP warpers (ties at the k-th logit, a nucleus edge that falls exactly on a
token, top_p of 1, the input left unchanged), and generate: greedy against a replay on
LlamaForCausalLM, seeded sampling against a replay with the warpers and the same generator, with
and without a cache, no new tokens, too many."""

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close, check
from autograder.hidden.unit7._common import EXACT, oracles

FEW = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
               phases=[Phase.explicit, Phase.generate])


def _warped(logits, temperature, top_k, top_p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    z = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k is not None:
        z = TopKLogitsWarper(top_k)(None, z)
    if top_p is not None and top_p < 1.0:  # generate() adds no top-p warper at top_p = 1
        z = TopPLogitsWarper(top_p)(None, z)
    return z


# --- the cached forward -----------------------------------------------------------------------------------


@pytest.mark.group("decode")
@pytest.mark.parametrize("chunks", [(5, 1, 1, 1), (4, 3, 2), (1, 1, 1), (7,)])
def test_cached_forward_matches_full_logits(learner, seed, chunks):
    o = oracles()
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, seed, torch.float64)
    idx = torch.randint(0, cfg["vocab_size"], (2, sum(chunks)), generator=torch.Generator().manual_seed(seed))
    want = o.logits(o.to_llama(state, cfg), idx)
    gpt = o.learner_gpt(learner, cfg, state)
    cache = learner.module("cache").ConcatCache(cfg["n_layer"])
    start = 0
    for k, t in enumerate(chunks):
        got = gpt(idx[:, start : start + t], cache=cache)
        what = (f"GPT(idx[:, {start}:{start + t}], cache holding {start} tokens) (chunks {list(chunks)}), float64, against "
                "LlamaForCausalLM on the whole sequence")
        assert_close(got, want[:, start : start + t], **EXACT, call=what,
                     hint="with a cache, positions start at cache.length, the keys and values come from cache.append(layer, "
                          "k, v), the mask is causal_mask(cache.length, t) (not is_causal: it aligns to the top left), and "
                          "cache.advance(t) runs once, after the last block")
        start += t
    length = cache.length
    check(length == sum(chunks), f"after the chunks {list(chunks)} the cache holds length {length}; expected {sum(chunks)}: "
                                 "call cache.advance(t) once per forward pass")


# --- filter_logits -------------------------------------------------------------------------------------------


@pytest.mark.group("decode")
@FEW
@given(rows=st.integers(1, 4), vocab=st.sampled_from([30, 2, 7, 100]), temperature=st.sampled_from([1.0, 0.7, 1.9]),
       top_k=st.sampled_from([None, 1, 5, 200]), top_p=st.sampled_from([None, 0.9, 0.3, 1.0]), draw=st.integers(0, 2**16))
# Both filters at a temperature (top-p after top-k, both after the temperature); k larger than the vocab.
@example(rows=3, vocab=30, temperature=0.7, top_k=5, top_p=0.9, draw=0)
@example(rows=2, vocab=7, temperature=1.9, top_k=200, top_p=0.3, draw=1)
def test_filter_logits_matches_the_warpers(learner, seed, rows, vocab, temperature, top_k, top_p, draw):
    gen = torch.Generator().manual_seed(seed ^ draw)
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    got = learner.module("sample").filter_logits(logits, temperature, top_k, top_p)
    want = _warped(logits, temperature, top_k, top_p)
    what = f"filter_logits(logits[{rows},{vocab}] float64, temperature={temperature}, top_k={top_k}, top_p={top_p})"
    check(isinstance(got, torch.Tensor) and got.shape == want.shape, f"{what} returned {type(got).__name__}")
    kept_got, kept_want = torch.isfinite(got), torch.isfinite(want)
    mistakes = []
    if top_p is not None and top_k is not None and not torch.equal(kept_got, kept_want):
        alt = _warped(logits, 1.0, None, top_p) if temperature != 1.0 else None
        if alt is not None and torch.equal(kept_got, torch.isfinite(alt) & torch.isfinite(_warped(logits, temperature, top_k, None))):
            mistakes.append("divide by the temperature first: top-p measures the probabilities of the scaled logits")
    check(torch.equal(kept_got, kept_want),
          f"{what} keeps {kept_got.sum(-1).tolist()} tokens per row; Hugging Face's warpers keep {kept_want.sum(-1).tolist()} "
          f"(first row: yours {kept_got[0].nonzero().flatten().tolist()[:12]}, theirs {kept_want[0].nonzero().flatten().tolist()[:12]})"
          + "".join(f"\nHint: {m}" for m in mistakes)
          + ("\nHint: top-p keeps the smallest set of most likely tokens whose probability reaches top_p (the most likely "
             "always stays), computed on what top-k left" if not mistakes and top_p is not None else ""))
    assert_close(got[kept_want], want[kept_want], **EXACT, call=what + ": the kept logits",
                 hint="the kept logits are logits / temperature, unchanged otherwise")
    check(bool((got[~kept_want] == float("-inf")).all()), f"{what}: removed logits must be -inf")


@pytest.mark.group("decode")
def test_filter_logits_ties_and_exact_edges(learner):
    """Exact cases: top-k keeps every logit tied with the k-th; four equal logits (and four at -inf)
    have probabilities of exactly 1/4, so that every total is exact: top_p = 0.5 keeps two tokens (the
    first two reach 0.5 exactly), 0.75 keeps three, 0.25 one.  Which of the tied tokens stay is not
    specified: only how many."""
    filt = learner.module("sample").filter_logits
    inf = float("-inf")
    quarter = torch.tensor([[0.0, inf, 0.0, 0.0, inf, inf, 0.0, inf]], dtype=torch.float64)
    cases = [(torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0]], dtype=torch.float64), 2, None, 3),
             (torch.zeros(1, 5, dtype=torch.float64), 3, None, 5),
             (quarter, None, 0.5, 2), (quarter, None, 0.75, 3), (quarter, None, 0.25, 1), (quarter, 3, 0.5, 2)]
    for logits, k, p, count in cases:
        want = _warped(logits, 1.0, k, p)
        check(int(torch.isfinite(want).sum()) == count, "test set-up: the warpers disagree with the case")
        got = filt(logits, 1.0, k, p)
        what = f"filter_logits({logits[0].tolist()}, top_k={k}, top_p={p})"
        kept = int(torch.isfinite(got).sum()) if isinstance(got, torch.Tensor) else got
        subset = isinstance(got, torch.Tensor) and bool((torch.isfinite(got) <= torch.isfinite(logits)).all())
        hint = ("tokens tied with the k-th largest logit stay (remove only logits smaller than it)" if p is None else
                "keep token i while the total probability of the tokens before it is below top_p: a set that reaches "
                "top_p exactly is complete (compare with <, not <=)")
        check(kept == count and subset, f"{what} keeps {kept} tokens; expected {count}.\nHint: {hint}")


@pytest.mark.group("decode")
def test_filter_logits_leaves_its_input_alone(learner, torch_gen):
    """Called on a tensor kept in your process, filter_logits must not write into it."""
    logits = torch.randn(2, 20, generator=torch_gen, dtype=torch.float64)
    kept = learner.harness("call_stored", learner.lib("torch").clone, [logits])
    # temperature 0.7: dividing in place by 1.0 would change nothing and hide the write
    learner.harness("call_stored", learner.module("sample").filter_logits, [kept, 0.7, 3, 0.5])
    after = learner.harness("fetch", kept)
    check(torch.equal(after, logits), "filter_logits changed the logits it was given (in place); return a new tensor "
                                      "(masked_fill, not masked_fill_)")


# --- generate ------------------------------------------------------------------------------------------------


def _replay(hf, prompt, n, temperature=0.0, top_k=None, top_p=None, seed=None):
    """Full forward passes of LlamaForCausalLM, the warpers, and torch.multinomial with the generator."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    tokens = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            last = hf(input_ids=tokens, use_cache=False).logits[:, -1]
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(_warped(last, temperature, top_k, top_p), -1), 1, generator=gen)
            tokens = torch.cat([tokens, nxt], 1)
    return tokens


@pytest.mark.group("decode")
@pytest.mark.parametrize("cached", [True, False])
def test_generate_greedy_and_sampled_match_a_replay(learner, seed, cached):
    o = oracles()
    cfg = o.gpt_config(max_seq_len=40)
    state = o.fresh_weights(cfg, seed, torch.float64)
    # larger logits than at initialisation, so that greedy and sampled continuations are far from ties, and
    # larger attention and MLP outputs, so that the earlier tokens change the next one (at initialisation the
    # residual stream is mostly the current token's embedding: a model fed the last token alone would agree)
    state["model.norm.weight"] = state["model.norm.weight"] * 40
    for name in state:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = state[name] * 30
    hf = o.to_llama(state, cfg)
    prompt = torch.randint(0, cfg["vocab_size"], (3, 4), generator=torch.Generator().manual_seed(seed))
    gpt = o.learner_gpt(learner, cfg, state)
    sample = learner.module("sample")
    what = "with a ConcatCache" if cached else "without a cache"

    def cache():
        return learner.module("cache").ConcatCache(cfg["n_layer"]) if cached else None

    greedy_cache = cache()
    greedy = sample.generate(gpt, prompt, 10, cache=greedy_cache)
    want = _replay(hf, prompt, 10)
    check(isinstance(greedy, torch.Tensor) and greedy.shape == want.shape,
          f"generate(GPT, prompt[3,4], 10, {what}) returned {getattr(greedy, 'shape', type(greedy).__name__)}; expected "
          f"{tuple(want.shape)} (the prompt, then the new tokens)")
    check(torch.equal(greedy, want), f"generate(GPT, prompt[3,4], 10, temperature 0, {what}) gave {greedy[0].tolist()} "
                                     f"(row 0); greedy decoding of LlamaForCausalLM gives {want[0].tolist()}")
    if cached:
        # The last new token is never fed back: a pass after it would be wasted, and would overflow a
        # cache sized for exactly prompt + new tokens (Unit 4's KVCache in `course capstone`).
        length = greedy_cache.length
        check(length == 4 + 10 - 1, f"after generate(GPT, prompt[3,4], 10, with a ConcatCache) the cache holds {length} "
                                    "tokens; expected 13: the prompt's 4, then one pass per new token except the last"
                                    "\nHint: stop after appending the last token, before running the model on it")
    gen = learner.lib("torch").Generator().manual_seed(seed % 2**31)
    sampled = sample.generate(gpt, prompt, 12, temperature=0.8, top_k=20, top_p=0.9, cache=cache(), generator=gen)
    want = _replay(hf, prompt, 12, 0.8, 20, 0.9, seed % 2**31)
    check(torch.equal(sampled, want),
          f"generate(GPT, prompt[3,4], 12, temperature 0.8, top_k 20, top_p 0.9, {what}, seeded generator) gave "
          f"{sampled[0].tolist()} (row 0); a replay with the warpers and one torch.multinomial(probs, 1, generator) draw per "
          f"step gives {want[0].tolist()}")


@pytest.mark.group("decode")
def test_generate_edge_cases(learner, seed):
    o = oracles()
    cfg = o.gpt_config(max_seq_len=12)
    gpt = o.learner_gpt(learner, cfg, o.fresh_weights(cfg, seed, torch.float64))
    sample = learner.module("sample")
    prompt = torch.randint(0, cfg["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(seed))
    same = sample.generate(gpt, prompt, 0, cache=learner.module("cache").ConcatCache(cfg["n_layer"]))
    check(isinstance(same, torch.Tensor) and torch.equal(same, prompt),
          f"generate(GPT, prompt[2,5], max_new_tokens=0) returned {getattr(same, 'shape', same)!r:.80}; expected the prompt")
    full = sample.generate(gpt, prompt, 7)
    check(tuple(full.shape) == (2, 12), f"generate(prompt of 5, 7 new) with max_seq_len 12 gave shape {tuple(full.shape)}")
    with pytest.raises(ValueError):
        sample.generate(gpt, prompt, 8)
