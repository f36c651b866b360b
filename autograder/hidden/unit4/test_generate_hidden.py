"""Hidden tests, Part B and the performance path: greedy and seeded sampling with and without the
cache, sample_next's distribution (temperature, top-k), a reused cache, batched prompts of different
lengths against Hugging Face one prompt at a time, CPU speed against a baseline timed by the grader,
and on a GPU: batched throughput, memory linear in length, a cache whose storage never moves, and a
decode step captured once as a CUDA graph and replayed for every slot.

Trust boundary: the expected tokens come from the course's own GPT (``learner.course``) or from
Hugging Face, built here with the same weights as the model the learner's functions get; the speed
test compares the CPU time of the learner's call, measured from outside the worker, with a
baseline run and timed here."""

import statistics
import time
import traceback

import numpy as np
import pytest
import torch

from autograder.checks import CheckFailure, assert_close, check
from autograder.client import LearnerError, WorkerDied
from autograder.testing import baseline_cpu_seconds, one_torch_thread

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.fixture(autouse=True)
def one_torch_thread_here():
    """The expected values are small tensor computations on this side: one torch thread for them
    (on a busy machine, torch's threads waiting on each other make them up to 50x slower)."""
    with one_torch_thread():
        yield


def config(rng) -> dict:
    n_head = int(rng.choice([2, 4]))
    return dict(vocab_size=int(rng.integers(50, 120)), n_positions=64, n_embd=8 * n_head,
                n_layer=int(rng.integers(1, 4)), n_head=n_head)


