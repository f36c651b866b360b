"""Visible tests for Unit 8. Run: pytest exercises/unit8"""

import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one torch thread here is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _models(learner, seed, config=None, n=1):
    """n course GPTs made here (seeded), and a copy of each on your side loaded with their weights."""
    gpt = learner.course("common.gpt")
    config = config or gpt.GPTConfig(vocab_size=16, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    theirs = learner.module("common.gpt")
    pairs = []
    for k in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            mine = gpt.GPT(config)
        copy = theirs.GPT(theirs.GPTConfig(**gpt.config_dict(config)))
        copy.load_state_dict(mine.state_dict())
        pairs.append((mine, copy))
    return pairs


def _gathered(logits, ids):
    """log p(ids[:, t + 1]) from logits[:, t], float64, every position."""
    return torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


# --- A. token and sequence log-probs ----------------------------------------------------------------


@pytest.mark.group("token_logprobs")
def test_token_logprobs_shift_and_response_mask(learner):
    lp = learner.module("logprobs")
    logits = torch.randn(2, 5, 7, generator=_gen(0), dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])  # prompt, response, (right) padding
    got = lp.token_logprobs(logits, ids, response)
    every = _gathered(logits, ids)
    want = torch.where(response[:, 1:] > 0, every, torch.zeros_like(every))
    assert_close(got, want, rtol=1e-12, atol=1e-12,
                 call="token_logprobs(logits[2,5,7] float64, ids [[1,2,3,4,5],[6,5,4,3,2]], response_mask [[0,0,1,1,1],[0,0,0,1,0]])",
                 mistakes={"score only the response tokens: 0 where response_mask[:, 1:] is 0 (the prompt is given, not "
                           "generated)": every,
                           "position t of the logits predicts token t + 1: the mask of the scored tokens is "
                           "response_mask[:, 1:], not response_mask[:, :-1]":
                           torch.where(response[:, :-1] > 0, every, torch.zeros_like(every))},
                 hint="log_softmax(logits[:, :-1]) gathered at input_ids[:, 1:], 0 where response_mask[:, 1:] is 0")


@pytest.mark.group("token_logprobs")
def test_token_logprobs_bf16_in_float32(learner):
    lp = learner.module("logprobs")
    logits = (torch.randn(2, 6, 50, generator=_gen(1)) * 20).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 6), generator=_gen(2))
    response = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    got = lp.token_logprobs(logits, ids, response)
    mask = response[:, 1:] > 0
    want = torch.where(mask, _gathered(logits, ids), torch.zeros(2, 5, dtype=torch.float64))
    in_bf16 = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()
    # float32 over 50 exactly-representable bf16 values of size <= ~80: error ~1e-5; bf16 keeps 8 bits
    assert_close(got, want, rtol=1e-5, atol=1e-4, dtype=torch.float32, call="token_logprobs(bf16 logits [2,6,50])",
                 mistakes={"upcast bf16 logits to float32 before log_softmax: bf16 keeps only 8 bits":
                           torch.where(mask, in_bf16, torch.zeros_like(in_bf16))})


@pytest.mark.group("token_logprobs")
def test_sequence_logprobs_sum_and_average(learner):
    lp = learner.module("logprobs")
    logits = torch.randn(3, 6, 9, generator=_gen(3), dtype=torch.float64)
    ids = torch.randint(0, 9, (3, 6), generator=_gen(4))
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0]])
    every = torch.where(response[:, 1:] > 0, _gathered(logits, ids), torch.zeros(3, 5, dtype=torch.float64))
    total = every.sum(1)
    assert_close(lp.sequence_logprobs(logits, ids, response), total, rtol=1e-12, atol=1e-12,
                 call="sequence_logprobs(logits[3,6,9], ids, response_mask with 4, 1 and 2 response tokens)",
                 hint="the sum of token_logprobs over positions")
    assert_close(lp.sequence_logprobs(logits, ids, response, True), total / torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64),
                 rtol=1e-12, atol=1e-12, call="sequence_logprobs(..., average=True)",
                 mistakes={"average=True divides by the number of response tokens of each row, not by the sequence "
                           "length": total / 5},
                 hint="average=True divides each row's sum by its number of response tokens")


