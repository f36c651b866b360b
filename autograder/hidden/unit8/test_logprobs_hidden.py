"""Hidden tests, Unit 8 part A: token and sequence log-probs against float64 oracles (the shift, the
response mask, float32 for bf16/fp16 logits, a row whose response starts at the first token,
averages over the scored tokens only), the course GPT on batches padded on the left, the right and
both sides against Hugging Face GPT-2 given the same positions and mask and against each row alone,
the reference's log-probs without a graph (peak memory of the call measured from outside the
worker in a fresh worker, against the bytes a graph would keep, counted here), and, in the learner's
process, that no function changes its arguments."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close, check
from autograder.testing import one_torch_thread


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one torch thread here is several times faster than two on a shared machine."""
    with one_torch_thread():
        yield

SETTINGS = dict(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))


# --- oracles (float64) -------------------------------------------------------------------------------


def every_position(logits, ids, labels_shift=1, logits_shift=0):
    """log p(ids[:, t + 1]) from logits[:, t] for every t, in float64 (the shifts are for the mistakes)."""
    logits = torch.as_tensor(logits).double()
    ids = torch.as_tensor(ids)
    T = ids.shape[1]
    lg = logits[:, logits_shift : logits_shift + T - 1]
    lab = ids[:, labels_shift : labels_shift + T - 1] if labels_shift else ids[:, : T - 1]
    return torch.log_softmax(lg, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)


def token_oracle(logits, ids, response, mask_shift=1, **shifts):
    full = every_position(logits, ids, **shifts)
    r = torch.as_tensor(response)
    m = r[:, 1:] if mask_shift == 1 else (r[:, :-1] if mask_shift == 0 else torch.ones_like(r[:, 1:]))
    return torch.where(m > 0, full, torch.zeros_like(full))


def layout(rng, B, T, min_prompt=1, min_response=1):
    """[B, T] masks: left padding, a prompt, a response, right padding, rows differing."""
    attention = np.zeros((B, T), dtype=np.float32)
    response = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        length = int(rng.integers(min_prompt + min_response, T + 1))
        start = int(rng.integers(0, T - length + 1))
        prompt = int(rng.integers(min_prompt, length - min_response + 1))
        attention[b, start : start + length] = 1.0
        response[b, start + prompt : start + length] = 1.0
    return attention, response


def garbage_logits(rng, B, T, V, scale, response, dtype):
    """Logits whose rows that score no response token hold large finite garbage."""
    z = rng.normal(size=(B, T, V)) * scale
    unused = np.concatenate([response[:, 1:] == 0, np.ones((B, 1), dtype=bool)], axis=1)  # logits[:, t] scores t + 1
    z = np.where(unused[..., None], rng.uniform(-1e3, 1e3, size=(B, T, V)), z)
    return torch.tensor(z, dtype=torch.float64).to(dtype)


# --- A. token_logprobs and sequence_logprobs ------------------------------------------------------------


TOLERANCE = {  # float32 log_softmax over values up to ~60: ~1e-5 absolute; float64 exact to rounding
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=1e-5, atol=1e-4),
}


@pytest.mark.group("token_logprobs")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_against_float64(learner, rng, dtype):
    lp = learner.module("logprobs")
    B, T, V = 5, 11, 23
    attention, response = layout(rng, B, T)
    logits = garbage_logits(rng, B, T, V, 15.0, response, dtype)
    ids = torch.tensor(rng.integers(0, V, size=(B, T)))
    got = lp.token_logprobs(logits, ids, torch.tensor(response))
    want = token_oracle(logits, ids, response)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    mistakes = {"score only the response tokens: 0 where response_mask[:, 1:] is 0": token_oracle(logits, ids, response, mask_shift=None),
                "position t of the logits predicts token t + 1: mask the scored tokens with response_mask[:, 1:], "
                "not response_mask[:, :-1]": token_oracle(logits, ids, response, mask_shift=0),
                "the label of logits[:, t] is input_ids[:, t + 1] (gather input_ids[:, 1:])":
                token_oracle(logits, ids, response, labels_shift=0),
                "the logits that score token t + 1 are logits[:, t]: use logits[:, :-1]":
                token_oracle(logits, ids, response, logits_shift=1)}
    if dtype in (torch.bfloat16, torch.float16):
        low = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()
        mistakes["upcast bf16/fp16 logits to float32 before log_softmax: they keep only 8 or 11 bits"] = \
            torch.where(torch.tensor(response[:, 1:]) > 0, low, torch.zeros_like(low))
    assert_close(got, want, dtype=out, call=f"token_logprobs(logits[{B},{T},{V}] {dtype}, input_ids, response_mask "
                 f"with {int(response.sum())} response tokens; garbage logits where nothing is scored)",
                 mistakes=mistakes, **TOLERANCE[dtype])