def random_state(shapes: dict, seed: int, scale: float) -> dict:
    """Random weights chosen here, larger than GPT-2's init with scale 0.3 (so that greedy
    continuations vary); the head tied to the token embedding, as in GPT-2."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if "ln" in name and name.endswith("weight"):
            state[name] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            state[name] = (scale if len(shape) > 1 else 0.1) * torch.randn(shape, generator=gen)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def course_models(learner, cfg: dict, seed: int, dtype=torch.float64, scale: float = 0.3, device: str = "cpu"):
    """The course GPT twice, with the same random weights: ``model`` on the learner's side (what the
    learner's functions get) and ``trusted``, the course's own copy built here, which computes every
    expected value and the speed baseline.  Returns (model, trusted, state)."""
    course_gpt = learner.course("common.gpt")
    trusted = course_gpt.GPT(course_gpt.GPTConfig(**cfg))
    state = random_state({k: tuple(v.shape) for k, v in trusted.state_dict().items()}, seed, scale)
    trusted.load_state_dict(state)
    gpt = learner.module("common.gpt")
    model = gpt.GPT(gpt.GPTConfig(**cfg))
    model.load_state_dict(state)
    return model.to(dtype).to(device).eval(), trusted.to(dtype).to(device).eval(), state


@torch.no_grad()
def greedy_full(trusted, idx: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding with no cache, here: every step re-runs the course model over the whole
    sequence.  The expected greedy tokens, and the speed baseline."""
    seq = idx
    for _ in range(new):
        seq = torch.cat([seq, trusted(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def outside_top_k(trusted, seq: torch.Tensor, prompt: int, top_k: int) -> list[tuple[int, int]]:
    """(row, position) of every new token of ``seq`` (after ``prompt`` tokens) that is not among the
    ``top_k`` largest logits the model gives at its place, computed here: a sampled token always is."""
    with torch.no_grad():
        logits = trusted(seq)[:, prompt - 1:-1]
    kth = logits.topk(top_k, dim=-1).values[..., -1]
    chosen = logits.gather(-1, seq[:, prompt:, None])[..., 0]
    bad = (chosen < kth - 1e-9).nonzero().tolist()  # float64 logits: no rounding near the k-th
    return [(row, prompt + i) for row, i in bad]


def hf_model(cfg: dict, state: dict):
    """The oracle: Hugging Face GPT-2 with the same weights, float64 (its Conv1D stores [in, out])."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    activation_function="gelu_new", bos_token_id=None, eos_token_id=None))
    hf = hf.double().eval()  # the dtype first: loading float64 weights into float32 ones rounds them
    hf.load_state_dict({k: (v.t() if k.endswith(CONV1D) else v).double() for k, v in state.items()}, strict=False)
    return hf


def hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    """Hugging Face's greedy continuation of one prompt, alone (no padding)."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False,
                          use_cache=True, pad_token_id=0)
    return out[0].tolist()


def prompt_batch(rng, vocab: int, batch: int, new: int) -> tuple[torch.Tensor, int]:
    prompt = int(rng.integers(1, 12))
    return torch.from_numpy(rng.integers(0, vocab, size=(batch, prompt))), new


def show(x) -> str:
    return str(x.tolist()) if isinstance(x, torch.Tensor) else repr(x)


def call_with_hint(call: str, hint: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an exception the learner's code raises (a TODO or a dead worker
    aside) fails the test with what was called and the hint."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # graded: a LearnerError; in a learner's own run, the exception itself
        todo = getattr(exc, "is_todo", False) or (isinstance(exc, NotImplementedError) and str(exc).startswith("TODO"))
        if todo or isinstance(exc, (WorkerDied, CheckFailure)):
            raise
        if isinstance(exc, LearnerError):
            text = str(exc)  # what was called there, the exception, the learner's line
        else:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            first = (str(exc).strip().splitlines() or [""])[0]
            text = f"your code raised {type(exc).__name__}: {first} at {frame.filename}:{frame.lineno} in {frame.name}"
        lines = text.strip().splitlines()  # its first two lines (torch.compile's errors run long), then the hint
        raise CheckFailure("\n".join([f"{call}: {lines[0][:300]}", *lines[1:2], f"Hint: {hint}"])) from None


# --- generate: greedy and sampling ------------------------------------------------------------

def is_continuation(out, idx: torch.Tensor, new: int) -> bool:
    b, t = idx.shape
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (b, t + new) and torch.equal(out[:, :t], idx)


@pytest.mark.group("generate")
def test_greedy_cached_equals_uncached(learner, rng, seed):
    gen = learner.module("generate")
    cfg = config(rng)
    model, trusted, _ = course_models(learner, cfg, seed)
    idx, new = prompt_batch(rng, cfg["vocab_size"], int(rng.integers(1, 4)), int(rng.integers(1, 30)))
    cached = gen.generate(model, idx, new, use_cache=True)
    plain = gen.generate(model, idx, new, use_cache=False)
    expected = greedy_full(trusted, idx, new)
    b, t = idx.shape
    for out, how in ((cached, "use_cache=True"), (plain, "use_cache=False")):
        check(is_continuation(out, idx, new),
              f"generate(prompt [{b},{t}], {new} new, {how}) must return int64 [{b}, {t + new}]: the prompt, then the "
              f"new tokens; got {show(out)}")
    # float64 model: the cached and the full computation agree to ~1e-14, far below any gap between
    # the top two logits.
    check(torch.equal(plain, expected), f"greedy, float64, use_cache=False: the tokens differ from the full model's "
                                        f"greedy continuation\n  yours    {show(plain)}\n  expected {show(expected)}\n"
                                        "Hint: each step runs the model on everything so far and takes the argmax of "
                                        "the LAST position's logits")
    check(torch.equal(cached, expected), f"greedy, float64: the cached tokens differ from the uncached ones\n"
                                         f"  cached   {show(cached)}\n  uncached {show(expected)} (the full model's)")
    # max_new_tokens=0, the boundary: the prompt comes back as it is, with or without the cache.
    for how in (dict(use_cache=True), dict(use_cache=False), dict(temperature=1.0, top_k=5, seed=seed)):
        call = f"generate(prompt [{b},{t}], max_new_tokens=0, {', '.join(f'{k}={v}' for k, v in how.items())})"
        hint = ("with 0 new tokens nothing is sampled, and a cache of max_len t + 0 holds the prompt exactly "
                "(append accepts length + t == max_len)")
        out = call_with_hint(call, hint, gen.generate, model, idx, 0, **how)
        check(is_continuation(out, idx, 0), f"{call} must return the prompt [{b}, {t}] itself; got {show(out)}\nHint: {hint}")


@pytest.mark.group("generate")
def test_seeded_sampling(learner, rng, seed):
    gen = learner.module("generate")
    cfg = config(rng)
    model, trusted, _ = course_models(learner, cfg, seed)
    idx, new = prompt_batch(rng, cfg["vocab_size"], 2, 24)
    s = int(rng.integers(0, 2**31 - 1))
    temperature, top_k = float(rng.uniform(1.5, 3.0)), int(rng.integers(10, 30))
    first = gen.generate(model, idx, new, temperature=temperature, top_k=top_k, use_cache=True, seed=s)
    what = f"generate(temperature={temperature:.2f}, top_k={top_k}, seed={s})"
    check(is_continuation(first, idx, new), f"{what} on a prompt {list(idx.shape)} must return the prompt, then {new} "
                                            f"new tokens; got {show(first)}")
    # Every sampled token is among the top_k logits of the model (computed here) at its place; a token
    # drawn without the model's logits falls outside them with probability 1 - top_k / vocab each time.
    outside = outside_top_k(trusted, first, idx.shape[1], top_k)
    check(not outside, f"{what}: the token at (row, position) {outside[0] if outside else ''} is not among the model's "
                       f"{top_k} most likely there (the full model, computed by the grader); got {show(first)}\n"
                       "Hint: sample from softmax(logits / T) over the top_k logits of the LAST position")
    again = gen.generate(model, idx, new, temperature=temperature, top_k=top_k, use_cache=True, seed=s)
    plain = gen.generate(model, idx, new, temperature=temperature, top_k=top_k, use_cache=False, seed=s)
    other = gen.generate(model, idx, new, temperature=temperature, top_k=top_k, use_cache=True, seed=s + 1)
    check(torch.equal(first, again), f"{what} twice gave different tokens: make one torch.Generator from the seed "
                                     f"and pass it to every sample_next call")
    check(torch.equal(first, plain), f"{what}: the same seed must give the same tokens with and without the cache "
                                     f"(one sample_next draw per step either way)\n  cached   {show(first)}\n  uncached {show(plain)}")
    check(not torch.equal(first, other), f"{what} and seed={s + 1} gave the same {new} tokens: is the seed used?")


@pytest.mark.group("generate")
def test_top_k_1_and_low_temperature_are_greedy(learner, rng, seed):
    gen = learner.module("generate")
    cfg = config(rng)
    model, trusted, _ = course_models(learner, cfg, seed)
    idx, new = prompt_batch(rng, cfg["vocab_size"], 2, 20)
    greedy = greedy_full(trusted, idx, new)  # the full model's greedy tokens, here
    top1 = gen.generate(model, idx, new, temperature=1.0, top_k=1, seed=seed)
    check(torch.equal(top1, greedy), f"top_k=1 leaves one candidate, so it must give the greedy tokens\n"
                                     f"  top_k=1 {show(top1)}\n  greedy  {show(greedy)}")
    # temperature 1e-6 multiplies the gap between the top two logits by 1e6: a gap of 2e-5 already
    # leaves the runner-up a probability below e^-20.  (1e-4 was not enough: over 40 positions the
    # smallest gap is below 3e-4 in about 1 run of 200, which gave the runner-up a few %; with 1e-6, 0
    # mismatches in 1000 seeds of the reference.)
    cold = call_with_hint(f"generate(prompt {list(idx.shape)}, {new} new, temperature=1e-6, seed={seed})",
                          "logits / 1e-6 are huge: torch.softmax subtracts each row's maximum first; exp() of them "
                          "overflows (inf / inf is NaN)", gen.generate, model, idx, new, temperature=1e-6, seed=seed)
    check(torch.equal(cold, greedy), f"temperature=1e-6 is all but greedy; got {show(cold)}, greedy {show(greedy)}\n"
                                     "Hint: divide the logits by the temperature before the softmax")


def _frequencies(draws: torch.Tensor, vocab: int) -> np.ndarray:
    return np.bincount(draws.numpy().astype(np.int64), minlength=vocab) / len(draws)


def _top_k_rule(logits: torch.Tensor, temperature: float, top_k: int | None) -> np.ndarray:
    """The handout's distribution, here: softmax(logits / T) after every logit below the k-th
    largest is set to -inf (so a logit tied with the k-th stays)."""
    scaled = logits.double() / temperature
    if top_k is not None:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    return torch.softmax(scaled, -1).numpy()


# Each case: temperature, top_k, the 6 logits (shuffled per run), and what it makes visible.
SAMPLE_CASES = {
    # T = 1 exactly: the division changes nothing, yet it samples (only T = 0 is greedy).
    "temperature_1": (1.0, None, [0.0, 0.4, 0.9, 1.5, 2.0, 2.6]),
    "temperature_0.5": (0.5, None, [0.0, 0.4, 0.9, 1.5, 2.0, 2.6]),
    "temperature_2": (2.0, None, [0.0, 0.4, 0.9, 1.5, 2.0, 2.6]),
    "top_k_3": (2.0, 3, [0.0, 0.4, 0.9, 1.5, 2.0, 2.6]),
    # The 2nd largest logit is tied three ways: "below the k-th largest" removes none of them, so
    # four tokens stay (keeping exactly k indices, as topk's indices do, drops two of the three).
    "ties_at_the_kth": (1.0, 2, [0.0, 0.4, 1.5, 1.5, 1.5, 2.6]),
    # Logits near 5000 (float32 spacing there: 5e-4): exp() of them overflows; softmax does not.
    "huge_logits": (0.5, None, [5000.0, 5000.4, 5000.9, 5001.5, 5002.0, 5002.6]),
}


@pytest.mark.group("generate")
@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_next_distribution(learner, rng, case):
    gen = learner.module("generate")
    temperature, top_k, values = SAMPLE_CASES[case]
    vocab, n = len(values), 30000
    logits = torch.from_numpy(rng.permutation(np.array(values))).float()
    expected = _top_k_rule(logits, temperature, top_k)
    # The generator is an object the learner's function needs on its side: built there, seeded here.
    generator_seed = int(rng.integers(0, 2**31 - 1))
    generator = learner.lib("torch").Generator().manual_seed(generator_seed)
    call = (f"sample_next(logits [{n},{vocab}] (every row {[round(v, 1) for v in logits.tolist()]}), "
            f"temperature={temperature}, top_k={top_k}, generator seeded {generator_seed})")
    overflow = "torch.softmax subtracts each row's maximum first; exp() of logits this large overflows (inf / inf is NaN)"
    draws = call_with_hint(call, overflow, gen.sample_next, logits.expand(n, vocab).contiguous(), temperature, top_k,
                           generator) if case == "huge_logits" else \
        gen.sample_next(logits.expand(n, vocab).contiguous(), temperature, top_k, generator)
    check(isinstance(draws, torch.Tensor) and tuple(draws.shape) == (n,) and draws.dtype == torch.int64,
          f"{call} must return int64 [{n}]; got {getattr(draws, 'shape', draws)}")
    got = _frequencies(draws, vocab)
    # 30000 draws: each frequency's standard error is <= 0.003; half the L1 distance (total
    # variation) stays below 0.02 for a right answer, and every mistake below moves it by > 0.1.
    tv = 0.5 * np.abs(got - expected).sum()
    if tv < 0.02:
        return
    kept = int((expected > 0).sum())
    mistakes = {  # what a known mistake draws from, computed here; named when the draws match it
        "divide the logits by the temperature before the softmax": _top_k_rule(logits, 1.0, top_k),
        "with top_k, set every logit below the row's k-th largest to -inf before the softmax":
            _top_k_rule(logits, temperature, None),
        f"temperature {temperature} samples: only temperature 0 is greedy (argmax)": np.eye(vocab)[int(logits.argmax())],
    }
    named = [h for h, p in mistakes.items() if 0.5 * np.abs(got - p).sum() < 0.02 and 0.5 * np.abs(expected - p).sum() > 0.1]
    if top_k is not None and kept > top_k and int((got > 0).sum()) <= top_k:
        named.append(f"a logit equal to the k-th largest (k = {top_k}) stays: remove only those BELOW it "
                     f"(here {kept} tokens tie into the top {top_k}; keeping exactly {top_k} indices drops some)")
    if case == "huge_logits":
        named.append(overflow)
    check(False, f"{call}: frequencies {np.round(got, 3).tolist()}, expected softmax(logits / T) "
                 f"{np.round(expected, 3).tolist()}" + (f" with every logit below the {top_k}-th largest removed" if top_k else "")
                 + f" (total variation {tv:.3f})" + "".join(f"\nHint: {h}" for h in named[:2]))


@pytest.mark.group("generate")
def test_top_k_per_row_with_fewer_rows_than_k(learner, rng):
    """top_k counts candidates along the vocabulary of each row; here k (96) is larger than the
    batch (16 rows), and every row is its own shuffle of 128 close logits."""
    gen = learner.module("generate")
    batch, vocab, top_k = 16, 128, 96
    base = np.linspace(0.0, -0.5, vocab)  # distinct and close: the 96 candidates share the mass about evenly
    logits = torch.from_numpy(np.stack([rng.permutation(base) for _ in range(batch)])).float()
    generator_seed = int(rng.integers(0, 2**31 - 1))
    call = (f"sample_next(logits [{batch},{vocab}], temperature=1.0, top_k={top_k}, generator seeded {generator_seed}) "
            "(each row its own shuffle of linspace(0, -0.5, 128))")
    draws = gen.sample_next(logits, 1.0, top_k, learner.lib("torch").Generator().manual_seed(generator_seed))
    check(isinstance(draws, torch.Tensor) and tuple(draws.shape) == (batch,) and draws.dtype == torch.int64,
          f"{call} must return int64 [{batch}]; got {getattr(draws, 'shape', draws)}")
    check(bool(((draws >= 0) & (draws < vocab)).all()), f"{call} returned token ids {draws.tolist()} outside 0..{vocab - 1}")
    rank = (logits > logits.gather(1, draws[:, None])).sum(1)  # 0: the row's largest logit
    outside = (rank >= top_k).nonzero().flatten().tolist()
    check(not outside, f"{call}: row {outside[:1]} drew a token ranked {int(rank.max())} in its row (0 = its largest "
                       f"logit), outside its top {top_k}; ranks drawn {rank.tolist()}")
    # Each draw lands among its row's 16 largest with probability ~0.19: all 16 there, ~1e-11.
    check(bool((rank >= batch).any()),
          f"{call}: every draw is among the {batch} largest logits of its row (ranks {rank.tolist()}), though "
          f"{top_k} candidates share the mass about evenly.\nHint: top_k counts along the vocabulary (the last "
          f"dimension, logits.shape[-1]), not along the batch")


@pytest.mark.group("generate")
def test_reused_cache_is_reset(learner, rng, seed):
    """A cache passed in, of max_len exactly t + max_new_tokens - 1 (the last new token is never run
    through the model, so that is all generate needs), reused for a second prompt: it must be reset
    first, end exactly filled, and give the full model's greedy tokens both times.  A long
    continuation (over 256 new tokens) on a small model."""
    gen, kv = learner.module("generate"), learner.module("kvcache")
    cfg = dict(config(rng), n_positions=320, n_layer=int(rng.integers(1, 3)))
    model, trusted, _ = course_models(learner, cfg, seed)
    t, new = int(rng.integers(1, 12)), int(rng.integers(260, 300))
    cache = kv.KVCache.for_model(model, 1, t + new - 1)
    for attempt in ("first", "second"):
        idx = torch.from_numpy(rng.integers(0, cfg["vocab_size"], size=(1, t)))
        call = (f"generate(prompt [1,{t}], {new} new, cache=a KVCache of max_len {t + new - 1}) ({attempt} call "
                "with this cache)")
        out = call_with_hint(call, "the last new token is never run through the model, so t + max_new_tokens - 1 "
                                   "slots are enough (append accepts length + t == max_len); and reset() a cache you "
                                   "are given before the prefill", gen.generate, model, idx, new, cache=cache)
        check(cache.length == t + new - 1,
              f"{call}: afterwards the cache holds {cache.length} positions; expected {t + new - 1} (the prompt and "
              f"every new token but the last)\nHint: reset() the cache first, prefill once, then one forward_with_cache "
              "per new token except the last (nobody reads the logits after it)")
        # Greedy, in one pass here: every new token must be the argmax of the full model's logits over the
        # tokens before it (float64: no two logits tie), which makes out the full model's greedy continuation.
        check(is_continuation(out, idx, new), f"{call} must return the prompt, then {new} new tokens; got {show(out)[:200]}")
        with torch.no_grad():
            chosen = trusted(out)[:, t - 1:-1].argmax(-1)
        wrong = (chosen != out[:, t:]).nonzero()[:, 1].tolist()
        check(not wrong, f"{call}: new token {wrong[:1]} is not the full model's greedy choice after the tokens before it "
                         f"(yours {out[0, t + wrong[0]].item() if wrong else ''}, the full model's "
                         f"{chosen[0, wrong[0]].item() if wrong else ''})\nHint: reset() a cache you are given before the prefill")


# --- batched prompts ---------------------------------------------------------------------------

@pytest.mark.group("batched")
def test_left_pad(learner, rng):
    gen = learner.module("generate")
    drawn = [rng.integers(1, 50, size=int(n)).tolist() for n in rng.integers(1, 8, size=4)]
    # Fixed lengths too: a 1-token prompt, one at most half the longest, one more than half; all alike.
    fixed = [[7], [3, 9], [4, 8, 15, 16, 23], [42, 1, 2, 3, 5, 8, 13]]
    for prompts in (drawn, fixed, [[5, 6, 7], [8, 9, 10]]):
        pad = int(rng.integers(50, 60))
        ids, mask = gen.left_pad(prompts, pad)
        longest = max(map(len, prompts))
        want_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
        want_mask = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts])
        check(isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and torch.equal(ids, want_ids),
              f"left_pad({prompts}, pad_id={pad}) ids: got {show(ids)}; expected {want_ids.tolist()} (padding on the LEFT)")
        check(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and torch.equal(mask, want_mask),
              f"left_pad({prompts}, pad_id={pad}) mask: got {show(mask)}; expected {want_mask.int().tolist()} "
              "(bool, True at real tokens)")