# --- A. padded batches and the reference -------------------------------------------------------------


def _padded_batch():
    """Rows padded on the left, on the right, on both sides, and not at all (PAD = 13)."""
    rows = [([0, 0, 3, 1, 4, 1, 5], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]),
            ([2, 7, 1, 8, 13, 13, 13], [1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]),
            ([13, 9, 2, 6, 5, 13, 13], [0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0]),
            ([3, 5, 8, 9, 7, 9, 3], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1])]
    ids, attention, response = (torch.tensor([r[k] for r in rows]) for k in range(3))
    return ids, attention.float(), response.float()


@pytest.mark.group("padded_batches")
def test_model_logits_padding_on_either_side(learner):
    lp = learner.module("logprobs")
    (mine, theirs), = _models(learner, 10)
    ids, attention, _ = _padded_batch()
    got = lp.model_logits(theirs, ids, attention)
    check(isinstance(got, torch.Tensor) and got.shape == (4, 7, 16),
          f"model_logits(GPT, ids [4,7], attention_mask) gave {getattr(got, 'shape', type(got))}; expected (4, 7, 16)")
    with torch.no_grad():
        for row in range(4):
            real = attention[row] > 0
            alone = mine(ids[row][real].unsqueeze(0))[0]  # the row without its padding, computed here
            assert_close(got[row][real], alone, rtol=1e-4, atol=1e-5,
                         call=f"model_logits(...) row {row} (attention_mask {attention[row].int().tolist()}) at its real tokens",
                         hint="each row must get the logits it gets alone: positions = cumsum(attention_mask) - 1 "
                              "(the first real token at position 0), and no query may look at a padding key")


@pytest.mark.group("padded_batches")
def test_reference_logprobs(learner):
    lp = learner.module("logprobs")
    (mine, theirs), = _models(learner, 11)
    ids, attention, response = _padded_batch()
    with torch.no_grad():
        want = []
        for row in range(4):
            real = attention[row] > 0
            logits = mine(ids[row][real].unsqueeze(0))
            scored = response[row][real][1:] > 0
            want.append(_gathered(logits, ids[row][real].unsqueeze(0))[0][scored].sum())
    got = lp.reference_logprobs(theirs, ids, attention, response)
    assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5, call="reference_logprobs(GPT, padded batch of 4 rows)",
                 hint="sequence_logprobs(model_logits(reference, input_ids, attention_mask), input_ids, response_mask)")


# --- B. the DPO loss family ----------------------------------------------------------------------------


def _logps(values):
    return [torch.tensor(v, dtype=torch.float64) for v in values]


@pytest.mark.group("dpo_loss")
def test_dpo_loss_is_log2_at_zero_margin(learner):
    dpo = learner.module("dpo")
    pc, pr, rc, rr = _logps([[-3.0, -7.5], [-4.0, -2.0], [-3.0, -7.5], [-4.0, -2.0]])  # policy == reference
    for beta, smoothing in ((0.1, 0.0), (0.5, 0.0), (0.1, 0.2)):
        losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta, "sigmoid", smoothing)
        assert_close(losses, torch.full((2,), math.log(2.0), dtype=torch.float64), rtol=1e-12,
                     call=f"dpo_loss(policy == reference, beta={beta}, label_smoothing={smoothing})",
                     hint="at zero margin z = 0 and the loss is -log sigmoid(0) = log 2, for any beta and label smoothing")
        assert_close(chosen, torch.zeros(2, dtype=torch.float64), atol=1e-12, call="dpo_loss(...)[1] (chosen rewards) at zero margin",
                     hint="the implicit reward is beta * (policy_chosen - ref_chosen)")


