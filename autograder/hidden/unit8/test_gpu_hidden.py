"""Hidden tests, Unit 8 part E, on a CUDA GPU: sequence log-probs of a bf16 course GPT for a policy and
a frozen reference on a batch padded on both sides (float32 results against float64 log-softmax of
the same bf16 logits, computed here), the batched call timed against a loop over the sequences run
here on the same GPU in the same test, and the reference's peak CUDA memory against the course's
solution measured here (the learner's figure is taken in the learner's process, around the call)."""

import dataclasses
import statistics
import time

import numpy as np
import pytest
import torch

from autograder.checks import assert_close, check
from autograder.course_code import reference_module

CONFIG = dict(vocab_size=4096, n_positions=512, n_embd=256, n_layer=4, n_head=8)
B, T = 16, 384


def trusted_model(learner, seed):
    gpt = learner.course("common.gpt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 100_000)
        model = gpt.GPT(gpt.GPTConfig(**CONFIG))
    for p in model.parameters():
        if p.dim() > 1:
            p.data.mul_(3.0)
    return model.to(device="cuda", dtype=torch.bfloat16).eval()


def learner_copy(learner, model):
    theirs = learner.module("common.gpt")
    copy = theirs.GPT(theirs.GPTConfig(**dataclasses.asdict(model.config)))
    copy = copy.to(device="cuda", dtype=torch.bfloat16)
    copy.load_state_dict({k: v for k, v in model.state_dict().items()})
    return copy


def padded_batch(rng):
    """Prompts left-padded, responses right-padded (as TRL pads), on the GPU."""
    attention = np.zeros((B, T), dtype=np.float32)
    response = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        p, r = int(rng.integers(16, T // 2)), int(rng.integers(16, T // 2))
        attention[b, T // 2 - p : T // 2 + r] = 1.0
        response[b, T // 2 : T // 2 + r] = 1.0
    ids = torch.tensor(rng.integers(0, CONFIG["vocab_size"], size=(B, T)))
    return ids.cuda(), torch.tensor(attention).cuda(), torch.tensor(response).cuda()


@torch.no_grad()
def expected(model, ids, attention, response):
    """float64 log-softmax of the bf16 logits this model gives for the padded batch (positions and mask
    made here), summed over the response tokens: [B] on the CPU."""
    real = attention > 0
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril() & real[:, None, None, :]
    logits = model(ids, positions=positions, attn_mask=mask)
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    low = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).double()
    scored = response[:, 1:] > 0
    return (torch.where(scored, logp, 0).sum(-1).cpu(), torch.where(scored, low, 0).sum(-1).cpu())


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_bf16_sequence_logprobs_policy_and_reference(learner, rng, seed):
    lp = learner.module("logprobs")
    policy, reference = trusted_model(learner, seed), trusted_model(learner, seed + 1)
    ids, attention, response = padded_batch(rng)
    mine_policy, mine_ref = learner_copy(learner, policy), learner_copy(learner, reference)
    logits = learner.harness("call_stored", lp.model_logits, [mine_policy, ids, attention])  # kept on the GPU there
    got_policy = learner.harness("fetch", learner.harness("call_stored", lp.sequence_logprobs, [logits, ids, response]))
    got_ref = lp.reference_logprobs(mine_ref, ids, attention, response)
    for name, got, model in (("policy: sequence_logprobs(model_logits(...))", got_policy, policy),
                             ("reference_logprobs", got_ref, reference)):
        want, in_bf16 = expected(model, ids, attention, response)
        check(isinstance(got, torch.Tensor) and got.dtype == torch.float32 and tuple(got.shape) == (B,),
              f"{name} on a bf16 GPT [{B},{T}] on cuda gave {getattr(got, 'dtype', type(got))} "
              f"{tuple(getattr(got, 'shape', ()))}; expected float32 ({B},)")
        # sums of ~200 float32 log-probs of the same bf16 logits: ~1e-3; bf16 log-softmax is off by ~0.1-1
        assert_close(got.cpu(), want, rtol=1e-4, atol=0.02, call=f"{name} (bf16 GPT 4 layers, vocab 4096, [{B},{T}] padded both sides, cuda)",
                     mistakes={"upcast the bf16 logits to float32 before log_softmax": in_bf16},
                     hint="the same logits as each row alone (positions from the attention mask, padding keys masked), "
                          "log_softmax in float32, summed over the response tokens")


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_batched_against_a_loop_over_sequences(learner, rng, seed, record_property):
    """The learner's batched reference_logprobs against a loop over the sequences, each alone, run here
    on the same GPU (the course's solution on each unpadded row): wall-clock medians of interleaved runs,
    each with the device synchronised and the result on the host."""
    lp = learner.module("logprobs")
    ref_solution = reference_module("unit8.logprobs")
    reference = trusted_model(learner, seed + 2)
    mine = learner_copy(learner, reference)
    ids, attention, response = padded_batch(rng)
    rows = []
    for b in range(B):
        real = attention[b] > 0
        rows.append((ids[b][real].unsqueeze(0), torch.ones(1, int(real.sum()), device="cuda"), response[b][real].unsqueeze(0)))

    def loop():
        out = torch.stack([ref_solution.reference_logprobs(reference, *row)[0] for row in rows])
        torch.cuda.synchronize()
        return out.cpu()

    def batched():
        return lp.reference_logprobs(mine, ids, attention, response)  # returns on the host: the work is done

    loop(), batched()  # warm-up
    mine_s, loop_s = [], []
    for _ in range(5):
        start = time.perf_counter()
        got = batched()
        mine_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        want = loop()
        loop_s.append(time.perf_counter() - start)
    ours, theirs = statistics.median(mine_s), statistics.median(loop_s)
    record_property("figures", f"batched {ours * 1e3:.1f} ms, loop over {B} sequences {theirs * 1e3:.1f} ms: {theirs / ours:.1f}x")
    assert_close(got.cpu(), want, rtol=1e-3, atol=0.05, call=f"reference_logprobs(bf16 GPT, [{B},{T}] padded) against each row alone")
    # one batched pass: ~4 layers of [16, 384] work in a few ms plus a round trip; the loop: 16 passes of
    # launch-bound kernels (~2 ms each); a per-position loop in token_logprobs costs ~384 x 3 launches
    check(ours * 3 <= theirs, f"reference_logprobs on [{B},{T}] bf16 takes {ours * 1e3:.1f} ms, only {theirs / ours:.1f}x faster "
                              f"than a loop over the {B} sequences one at a time ({theirs * 1e3:.1f} ms, timed here); "
                              "expected at least 3x: one forward for the whole padded batch, one log_softmax and one "
                              "gather, no Python loop over positions or rows")


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_reference_memory(learner, rng, seed, record_property):
    """Peak CUDA memory of reference_logprobs, taken in the learner's process around the call (the only
    place that sees it), against the course's solution measured here on the same batch: a pass with a
    graph keeps every layer's activations (about twice the peak)."""
    lp = learner.module("logprobs")
    ref_solution = reference_module("unit8.logprobs")
    reference = trusted_model(learner, seed + 3)
    mine = learner_copy(learner, reference)
    ids, attention, response = padded_batch(rng)

    def peak_here(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak

    good = peak_here(lambda: ref_solution.reference_logprobs(reference, ids, attention, response))
    with_graph = peak_here(lambda: ref_solution.sequence_logprobs(ref_solution.model_logits(reference, ids, attention), ids, response))
    theirs, _ = learner.harness("cuda_peak_memory", lp.reference_logprobs, [mine, ids, attention, response])
    record_property("figures", f"peak {theirs / 2**20:.0f} MiB (in your process); course solution {good / 2**20:.0f} MiB, "
                               f"with a graph {with_graph / 2**20:.0f} MiB (here)")
    check(theirs <= 1.5 * good + (16 << 20),
          f"reference_logprobs on [{B},{T}] bf16 peaked at {theirs / 2**20:.0f} MiB of CUDA memory (measured in your process); "
          f"the course's solution needs {good / 2**20:.0f} MiB, and a pass that keeps its graph {with_graph / 2**20:.0f} MiB. "
          "Run the reference under torch.no_grad(): no activations are kept for a backward that never comes")