def padded_config(rng) -> dict:
    """At least two layers: with one, a padding query whose keys are all masked with -inf gets NaN
    that nothing returned reads; from the second layer on, the NaN keys and values of the padding
    reach every row (0 weight times NaN is NaN)."""
    return dict(config(rng), n_layer=int(rng.integers(2, 4)))


@pytest.mark.group("batched")
def test_forward_with_cache_padding_and_positions(learner, rng, seed):
    """forward_with_cache given a left-padded batch, its key mask and its positions (all made here):
    the prefill, then decode steps, against the course model over the same tokens with the same
    positions and mask.  The prefill is compared at every position, padding rows included: a padding
    query whose keys are all masked gets softmax of a row of finfo.min (uniform), never NaN."""
    kv = learner.module("kvcache")
    cfg = padded_config(rng)
    model, trusted, _ = course_models(learner, cfg, seed)
    longest, new = int(rng.integers(4, 10)), int(rng.integers(2, 6))
    lengths = [1, longest] + rng.integers(1, longest + 1, size=int(rng.integers(1, 3))).tolist()
    batch, total = len(lengths), longest + new
    mask = torch.tensor([[False] * (longest - n) + [True] * n for n in lengths])
    ids = torch.from_numpy(rng.integers(0, cfg["vocab_size"], size=(batch, longest))).masked_fill(~mask, int(rng.integers(0, 50)))
    steps = torch.from_numpy(rng.integers(0, cfg["vocab_size"], size=(batch, new)))
    key_mask = torch.cat([mask, torch.ones(batch, new, dtype=torch.bool)], dim=1)  # [batch, total]
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # each row's real tokens count from 0
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    with torch.no_grad():  # expected, here: the prompt alone, then everything (the steps' rows are all real)
        prefill_mask = causal[:longest, :longest] & mask[:, None, None, :]
        expected_prefill = trusted(ids, positions=positions[:, :longest], attn_mask=prefill_mask)
        expected_steps = trusted(torch.cat([ids, steps], 1), positions=positions, attn_mask=causal & key_mask[:, None, None, :])[:, longest:]
        mistakes = {"pass key_mask on: padding keys must be masked out of every query's attention":
                        trusted(ids, positions=positions[:, :longest]),
                    "use the positions you are given (only positions=None means cache.length + arange(t))":
                        trusted(ids, attn_mask=prefill_mask)}
    what = (f"GPT({cfg['n_layer']} layers, {cfg['n_head']} heads, n_embd {cfg['n_embd']}, float64), prompts of lengths "
            f"{lengths} left-padded to {longest}")
    cache = kv.KVCache.for_model(model, batch, total)
    prefill = kv.forward_with_cache(model, ids, cache, positions=positions[:, :longest], key_mask=key_mask)
    # float64 on both sides: the same operations in another order, ~1e-14.
    assert_close(prefill, expected_prefill, rtol=1e-9, atol=1e-9, mistakes=mistakes,
                 call=f"forward_with_cache(ids [{batch},{longest}], positions=cumsum(mask) - 1 clamped at 0, "
                      f"key_mask [{batch},{total}]) (prefill; {what})",
                 hint="allowed = causal_mask(start, t) & key_mask[:, None, None, :start+t]; positions as given",
                 nan_hint="a padding query has every key masked: fill with torch.finfo(dtype).min, not -inf "
                          "(softmax of a row of -inf is NaN)")
    for i in range(new):
        step = kv.forward_with_cache(model, steps[:, i:i + 1], cache, positions=positions[:, longest + i:longest + i + 1],
                                     key_mask=key_mask)
        assert_close(step, expected_steps[:, i:i + 1], rtol=1e-9, atol=1e-9,
                     call=f"forward_with_cache(token [{batch},1], positions [{batch},1] = each row's count of real tokens, "
                          f"key_mask) (decode step {i + 1} after the prefill; {what})",
                     hint="the key mask hides the padding from decode steps too; positions as given",
                     nan_hint="NaN from the padding reached a real row: fill masked scores with torch.finfo(dtype).min, "
                              "not -inf")