@pytest.mark.group("dpo_loss")
def test_dpo_loss_by_hand(learner):
    dpo = learner.module("dpo")
    pc, pr, rc, rr = _logps([[-2.0, -6.0], [-5.0, -3.0], [-3.0, -5.0], [-4.0, -4.0]])
    beta = 0.5
    h = (pc - rc) - (pr - rr)  # [2.0, -2.0]
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta)
    assert_close(losses, -F.logsigmoid(beta * h), rtol=1e-10, call="dpo_loss(pc, pr, rc, rr, beta=0.5) (margins h = [2, -2])",
                 mistakes={"beta multiplies the margin: z = beta * h, not h / beta": -F.logsigmoid(h / beta),
                           "chosen and rejected are swapped: h = (policy_chosen - ref_chosen) - (policy_rejected - "
                           "ref_rejected)": -F.logsigmoid(-beta * h),
                           "label smoothing eps weighs the flipped pair: -(1 - eps) logsigmoid(z) - eps logsigmoid(-z), "
                           "so eps = 0 is plain DPO": -F.logsigmoid(-beta * h)})
    assert_close(chosen, beta * (pc - rc), rtol=1e-12, call="dpo_loss(...)[1] (chosen rewards)")
    assert_close(rejected, beta * (pr - rr), rtol=1e-12, call="dpo_loss(...)[2] (rejected rewards)")


@pytest.mark.group("dpo_loss")
def test_dpo_gradient_direction(learner):
    """Minimising the loss raises the chosen log-prob and lowers the rejected one."""
    dpo = learner.module("dpo")
    pc, pr, rc, rr = _logps([[-2.0], [-5.0], [-3.0], [-4.0]])
    _, grads = learner.harness("value_and_grad", dpo.dpo_loss, [pc, pr, rc, rr, 0.1], [0, 1], pick=0)
    check(all(g is not None for g in grads), "no gradient reached the policy log-probs from the loss")
    z = 0.1 * 2.0
    # d/dz of -log sigmoid(z) is -sigmoid(-z); z = beta * (pc - pr - ...)
    assert_close(grads[0], torch.tensor([-0.1 * torch.sigmoid(torch.tensor(-z)).item()], dtype=torch.float64), rtol=1e-9,
                 call="d loss / d policy_chosen_logps", hint="the gradient pushes the chosen log-prob up: -beta * sigmoid(-z)")
    assert_close(grads[1], -grads[0], rtol=1e-9, call="d loss / d policy_rejected_logps",
                 hint="the gradient pushes the rejected log-prob down: +beta * sigmoid(-z)")


@pytest.mark.group("dpo_loss")
def test_ipo_simpo_and_label_smoothing_by_hand(learner):
    dpo = learner.module("dpo")
    pc, pr, rc, rr = _logps([[-1.0], [-2.5], [-1.5], [-2.0]])  # h = 0.5 - (-0.5) = 1.0; policy margin 1.5
    losses = dpo.dpo_loss(pc, pr, rc, rr, 0.25, "ipo")[0]
    assert_close(losses, torch.tensor([(1.0 - 2.0) ** 2], dtype=torch.float64), rtol=1e-12,
                 call="dpo_loss(..., beta=0.25, loss_type='ipo') (h = 1)",
                 hint="IPO: (h - 1 / (2 beta))^2, here (1 - 2)^2")
    losses, chosen, _ = dpo.dpo_loss(pc, pr, rc, rr, 2.0, "simpo", 0.0, 1.0)
    assert_close(losses, -F.logsigmoid(torch.tensor([2.0 * 1.5 - 1.0], dtype=torch.float64)), rtol=1e-12,
                 call="dpo_loss(..., beta=2, loss_type='simpo', gamma=1) (policy margin 1.5)",
                 hint="SimPO has no reference: z = beta * (policy_chosen - policy_rejected) - gamma")
    assert_close(chosen, 2.0 * pc, rtol=1e-12, call="dpo_loss(..., 'simpo')[1] (chosen rewards)",
                 hint="SimPO's implicit reward is beta * policy_chosen_logps (no reference)")
    losses = dpo.dpo_loss(pc, pr, rc, rr, 1.0, "sigmoid", 0.25)[0]
    z = torch.tensor([1.0], dtype=torch.float64)
    assert_close(losses, -0.75 * F.logsigmoid(z) - 0.25 * F.logsigmoid(-z), rtol=1e-12,
                 call="dpo_loss(..., beta=1, label_smoothing=0.25) (h = 1)",
                 mistakes={"label smoothing eps weighs the flipped pair: -(1 - eps) logsigmoid(z) - eps logsigmoid(-z)":
                           -0.25 * F.logsigmoid(z) - 0.75 * F.logsigmoid(-z)})