@pytest.mark.group("token_logprobs")
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), T=st.integers(2, 9), bool_mask=st.booleans())
@example(seed=0, B=1, T=2, bool_mask=False)  # one prompt token, one response token
@example(seed=5, B=3, T=9, bool_mask=True)
def test_token_and_sequence_logprobs_any_layout(learner, seed, B, T, bool_mask):
    lp = learner.module("logprobs")
    g = np.random.default_rng(seed)
    _, response = layout(g, B, T)
    logits = garbage_logits(g, B, T, 7, 3.0, response, torch.float64)
    ids = torch.tensor(g.integers(0, 7, size=(B, T)))
    mask = torch.tensor(response > 0) if bool_mask else torch.tensor(response)
    call = (f"(logits[{B},{T},7] float64, {mask.dtype} response_mask {response.astype(int).tolist()}) "
            f"(inputs: the test's layout and garbage_logits with np.random.default_rng({seed}))")
    want = token_oracle(logits, ids, response)
    assert_close(lp.token_logprobs(logits, ids, mask), want, rtol=1e-10, atol=1e-10, call="token_logprobs" + call)
    counts = torch.tensor(response[:, 1:].sum(1), dtype=torch.float64)
    assert_close(lp.sequence_logprobs(logits, ids, mask), want.sum(1), rtol=1e-10, atol=1e-10,
                 call="sequence_logprobs" + call, hint="the sum of token_logprobs over positions")
    assert_close(lp.sequence_logprobs(logits, ids, mask, True), want.sum(1) / counts, rtol=1e-10, atol=1e-10,
                 call="sequence_logprobs" + call[:-1] + ", average=True",
                 mistakes={"average=True divides by each row's number of scored response tokens, not by T - 1": want.sum(1) / (T - 1)})