@pytest.mark.group("batched")
def test_batch_rows_match_hugging_face_alone(learner, rng, seed):
    gen = learner.module("generate")
    cfg = padded_config(rng)
    model, _, state = course_models(learner, cfg, seed)
    prompts = [rng.integers(0, cfg["vocab_size"], size=int(n)).tolist() for n in rng.integers(1, 13, size=int(rng.integers(3, 6)))]
    prompts[0] = prompts[0][:1]  # one row mostly padding
    new = int(rng.integers(5, 12))
    rows = gen.generate_batch(model, prompts, new)
    check(isinstance(rows, list) and len(rows) == len(prompts), f"generate_batch returns one list per prompt; got {rows!r}"[:400])
    hf = hf_model(cfg, state)
    for prompt, row in zip(prompts, rows):
        alone = hf_greedy(hf, prompt, new)
        check(list(row) == alone, f"prompt {prompt} in a left-padded batch of {len(prompts)} gave {row};\n"
                                  f"alone (Hugging Face, same weights) it continues as {alone}\n"
                                  "Hint: mask the padding out of attention (key_mask), and count each row's positions "
                                  "from its first real token")
    # max_new_tokens=0, the boundary: every prompt comes back as it is.
    call = f"generate_batch({prompts}, max_new_tokens=0)"
    hint = ("with 0 new tokens nothing is sampled; the cache and the key mask hold the prompt exactly "
            "(append accepts length + t == max_len)")
    rows = call_with_hint(call, hint, gen.generate_batch, model, prompts, 0)
    check(isinstance(rows, list) and [list(r) for r in rows] == prompts,
          f"{call} gave {rows!r}; expected the prompts themselves\nHint: {hint}")