@pytest.mark.group("dpo_metrics")
def test_preference_stats_ties_are_not_wins(learner):
    dpo = learner.module("dpo")
    chosen = torch.tensor([0.5, 0.2, -0.1, 0.3], dtype=torch.float64)
    rejected = torch.tensor([0.1, 0.2, 0.4, -0.3], dtype=torch.float64)  # a win, a tie, a loss, a win
    stats = dpo.preference_stats(chosen, rejected)
    want = {"accuracy": 0.5, "margin": 0.125, "chosen": 0.225, "rejected": 0.1}
    check(isinstance(stats, dict) and set(want) <= set(stats),
          f"preference_stats returned {stats!r}; expected a dict with {sorted(want)}")
    for key, value in want.items():
        assert_close(stats[key], value, rtol=1e-6, atol=1e-7,
                     call=f"preference_stats(chosen {chosen.tolist()}, rejected {rejected.tolist()})[{key!r}]",
                     mistakes={"a tie is not a win: accuracy counts chosen > rejected, strictly": 0.75} if key == "accuracy" else None)


# --- C. GRPO ------------------------------------------------------------------------------------------


@pytest.mark.group("grpo_advantages")
def test_group_advantages_by_hand(learner):
    grpo = learner.module("grpo")
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 9.0])  # two groups of 4
    got = grpo.group_advantages(rewards, 4)
    first = torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (math.sqrt(1 / 3) + 1e-4)
    second = torch.tensor([-1.0, -1.0, -1.0, 3.0]) / (2.0 + 1e-4)
    everywhere = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    group_mean = torch.tensor([0.5] * 4 + [6.0] * 4)
    group_std = torch.tensor([math.sqrt(1 / 3)] * 4 + [2.0] * 4)
    assert_close(got, torch.cat([first, second]), rtol=1e-5, atol=1e-6,
                 call="group_advantages([1,0,0,1, 5,5,5,9], group_size=4)",
                 mistakes={"the mean and the std are taken within each group of group_size consecutive rewards, not "
                           "over the whole batch": everywhere,
                           "the std is taken within each group (its own rewards), not over the whole batch":
                           (rewards - group_mean) / (rewards.std() + 1e-4),
                           "the mean is taken within each group (its own rewards), not over the whole batch":
                           (rewards - rewards.mean()) / (group_std + 1e-4),
                           "the std of a group uses Bessel's correction (torch.std's default)":
                           torch.cat([torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-4),
                                      torch.tensor([-1.0, -1.0, -1.0, 3.0]) / (math.sqrt(3.0) + 1e-4)]),
                           "eps keeps the division finite: divide by (std + eps), not by the std alone":
                           torch.cat([torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / math.sqrt(1 / 3),
                                      torch.tensor([-1.0, -1.0, -1.0, 3.0]) / 2.0])},
                 hint="A = (r - mean of the group) / (std of the group + eps)")
    assert_close(grpo.group_advantages(rewards, 4, False), torch.tensor([0.5, -0.5, -0.5, 0.5, -1.0, -1.0, -1.0, 3.0]),
                 atol=1e-6, call="group_advantages(..., scale_rewards=False)", hint="without scaling, A = r - mean of the group")


@pytest.mark.group("grpo_advantages")
def test_equal_rewards_give_zero_advantages(learner):
    grpo = learner.module("grpo")
    got = grpo.group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3)
    assert_close(got, torch.zeros(6), atol=0.0, call="group_advantages([1,1,1, 0,0,0], group_size=3)",
                 nan_hint="a group whose rewards are all equal has std 0: divide by (std + eps), so its advantages are 0",
                 hint="a group whose rewards are all equal has nothing to learn from: its advantages are 0")


@pytest.mark.group("grpo_loss")
def test_per_token_kl_k3(learner):
    grpo = learner.module("grpo")
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -1.0, -1.5]], dtype=torch.float64)
    d = ref - logp
    assert_close(grpo.per_token_kl(logp, ref), d.exp() - d - 1, rtol=1e-12, atol=1e-15,
                 call="per_token_kl(logp [[-1,-2,-.5]], logp_ref [[-1,-1,-1.5]])",
                 mistakes={"k3 uses the log-ratio of the reference to the policy: exp(logp_ref - logp) - (logp_ref - logp) - 1":
                           (-d).exp() + d - 1, "k3, not k1: exp(d) - d - 1 with d = logp_ref - logp": -d},
                 hint="k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1")