@pytest.mark.group("token_logprobs")
def test_average_counts_only_scored_tokens(learner, rng):
    """A row whose response starts at the very first token (no prompt): that token is never scored,
    so the average divides by the tokens of response_mask[:, 1:] only."""
    lp = learner.module("logprobs")
    logits = torch.tensor(rng.normal(size=(3, 6, 9)))
    ids = torch.tensor(rng.integers(0, 9, size=(3, 6)))
    response = torch.tensor([[1.0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = token_oracle(logits, ids, response)
    scored = response[:, 1:].sum(1)
    got = lp.sequence_logprobs(logits, ids, response, True)
    assert_close(got, want.sum(1) / scored, rtol=1e-10, atol=1e-10,
                 call="sequence_logprobs(logits[3,6,9], ids, response_mask [[1,1,1,1,0,0],[0,0,1,1,1,1],[1,1,1,1,1,1]], average=True)",
                 mistakes={"the first token is never scored: divide by response_mask[:, 1:].sum(-1), not by "
                           "response_mask.sum(-1)": want.sum(1) / response.sum(1)})
    assert_close(lp.token_logprobs(logits, ids, response)[:, 0], want[:, 0], rtol=1e-10, atol=1e-10,
                 call="token_logprobs(...)[:, 0] (scores token 1, a response token in rows 0 and 2)")


# --- A. model_logits on padded batches, against Hugging Face and each row alone -------------------------


CONFIG = dict(vocab_size=29, n_positions=24, n_embd=32, n_layer=2, n_head=4)


def trusted_gpt(learner, seed, **config):
    gpt = learner.course("common.gpt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = gpt.GPT(gpt.GPTConfig(**{**CONFIG, **config}))
    for p in model.parameters():  # larger weights than GPT-2's init, so attention is far from uniform
        p.data.mul_(4.0) if p.dim() > 1 else None
    return model.eval()


def learner_copy(learner, model):
    theirs = learner.module("common.gpt")
    copy = theirs.GPT(theirs.GPTConfig(**learner.course("common.gpt").config_dict(model.config)))
    copy.load_state_dict(model.state_dict())
    return copy


def padded(rng, B, T, V, side):
    """ids and attention_mask [B, T] padded on `side`: left, right, both or none (pad ids random)."""
    attention = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        n = T if side == "none" else int(rng.integers(2, T))
        if b == 0 and side != "none":
            n = T - 1 if side != "both" else T - 2  # at least one row with a single pad (or one each side)
        start = {"left": T - n, "right": 0, "none": 0}.get(side, int(rng.integers(0, T - n + 1)))
        if side == "both" and b == 0:
            start = 1
        attention[b, start : start + n] = 1.0
    ids = torch.tensor(rng.integers(0, V, size=(B, T)))
    return ids, torch.tensor(attention)


def positions_of(attention):
    return (attention.long().cumsum(-1) - 1).clamp(min=0)


@pytest.mark.group("padded_batches")
@pytest.mark.parametrize("side", ["left", "right", "both", "none"])
def test_model_logits_against_hf_and_alone(learner, rng, seed, side):
    lp = learner.module("logprobs")
    model = trusted_gpt(learner, seed)
    ids, attention = padded(rng, 5, 12, CONFIG["vocab_size"], side)
    got = lp.model_logits(learner_copy(learner, model), ids, attention)
    check(isinstance(got, torch.Tensor) and got.shape == (5, 12, CONFIG["vocab_size"]),
          f"model_logits(GPT, ids [5,12], attention_mask) gave {getattr(got, 'shape', type(got))}; expected (5, 12, 29)")
    real = attention > 0
    with torch.no_grad():
        hf = model.to_hf()
        want = hf(input_ids=ids, attention_mask=attention.long(), position_ids=positions_of(attention)).logits
        alone = torch.zeros_like(want)
        for b in range(5):
            alone[b, real[b]] = model(ids[b][real[b]].unsqueeze(0))[0]
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        no_shift = model(ids, attn_mask=causal & real[:, None, None, :])
        no_key_mask = model(ids, positions=positions_of(attention), attn_mask=causal)
    where = lambda x: torch.where(real[..., None], x, torch.zeros_like(x))  # noqa: E731  compare real tokens only
    call = f"model_logits(GPT 2 layers, ids [5,12] padded on the {side}, attention_mask {attention.int().tolist()})"
    # float32, 2 layers: only the order of summation differs (HF's attention kernel, shorter rows alone)
    assert_close(where(got), where(want), rtol=1e-4, atol=1e-4, call=call + " against Hugging Face GPT-2 (position_ids, attention_mask)",
                 mistakes={"positions count real tokens only: positions = cumsum(attention_mask) - 1, so each row's "
                           "first real token is at position 0": where(no_shift),
                           "no query may look at a padding key: attn_mask = causal & attention_mask[:, None, None, :]":
                           where(no_key_mask)})
    assert_close(where(got), where(alone), rtol=1e-4, atol=1e-4, call=call + " against each row alone, without padding")


@pytest.mark.group("padded_batches")
@pytest.mark.parametrize("average", [False, True])
def test_reference_logprobs_against_rows_alone(learner, rng, seed, average):
    lp = learner.module("logprobs")
    model = trusted_gpt(learner, seed + 1)
    B, T = 6, 12
    attention, response = layout(rng, B, T, min_prompt=1, min_response=1)
    ids = torch.tensor(rng.integers(0, CONFIG["vocab_size"], size=(B, T)))
    want = []
    with torch.no_grad():
        for b in range(B):
            real = torch.tensor(attention[b] > 0)
            row = ids[b][real].unsqueeze(0)
            scored = torch.tensor(response[b])[real][1:] > 0
            logp = every_position(model(row), row)[0][scored]
            want.append(logp.sum() / (scored.sum() if average else 1))
    got = lp.reference_logprobs(learner_copy(learner, model), ids, torch.tensor(attention), torch.tensor(response), average)
    assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-4,
                 call=f"reference_logprobs(GPT, ids [{B},{T}] (left and right padding), attention_mask, response_mask, "
                      f"average={average}) against each row alone",
                 hint="sequence_logprobs(model_logits(reference, input_ids, attention_mask), input_ids, response_mask, average)")


def graph_bytes(model, ids, attention):
    """Bytes of the tensors autograd keeps for backward during one forward with gradients (counted
    here, on the trusted side, with saved-tensor hooks): what a reference pass with a graph keeps."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    T = ids.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril() & (attention > 0)[:, None, None, :]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, positions=positions_of(attention), attn_mask=mask)
        torch.log_softmax(logits.float(), -1).sum()
    return total[0]


@pytest.mark.fresh_worker
@pytest.mark.group("padded_batches")
def test_reference_keeps_no_graph(learner, rng, seed, record_property):
    """The reference's pass under no_grad: its peak memory, measured from outside the worker (its cgroup,
    else /proc) in a fresh worker, stays far below what its graph would keep (8 layers of attention
    scores and activations, counted here).  With a graph it is at least that much."""
    model = trusted_gpt(learner, seed + 2, vocab_size=64, n_positions=256, n_embd=64, n_layer=8, n_head=4)
    B, T = 8, 192
    attention, response = layout(rng, B, T, min_prompt=8, min_response=8)
    ids = torch.tensor(rng.integers(0, 64, size=(B, T)))
    attention, response = torch.tensor(attention), torch.tensor(response)
    kept = graph_bytes(model, ids, attention)
    learner.restart()  # a fresh worker: nothing allocated and freed before can hide the peak
    lp = learner.module("logprobs")
    reference = learner_copy(learner, model)
    got, cost = learner.measure(lp.reference_logprobs, reference, ids, attention, response)
    record_property("figures", f"peak {cost.peak_bytes / 2**20:.1f} MiB during the call ({cost.source}); a graph keeps "
                               f"{kept / 2**20:.1f} MiB")
    with torch.no_grad():
        want = torch.stack([every_position(model(ids[b][attention[b] > 0].unsqueeze(0)), ids[b][attention[b] > 0].unsqueeze(0))[0]
                            [response[b][attention[b] > 0][1:] > 0].sum() for b in range(B)])
    assert_close(got, want, rtol=1e-4, atol=1e-3, call=f"reference_logprobs(GPT 8 layers, ids [{B},{T}], masks)")
    # Measured: 6-9 MiB under no_grad (one layer's scores at a time); ~100 MiB with a graph (kept ~95 MiB)
    check(cost.peak_bytes <= 0.4 * kept,
          f"reference_logprobs(GPT 8 layers, ids [{B},{T}]) peaked at {cost.peak_bytes / 2**20:.1f} MiB above its start "
          f"(measured by the grader, {cost.source}); the graph of one forward with gradients keeps {kept / 2**20:.1f} MiB, "
          "and a pass without one needs far less.\nHint: the reference is never trained: run its forward under "
          "torch.no_grad(), so no graph (activations kept for backward) is built for it")


# --- no function changes its arguments (checked in the learner's process) ---------------------------------


def _args_for(name, rng, learner):
    B, T, V = 3, 7, 11
    attention, response = layout(rng, B, T)
    logits = torch.tensor(rng.normal(size=(B, T, V)), dtype=torch.float32)
    ids = torch.tensor(rng.integers(0, V, size=(B, T)))
    if name == "model_logits":
        return ["input_ids", "attention_mask"], [torch.tensor(rng.integers(0, CONFIG["vocab_size"], size=(B, T))),
                                                 torch.tensor(attention)]
    return ["logits", "input_ids", "response_mask"], [logits, ids, torch.tensor(response)]


@pytest.mark.parametrize("name", [pytest.param("token_logprobs", marks=pytest.mark.group("token_logprobs")),
                                  pytest.param("sequence_logprobs", marks=pytest.mark.group("token_logprobs")),
                                  pytest.param("model_logits", marks=pytest.mark.group("padded_batches"))])
def test_arguments_are_left_unchanged(learner, rng, seed, name):
    """Arguments kept in the learner's process, the function called there on them, and what they hold
    afterwards fetched and compared with what was sent (a copy sent back would hide an in-place change)."""
    lp, torch_l = learner.module("logprobs"), learner.lib("torch")
    names, args = _args_for(name, rng, learner)
    kept = [learner.harness("call_stored", torch_l.clone, [a]) for a in args]
    if name == "model_logits":
        model = learner_copy(learner, trusted_gpt(learner, seed))
        learner.harness("call_stored", lp.model_logits, [model, *kept])
    else:
        learner.harness("call_stored", getattr(lp, name), kept)
    for arg_name, sent, held in zip(names, args, kept):
        after = learner.harness("fetch", held)
        same = isinstance(after, torch.Tensor) and after.shape == sent.shape and after.dtype == sent.dtype and torch.equal(after, sent)
        check(same, f"{name}({', '.join(f'{n}={tuple(a.shape)}' for n, a in zip(names, args))}) changed its argument "
                    f"{arg_name!r} in place. The caller reuses it: compute into new tensors (torch.where(mask, x, 0)), "
                    "never x[...] = 0 or x.masked_fill_(...)")