@pytest.mark.group("batched")
def test_pad_id_does_not_matter_and_sampling_is_seeded(learner, rng, seed):
    gen = learner.module("generate")
    cfg = padded_config(rng)
    model, trusted, _ = course_models(learner, cfg, seed)
    prompts = [rng.integers(0, cfg["vocab_size"], size=int(n)).tolist() for n in (1, 9, 4)]
    pad = int(rng.integers(1, cfg["vocab_size"]))
    a = gen.generate_batch(model, prompts, 8, pad_id=0)
    b = gen.generate_batch(model, prompts, 8, pad_id=pad)
    alone = [greedy_full(trusted, torch.tensor([p]), 8)[0].tolist() for p in prompts]  # here, no padding at all
    for rows, pad_id in ((a, 0), (b, pad)):
        check(isinstance(rows, list) and [list(r) for r in rows] == alone,
              f"generate_batch({prompts}, 8 new, pad_id={pad_id}) gave {rows}; each prompt alone (the full model, "
              f"computed by the grader) continues as {alone}: padding tokens are being attended, or counted as positions")
    s = int(rng.integers(0, 2**31 - 1))
    x = gen.generate_batch(model, prompts, 8, temperature=1.0, top_k=10, seed=s)
    check(isinstance(x, list) and len(x) == len(prompts) and all(len(r) == len(p) + 8 for r, p in zip(x, prompts)),
          f"generate_batch(temperature=1.0, top_k=10, seed={s}) must return each prompt then 8 new tokens; got {x!r}"[:400])
    for prompt, row in zip(prompts, x):
        # Each sampled token is among the 10 most likely of the model given the row's own tokens
        # (its prompt and what was sampled before it, no padding), computed here.
        outside = outside_top_k(trusted, torch.tensor([list(row)]), len(prompt), 10)
        check(list(row[:len(prompt)]) == prompt and not outside,
              f"generate_batch(temperature=1.0, top_k=10, seed={s}): row {row} (prompt {prompt}) has tokens outside the "
              f"model's 10 most likely at positions {[p for _, p in outside]}, given that row's own tokens")
    y = gen.generate_batch(model, prompts, 8, temperature=1.0, top_k=10, seed=s)
    check(x == y, f"generate_batch(temperature=1.0, top_k=10, seed={s}) twice gave {x} then {y}")