@pytest.mark.group("grpo_loss")
def test_clipped_token_loss_by_hand(learner):
    """Ratios 0.5, 1 and 1.5 (clip_eps 0.2) for a sequence with advantage +1 and one with -1."""
    grpo = learner.module("grpo")
    r = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]], dtype=torch.float64)
    new = old + r.log()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    got, grads = learner.harness("value_and_grad", grpo.clipped_token_loss, [new, old, adv, 0.2], [0])
    a = adv[:, None]
    want = torch.max(-a * r, -a * r.clamp(0.8, 1.2))  # [[-0.5, -1, -1.2], [0.8, 1, 1.5]]
    assert_close(got, want, rtol=1e-9, atol=1e-12,
                 call="clipped_token_loss(logp, logp_old with ratios [[.5,1,1.5],[.5,1,1.5]], advantages [1, -1], clip_eps=0.2)",
                 mistakes={"the loss is max(-A r, -A clip(r)): the pessimistic bound (min of the objectives)":
                           torch.min(-a * r, -a * r.clamp(0.8, 1.2)),
                           "ratio = exp(logp - logp_old), not exp(logp_old - logp)":
                           torch.max(-a / r, -a * (1 / r).clamp(0.8, 1.2))},
                 hint="ratio = exp(logp - logp_old); loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))")
    check(grads[0] is not None, "no gradient reaches logp from clipped_token_loss (is the ratio detached?)")
    # unclipped: d(-A r)/d logp = -A r; clipped the way the advantage pushes (A > 0, r = 1.5; A < 0, r = 0.5): 0
    assert_close(grads[0], torch.tensor([[-0.5, -1.0, 0.0], [0.0, 1.0, 1.5]], dtype=torch.float64), rtol=1e-9, atol=1e-12,
                 call="d clipped_token_loss / d logp",
                 hint="a token whose ratio is clipped in the direction its advantage pushes gets a gradient of exactly 0")