# --- CPU speed -----------------------------------------------------------------------------------

SPEED_CFG = dict(vocab_size=256, n_positions=512, n_embd=128, n_layer=2, n_head=4)


def greedy_mistakes(trusted, out, idx: torch.Tensor, new: int) -> str:
    """'' when ``out`` is the prompt followed by a greedy continuation of the model (each new token's
    logit, computed here over ``out``, within 1e-4 of the largest: float32, cached and full
    computations differ by ~1e-6); else what is wrong."""
    if not is_continuation(out, idx, new):
        return f"it returned {show(out)[:100]}, not the prompt [1, {idx.shape[1]}] then {new} new tokens"
    with torch.no_grad():
        logits = trusted(out)[:, idx.shape[1] - 1:-1]
    gap = logits.max(-1).values - logits.gather(-1, out[:, idx.shape[1]:, None])[..., 0]
    if gap.max() > 1e-4:
        return (f"token {int(gap.argmax()) + 1} of the {new} new ones is not the model's greedy choice (its logit is "
                f"{float(gap.max()):.3g} below the largest)")
    return ""


@pytest.mark.group("speed")
def test_cached_decode_speed_and_flat_per_token_time(learner, rng, seed, record_property):
    """The CPU time of your cached generate (greedy, 1 torch thread), measured by the grader from
    outside your process (every process and thread of it counts), against a baseline that the
    grader runs and times itself: the course model re-run over the whole sequence for every token,
    same weights, one thread.  Also: the cached time per token stays flat from 64 to 256 tokens."""
    gen = learner.module("generate")
    model, trusted, _ = course_models(learner, SPEED_CFG, seed, torch.float32, scale=0.02)
    torch_there = learner.lib("torch")
    threads = torch_there.get_num_threads()
    # One intra-op thread on both sides: on a shared machine, threads that wait on each other make the
    # many small ops of a decode step erratic (and their spinning would count as your CPU time).
    torch_there.set_num_threads(1)
    cpu = {("cached", 64): [], ("cached", 256): [], ("baseline", 256): []}
    try:
        with learner.time_limit(120):
            gen.generate(model, torch.zeros(1, 16, dtype=torch.long), 8)  # warm-up
            for k in range(3):  # interleaved: every variant sees the same machine load
                for (kind, new), seconds in cpu.items():
                    if kind == "baseline" and k == 2:
                        continue  # the slow baseline twice is enough for its minimum
                    idx = torch.from_numpy(rng.integers(0, 256, size=(1, 16)))  # fresh input per call
                    if kind == "baseline":
                        seconds.append(baseline_cpu_seconds(lambda idx=idx, new=new: greedy_full(trusted, idx, new))[1])
                        continue
                    out, cost = learner.measure(gen.generate, model, idx, new)
                    wrong = greedy_mistakes(trusted, out, idx, new)
                    check(not wrong, f"generate(prompt [1,16], {new} new, greedy, use_cache=True): {wrong}")
                    seconds.append(cost.cpu_seconds)
    finally:
        torch_there.set_num_threads(threads)
    # Minima: interference (other processes, the machine's load) only ever adds CPU time.
    best = {key: min(v) for key, v in cpu.items()}
    speedup = best[("baseline", 256)] / best[("cached", 256)]
    per_token_growth = (best[("cached", 256)] / 256) / (best[("cached", 64)] / 64)
    figures = (f"256 new tokens: {best[('cached', 256)] * 1e3:.0f} ms CPU cached, {best[('baseline', 256)] * 1e3:.0f} ms "
               f"CPU for the grader's uncached baseline ({speedup:.1f}x); cached per token: "
               f"{best[('cached', 64)] / 64 * 1e3:.2f} ms at 64 new tokens, {best[('cached', 256)] / 256 * 1e3:.2f} ms at 256")
    record_property("figures", figures)
    # CPU seconds, one thread each side (minimum of 3 calls, of 2 baseline runs).  Measured: the
    # solution 5.4-5.7x in the sandboxed worker; no cache (the whole sequence re-run per token, as the
    # baseline does) 0.8-0.95x.  2.5x sits a factor ~2.2 below the first and ~2.6 above the second
    # (their geometric middle); CPU burners the learner's code starts count against it and only lower
    # its ratio, load elsewhere changes neither CPU time much.
    check(speedup >= 2.5, f"{figures}: the cached decode must be at least 2.5x faster than the uncached baseline")
    # Cached: per-token time ~flat (growth 0.95-1.07 measured); recomputing everything grows 2.2-2.4x
    # from 64 to 256 tokens.  A constant overhead per call would flatten the growth, but it only adds to
    # the 256-token time that the check above compares with the baseline: together they cannot pass.
    check(per_token_growth <= 1.75, f"{figures}: per-token time grew {per_token_growth:.2f}x from 64 to 256 tokens; "
                                    "with a cache each step costs about the same")