@pytest.mark.group("grpo_loss")
def test_grpo_loss_aggregations_by_hand(learner):
    """Two sequences of 1 and 3 tokens, at ratio 1 and without the KL term: the per-token loss is -A."""
    grpo = learner.module("grpo")
    logp = torch.full((2, 3), -1.0, dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    seq, _ = grpo.grpo_loss(logp, logp.clone(), logp.clone(), adv, mask, 0.2, 0.0, "sequence")
    tok, _ = grpo.grpo_loss(logp, logp.clone(), logp.clone(), adv, mask, 0.2, 0.0, "token")
    # per sequence first: mean(-2, 1) = -0.5; over all tokens: (-2 + 1 + 1 + 1) / 4 = 0.25
    assert_close(seq, torch.tensor(-0.5, dtype=torch.float64), rtol=1e-12, call="grpo_loss(..., aggregation='sequence')",
                 mistakes={"'sequence' averages each sequence's tokens first, then the sequences": torch.tensor(0.25)})
    assert_close(tok, torch.tensor(0.25, dtype=torch.float64), rtol=1e-12, call="grpo_loss(..., aggregation='token')",
                 mistakes={"'token' averages over all response tokens of the batch at once": torch.tensor(-0.5)})


# --- D. steps and end to end -------------------------------------------------------------------------


@pytest.mark.group("steps")
def test_dpo_step_trains_the_policy_only(learner):
    dpo, torch_l, tasks = learner.module("dpo"), learner.lib("torch"), learner.course("tasks")
    (_, policy), (_, reference) = _models(learner, 20, n=2)
    before_policy, before_ref = policy.state_dict(), reference.state_dict()
    batch = tasks.collate_pairs(tasks.make_preference_rows(0, 8))  # made here
    stats = dpo.dpo_step(policy, reference, torch_l.optim.Adam(policy.parameters(), lr=1e-2), batch, dpo.DPOConfig())
    check(isinstance(stats, dict) and {"loss", "accuracy", "margin", "chosen", "rejected"} <= set(stats),
          f"dpo_step returned {stats!r}; expected a dict with 'loss', 'accuracy', 'margin', 'chosen', 'rejected'")
    after_policy, after_ref = policy.state_dict(), reference.state_dict()
    check(any(not torch.equal(before_policy[k], after_policy[k]) for k in before_policy), "dpo_step did not change the policy")
    check(all(torch.equal(before_ref[k], after_ref[k]) for k in before_ref), "dpo_step changed the reference's weights")
    # the first step's loss, from the two models made here, one unpadded sequence at a time
    (mine_policy, _), (mine_ref, _) = _models(learner, 20, n=2)
    rows = tasks.make_preference_rows(0, 8)
    h = torch.tensor([(tasks.response_logprob(mine_policy, r["prompt"], r["chosen"])[0]
                       - tasks.response_logprob(mine_ref, r["prompt"], r["chosen"])[0])
                      - (tasks.response_logprob(mine_policy, r["prompt"], r["rejected"])[0]
                         - tasks.response_logprob(mine_ref, r["prompt"], r["rejected"])[0]) for r in rows],
                     dtype=torch.float64)
    assert_close(stats["loss"], float(-F.logsigmoid(0.1 * h).mean()), rtol=1e-4, atol=1e-6,
                 call="dpo_step(policy, reference, Adam, 8 pairs, DPOConfig())['loss'] (before the step)",
                 mistakes={"the first half of the batch's rows are the chosen responses, the second half the rejected":
                           float(-F.logsigmoid(-0.1 * h).mean())},
                 hint="loss = mean over the pairs of dpo_loss(policy chosen, policy rejected, reference chosen, "
                      "reference rejected), each a sequence log-prob of the padded batch")


@pytest.mark.group("steps")
def test_grpo_step_trains_the_policy_only(learner):
    """One iteration on 2 groups of 4 sampled-looking responses of 1-3 tokens: at the first iteration the
    ratio is exactly 1, so the loss is the token-mean of -A + beta * k3, computed here."""
    grpo, torch_l = learner.module("grpo"), learner.lib("torch")
    (mine_policy, policy), (mine_ref, reference) = _models(learner, 40, n=2)
    before_policy, before_ref = policy.state_dict(), reference.state_dict()
    g = _gen(41)
    ids = torch.randint(0, 10, (8, 7), generator=g)  # prompts of 4 tokens, then up to 3 response tokens
    lengths = [1, 3, 2, 3, 1, 1, 2, 3]
    response = torch.tensor([[0.0] * 4 + [1.0] * n + [0.0] * (3 - n) for n in lengths])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    batch = {"input_ids": ids, "attention_mask": torch.ones(8, 7), "response_mask": response, "rewards": rewards}
    cfg = dict(group_size=4, clip_eps=0.2, beta=0.5, scale_rewards=True, aggregation="token", iterations=1,
               max_grad_norm=1.0)
    stats = grpo.grpo_step(policy, reference, torch_l.optim.Adam(policy.parameters(), lr=1e-2), batch,
                           grpo.GRPOConfig(**cfg))
    check(isinstance(stats, dict) and {"loss", "kl", "clipfrac", "steps"} <= set(stats),
          f"grpo_step returned {stats!r}; expected a dict with 'loss', 'kl', 'clipfrac' and 'steps'")
    after_policy, after_ref = policy.state_dict(), reference.state_dict()
    check(any(not torch.equal(before_policy[k], after_policy[k]) for k in before_policy), "grpo_step did not change the policy")
    check(all(torch.equal(before_ref[k], after_ref[k]) for k in before_ref), "grpo_step changed the reference's weights")
    check(stats["steps"] == 1, f"grpo_step(..., iterations=1) returned 'steps': {stats['steps']!r}; expected 1")
    with torch.no_grad():  # here, from the weights both models started with (no padding: one forward each)
        logp, logp_ref = _gathered(mine_policy(ids), ids), _gathered(mine_ref(ids), ids)
    m = response[:, 1:] > 0
    r = rewards.double().view(2, 4)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
    d = logp_ref - logp
    k3 = d.exp() - d - 1
    per_token = -adv[:, None] + cfg["beta"] * k3
    token_mean = float(per_token[m].sum() / m.sum())
    sequence_mean = float(torch.stack([per_token[i][m[i]].mean() for i in range(8)]).mean())
    what = f"grpo_step(policy, reference, Adam, 8 responses in 2 groups of 4, GRPOConfig({cfg}))"
    assert_close(stats["loss"], token_mean, rtol=1e-4, atol=1e-6, call=f"{what}['loss'] (at ratio 1)",
                 mistakes={"'token' averages over all response tokens of the batch at once": sequence_mean},
                 hint="advantages from the group's rewards; logp_old and logp_ref under no_grad before the first "
                      "iteration; grpo_loss(logp, logp_old, logp_ref, advantages, response_mask[:, 1:], ...)")
    assert_close(stats["kl"], float(k3[m].mean()), rtol=1e-3, atol=1e-7, call=f"{what}['kl']",
                 hint="k3 of the policy against the reference, averaged over the response tokens")
    assert_close(stats["clipfrac"], 0.0, atol=0.0, call=f"{what}['clipfrac'] (the first iteration: ratio exactly 1)",
                 hint="logp_old is the policy before the step, so at the first iteration the ratio is exactly 1")


@pytest.mark.group("end_to_end")
def test_dpo_learns_the_rule(learner, record_property):
    tasks, loops = learner.course("tasks"), learner.course("graded_loops")  # the course's data and loop, run here
    folder = Path(tempfile.mkdtemp())
    train = tasks.load_preferences(tasks.write_jsonl(tasks.make_preference_rows(0, 512), folder / "train.jsonl"))
    held_out = tasks.make_preference_rows(1, 128)
    policy = tasks.new_policy(0)
    reference = tasks.frozen_copy(policy)
    with loops.LearnerSteps(learner, "dpo", 60, "DPO on preference pairs") as dpo:
        tasks.train_dpo(policy, reference, train, steps=60, dpo=dpo)
    figures = tasks.evaluate_preferences(policy, reference, held_out, 0.1)
    record_property("figures", str(figures))
    check(figures["accuracy"] >= 0.65 and figures["margin"] > 0.1,
          f"after 60 DPO steps the held-out reward accuracy is {figures['accuracy']:.2f} and the margin "
          f"{figures['margin']:.3f} (measured here); expected >= 0.65 and > 0.1. Check the sign of the margin "
          "in dpo_loss and which rows of the batch are chosen (the first half)")


@pytest.mark.gpu
@pytest.mark.group("gpu")
def test_gpu_bf16_reference_logprobs(learner):
    lp = learner.module("logprobs")
    gpt = learner.course("common.gpt")
    config = gpt.GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    (mine, theirs), = _models(learner, 30, config)
    mine = mine.to(device="cuda", dtype=torch.bfloat16)
    theirs = theirs.to(device="cuda", dtype=torch.bfloat16)
    theirs.load_state_dict(mine.state_dict())
    ids = torch.randint(0, 512, (4, 48), generator=_gen(31)).cuda()
    attention = torch.ones(4, 48, device="cuda")
    attention[0, :5] = 0.0  # left padding
    attention[1, -7:] = 0.0  # right padding
    response = attention.clone()
    response[:, :24] = 0.0
    got = lp.reference_logprobs(theirs, ids, attention, response)
    with torch.no_grad():  # the same padded batch here: positions from the mask, padding keys masked, float64 log-softmax
        real = attention > 0
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        mask = torch.ones(48, 48, dtype=torch.bool, device="cuda").tril() & real[:, None, None, :]
        every = _gathered(mine(ids, positions=positions, attn_mask=mask), ids)
        want = torch.where(response[:, 1:] > 0, every, torch.zeros_like(every)).sum(-1)
    check(isinstance(got, torch.Tensor) and got.dtype == torch.float32,
          f"reference_logprobs(bf16 GPT on cuda) gave {getattr(got, 'dtype', type(got))}; expected float32")
    # ~20 float32 log-probs of the same bf16 logits per row: ~1e-4; bf16 log-softmax is off by ~0.1
    assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=0.02,
                 call="reference_logprobs(bf16 GPT on cuda, ids [4,48] padded on the left and the right)",
                 hint="upcast the logits to float32 before log_softmax; positions and the key mask as on the CPU")