# --- GPU -------------------------------------------------------------------------------------------

GPU_CFG = dict(vocab_size=512, n_positions=1024, n_embd=256, n_layer=4, n_head=4)


def _gpu_models(learner, seed):
    """(the learner's model, the trusted copy), both on the GPU with the same weights."""
    return course_models(learner, GPU_CFG, seed, torch.float32, scale=0.02, device="cuda")[:2]


def _gpu_model(learner, seed):
    return _gpu_models(learner, seed)[0]


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_batched_decode_throughput(learner, rng, seed, record_property):
    gen = learner.module("generate")
    model = _gpu_model(learner, seed)
    new, prompt = 128, 16

    def tokens_per_second(batch: int) -> float:
        times = []
        for _ in range(3):
            idx = torch.from_numpy(rng.integers(0, 512, size=(batch, prompt))).cuda()
            start = time.perf_counter()
            out = learner.harness("call_synchronized", gen.generate, [model, idx, new])
            times.append(time.perf_counter() - start)
            check(tuple(out.shape) == (batch, prompt + new) and out.is_cuda,
                  f"generate on cuda, batch {batch}: expected a cuda tensor [{batch}, {prompt + new}], got {show(out)[:80]}")
        return batch * new / statistics.median(times)

    with learner.time_limit(120):
        tokens_per_second(1)  # warm-up: kernels, allocator
        rates = {b: tokens_per_second(b) for b in (1, 8, 32)}
    weight_bytes = 4 * sum(numel for numel, _ in learner.harness("parameter_summary", model).values())
    ceiling = learner.harness("copy_bandwidth")  # the same GPU; only the report shows it, nothing is graded on it

    def read_fraction(batch: int) -> float:
        # Bytes one decode step reads: every weight once, plus the filled cache at its mean length.
        cache_bytes = 2 * GPU_CFG["n_layer"] * batch * GPU_CFG["n_embd"] * 4 * (prompt + new // 2)
        return (weight_bytes + cache_bytes) * (rates[batch] / batch) / ceiling

    figures = ", ".join(f"batch {b}: {r:,.0f} tokens/s ({read_fraction(b):.1%} of the copy bandwidth)"
                        for b, r in rates.items())
    record_property("figures", f"{figures}; device copy bandwidth {ceiling / 1e9:,.0f} GB/s")
    # A small model's decode step is bound by launch overhead and weight reads, not by the batch:
    # batch 32 gives ~20-30x the tokens/s of batch 1; a per-row Python loop gives ~1x.
    check(rates[32] >= 8 * rates[1] and rates[8] >= 3 * rates[1],
          f"{figures}: decoding a batch must cost about one step per token for all rows together")


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_peak_memory_grows_linearly(learner, rng, seed):
    gen = learner.module("generate")
    model = _gpu_model(learner, seed)
    batch, prompt = 16, 16
    idx = torch.from_numpy(rng.integers(0, 512, size=(batch, prompt))).cuda()
    peaks = {}
    with learner.time_limit(120):
        for new in (128, 256, 512):
            peaks[new], out = learner.harness("cuda_peak_memory", gen.generate, [model, idx, new])
    per_token = 2 * GPU_CFG["n_layer"] * GPU_CFG["n_embd"] * 4 * batch  # k and v, every layer, float32, every row
    first, second = peaks[256] - peaks[128], peaks[512] - peaks[256]
    figures = ", ".join(f"{n} new tokens: {p / 2**20:.1f} MiB" for n, p in peaks.items())
    # Linear: doubling the added length doubles the added memory (allocator rounding: +-25%); the cache
    # itself is per_token bytes per position, and a cache grown by torch.cat holds two copies at once.
    check(1.5 <= second / max(first, 1) <= 2.5,
          f"peak memory {figures}: from 256 to 512 it grew {second / max(first, 1):.2f}x as much as from 128 to 256; "
          "a preallocated cache grows linearly with length (about 2x here)")
    check(second <= 2.5 * per_token * 256,
          f"peak memory {figures}: 256 more positions cost {second / 2**20:.1f} MiB; the cache needs "
          f"{per_token * 256 / 2**20:.1f} MiB for them; do not keep copies of the cache or the full score matrix")


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_static_cache_and_matching_logits(learner, rng, seed):
    kv = learner.module("kvcache")
    model, trusted = _gpu_models(learner, seed)
    batch, total = 8, 48
    idx = torch.from_numpy(rng.integers(0, 512, size=(batch, total))).cuda()
    cache = kv.KVCache.for_model(model, batch, total)
    before = learner.harness("data_ptrs", cache, ["k", "v"])
    prefill = kv.forward_with_cache(model, idx[:, :32], cache)
    steps = [kv.forward_with_cache(model, idx[:, i:i + 1], cache) for i in range(32, total)]
    after = learner.harness("data_ptrs", cache, ["k", "v"])
    check(before == after, "on cuda, cache.k / cache.v moved during decoding: a static (preallocated) cache keeps "
                           "its addresses, which CUDA graphs and torch.compile(mode='reduce-overhead') rely on")
    with torch.no_grad():
        full = trusted(idx)  # the full model, here, on the same GPU
    got = torch.cat([prefill, *steps], dim=1).cpu()
    # float32 on the GPU (TF32 off by default for matmuls): reductions in another order, ~1e-5 relative.
    from autograder.checks import assert_close

    assert_close(got, full.cpu(), rtol=1e-3, atol=1e-4, call=f"forward_with_cache on cuda, batch {batch}: prefill 32, then 16 steps")


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_decode_step_replayed_as_a_cuda_graph(learner, rng, seed):
    kv = learner.module("kvcache")
    model, trusted = _gpu_models(learner, seed)
    batch, prompt, total = 8, 12, 40
    idx = torch.from_numpy(rng.integers(0, 512, size=(batch, total))).cuda()
    cache = kv.KVCache.for_model(model, batch, total)
    before = learner.harness("data_ptrs", cache, ["k", "v"])
    eager = [kv.decode_step(model, idx[:, i:i + 1], cache, torch.tensor([i], device="cuda")) for i in range(prompt)]
    with learner.time_limit(120):
        replayed = learner.harness("cuda_graph_decode", kv.decode_step, model, cache, idx[:, prompt:], prompt)
    check(learner.harness("data_ptrs", cache, ["k", "v"]) == before,
          "cache.k / cache.v moved: a CUDA graph replays reads and writes at the addresses it captured")
    with torch.no_grad():
        full = trusted(idx).cpu()  # the full model, here, on the same GPU
    from autograder.checks import assert_close

    # float32 on the GPU: the same reductions as the eager step, another order than model(idx): ~1e-5.
    got = torch.cat([*eager, replayed], dim=1).cpu()
    assert_close(got, full, rtol=1e-3, atol=1e-4,
                 call=f"decode_step captured once in a CUDA graph at slot {prompt}, replayed for slots {prompt}..{total - 1} "
                      f"(batch {batch}; slots 0..{prompt - 1} eager)",
                 hint="only tensors may change between replays: the token and the slot; a Python number read from "
                      "them (or cache.length) is frozen at its captured value")
