"""Visible tests for Unit 6. Run: pytest exercises/unit6"""

import math

import pytest
import torch

from autograder.checks import assert_close, check


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# hints the handout quotes, word for word
SHIFT_HINT = "subtract the row max from z first: at |z| ~ 1e4 float32 keeps only ~3 decimals, which logsumexp(z) - sum(p * z) loses"
CLIP_HINT = "clip the gradient norm after loss.backward() and before optimizer.step() (clipping after the step changes nothing)"
RATIO_HINT = "ratio = exp(logp_new - logp_old): exp(-200) is 0 in float32, so exp(logp_new) / exp(logp_old) is 0 / 0"


# --- A. GAE ------------------------------------------------------------------------------------


@pytest.mark.group("gae")
def test_gae_by_hand(learner):
    ppo = learner.module("ppo")
    rewards = torch.tensor([1.0, 0.0, 2.0])
    values = torch.tensor([0.5, 1.0, 1.5])
    dones = torch.zeros(3)
    adv, ret = ppo.compute_gae(rewards, values, dones, 0.9, 0.8, next_value=torch.tensor(2.0))
    # delta = [1 + .9*1 - .5, 0 + .9*1.5 - 1, 2 + .9*2 - 1.5] = [1.4, 0.35, 2.3]
    # A_2 = 2.3; A_1 = 0.35 + .72*2.3 = 2.006; A_0 = 1.4 + .72*2.006 = 2.84432
    want = torch.tensor([2.84432, 2.006, 2.3])
    assert_close(adv, want, rtol=1e-5, atol=1e-6, call="compute_gae(r[3], v[3], dones 0, gamma .9, lam .8, next_value 2)")
    assert_close(ret, want + values, rtol=1e-5, atol=1e-6, call="compute_gae(...) returns",
                 hint="returns = advantages + values")


@pytest.mark.group("gae")
def test_gae_stops_at_episode_end(learner):
    ppo = learner.module("ppo")
    rewards = torch.tensor([[1.0], [1.0], [1.0]])
    values = torch.tensor([[0.0], [10.0], [0.0]])
    dones = torch.tensor([[1.0], [0.0], [0.0]])  # step 0 ended an episode: values[1] is a new episode's
    adv, _ = ppo.compute_gae(rewards, values, dones, 1.0, 1.0)
    assert_close(adv[0], torch.tensor([1.0]), atol=1e-6, call="compute_gae: advantage of a step with dones=1",
                 hint="after a done there is no next value and no next advantage: multiply both by (1 - dones[t])")


@pytest.mark.group("gae")
def test_gae_masked_skips_padding(learner):
    ppo = learner.module("ppo")
    # one row: prompt (masked out), two response tokens, one pad (masked out)
    rewards = torch.tensor([[9.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.25, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo.compute_gae_masked(rewards, values, mask, 1.0, 1.0)
    # A_2 = 1 - 0.25 = 0.75 (episode ends after it); A_1 = 0 + 0.25 - 0.5 + 0.75 = 0.5
    assert_close(adv, torch.tensor([[0.0, 0.5, 0.75, 0.0]]), atol=1e-6, call="compute_gae_masked(one row, mask 0110)")
    assert_close(ret, torch.tensor([[0.0, 1.0, 1.0, 0.0]]), atol=1e-6, call="compute_gae_masked returns")


# --- A. masked statistics, entropy, log-probs --------------------------------------------------


@pytest.mark.group("masked_ops")
def test_masked_mean_ignores_garbage(learner):
    ppo = learner.module("ppo")
    x = torch.tensor([[1.0, 2.0, 1e6], [3.0, 1e6, 1e6]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert_close(ppo.masked_mean(x, mask), torch.tensor(2.0), call="masked_mean(x[2,3], bool mask)",
                 mistakes={"divide by the number of masked positions, not by x.numel()": torch.tensor(1.0)})
    assert_close(ppo.masked_mean(x, mask, 1), torch.tensor([1.5, 3.0]), call="masked_mean(x, mask, dim=1)")


@pytest.mark.group("masked_ops")
def test_masked_whiten_by_hand(learner):
    ppo = learner.module("ppo")
    x = torch.tensor([1.0, 2.0, 3.0, 1e3])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # mean 2, Bessel variance 1 (the biased variance is 2/3; with the garbage, mean and variance are huge)
    assert_close(ppo.masked_whiten(x, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6,
                 call="masked_whiten([1,2,3,garbage], mask 1110)",
                 mistakes={"use the Bessel-corrected variance: multiply by n / (n - 1)":
                           torch.tensor([-1.5 ** 0.5, 0.0, 1.5 ** 0.5, 0.0]),
                           "the mean and variance must come from the masked positions only":
                           torch.where(mask > 0, (x - x.mean()) / x.std(), torch.zeros(4))})
    assert_close(ppo.masked_whiten(x, mask, False), torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-6,
                 call="masked_whiten(..., shift_mean=False)", hint="shift_mean=False adds the mean back")


@pytest.mark.group("masked_ops")
def test_entropy_finite_for_huge_logits(learner):
    ppo = learner.module("ppo")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e4, 0.0, -1e4, 0.0], [1e4, 1e4, -1e4, 0.0]])
    # after subtracting the row max the logits are small exact numbers: float32 gets H to ~1e-7;
    # without it, logsumexp(z) and sum(p * z) are ~1e4, where float32 keeps ~3 decimals (error ~2e-4)
    assert_close(ppo.entropy_from_logits(logits), torch.tensor([math.log(4.0), 0.0, math.log(2.0)]), atol=1e-5,
                 call="entropy_from_logits([[0,0,0,0], [1e4,0,-1e4,0], [1e4,1e4,-1e4,0]])",
                 nan_hint="-(p * log p) gives 0 * -inf = nan where p == 0; use logsumexp(z) - sum(p * z)", hint=SHIFT_HINT)


@pytest.mark.group("masked_ops")
def test_logprobs_bf16_in_float32(learner):
    ppo = learner.module("ppo")
    logits = (torch.randn(2, 5, 50, generator=_gen(0)) * 20).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 5), generator=_gen(1))
    got = ppo.logprobs_from_logits(logits, labels)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # float32 over 50 exactly-representable bf16 values: error ~1e-6 of the largest magnitude
    assert_close(got, want, rtol=1e-5, atol=1e-4, dtype=torch.float32, call="logprobs_from_logits(bf16 [2,5,50])",
                 mistakes={"compute log_softmax in float32: bf16 keeps only 8 bits":
                           torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()})


# --- B. policy loss ------------------------------------------------------------------------------


def _policy_loss(logp_new, logp_old, adv, eps):
    ratio = torch.exp(logp_new - logp_old)
    return torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean()


@pytest.mark.group("policy_loss")
def test_policy_loss_and_stats(learner):
    ppo = learner.module("ppo")
    logp_old = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    logp_new = logp_old + torch.tensor([0.5, -0.5, 0.05, 0.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    loss, clipfrac, k1, k3 = ppo.ppo_policy_loss(logp_new, logp_old, adv, 0.2)
    assert_close(loss, _policy_loss(logp_new, logp_old, adv, 0.2), rtol=1e-10, call="ppo_policy_loss(...)[0]",
                 mistakes={"the loss is the mean over the samples, not the sum": 4 * _policy_loss(logp_new, logp_old, adv, 0.2)})
    assert_close(clipfrac, torch.tensor(0.5, dtype=torch.float64), call="ppo_policy_loss(...)[1] (clipfrac)")
    lr = logp_new - logp_old
    assert_close(k1, (-lr).mean(), rtol=1e-10, call="ppo_policy_loss(...)[2] (k1)")
    assert_close(k3, (lr.exp() - 1 - lr).mean(), rtol=1e-10, call="ppo_policy_loss(...)[3] (k3)")


@pytest.mark.group("policy_loss")
def test_ratio_one_is_the_plain_policy_gradient(learner):
    ppo = learner.module("ppo")
    logp = torch.tensor([-0.5, -1.0, -2.0, -0.25], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    out, grads = learner.harness("value_and_grad", ppo.ppo_policy_loss, [logp, logp.clone(), adv, 0.2], [0], pick=0)
    assert_close(out[0], -adv.mean(), rtol=1e-12, atol=1e-12, call="ppo_policy_loss at ratio 1 (logp_new == logp_old)",
                 hint="at ratio 1 the loss is -mean(A)")
    check(grads[0] is not None, "no gradient reached logp_new from the loss (is the ratio detached?)")
    assert_close(grads[0], -adv / 4, rtol=1e-12, atol=1e-12, call="d loss / d logp_new at ratio 1 (4 samples)",
                 hint="at ratio 1 the gradient is the plain policy gradient -A / N")


@pytest.mark.group("policy_loss")
def test_ratio_from_log_probs_of_minus_200(learner):
    ppo = learner.module("ppo")
    logp_old = torch.tensor([-200.0, -250.0, -180.0, -320.0])  # float32: exp(-200) is exactly 0
    logp_new = logp_old + torch.tensor([0.1, -0.05, 0.3, 0.0])
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    loss = ppo.ppo_policy_loss(logp_new, logp_old, adv, 0.2)[0]
    assert_close(loss, _policy_loss(logp_new.double(), logp_old.double(), adv.double(), 0.2), rtol=1e-4, atol=1e-5,
                 call="ppo_policy_loss(float32 log-probs near -200)", nan_hint=RATIO_HINT)


@pytest.mark.group("policy_loss")
def test_no_gradient_when_clipped_in_the_advantage_direction(learner):
    ppo = learner.module("ppo")
    logp_old = torch.zeros(2, dtype=torch.float64)
    logp_new = torch.tensor([math.log(1.5), math.log(0.5)], dtype=torch.float64)  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)  # both clipped "the way the advantage pushes"
    _, grads = learner.harness("value_and_grad", ppo.ppo_policy_loss, [logp_new, logp_old, adv, 0.2], [0], pick=0)
    check(grads[0] is not None, "no gradient reached logp_new from the loss")
    assert_close(grads[0], torch.zeros(2, dtype=torch.float64), atol=0.0, call="d loss / d logp_new",
                 hint="max(-A r, -A clip(r)) is the clipped (constant) term here: its gradient is exactly 0")


# --- B. value loss ---------------------------------------------------------------------------------


@pytest.mark.group("value_loss")
def test_value_loss_clipped(learner):
    ppo = learner.module("ppo")
    v_new = torch.tensor([1.0, 0.0, 0.5])
    v_old = torch.tensor([0.0, 0.0, 0.4])
    ret = torch.tensor([2.0, 1.0, 0.0])
    # v_clip = [0.2, 0.0, 0.5]; max squares = [3.24, 1.0, 0.25]
    assert_close(ppo.ppo_value_loss(v_new, v_old, ret, 0.2), torch.tensor(0.5 * 4.49 / 3), rtol=1e-6,
                 call="ppo_value_loss(v_new, v_old, returns, clip_eps=0.2)")
    assert_close(ppo.ppo_value_loss(v_new, v_old, ret), torch.tensor(0.5 * 2.25 / 3), rtol=1e-6,
                 call="ppo_value_loss(v_new, v_old, returns) (no clipping)")


# --- C. RLHF rewards -----------------------------------------------------------------------------


@pytest.mark.group("rlhf_rewards")
def test_rlhf_rewards_by_hand(learner):
    ppo = learner.module("ppo")
    logp = torch.tensor([[-1.0, -1.0, -2.0, -5.0]])
    ref = torch.tensor([[-3.0, -2.0, -1.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, kl = ppo.rlhf_rewards(torch.tensor([10.0]), logp, ref, mask, 0.5)
    assert_close(kl, torch.tensor([[0.0, 1.0, -1.0, 0.0]]), call="rlhf_rewards(...)[1] (kl)",
                 hint="kl = logp_policy - logp_ref, 0 outside the mask")
    assert_close(rewards, torch.tensor([[0.0, -0.5, 10.5, 0.0]]), call="rlhf_rewards(...)[0] (rewards)",
                 hint="-beta * kl at every response token, plus the score at the LAST response token")


# --- C. the update loop ------------------------------------------------------------------------------


def _batch(n, obs_dim, seed):
    g = _gen(seed)
    return {"obs": torch.randn(n, obs_dim, generator=g), "actions": torch.randint(0, 4, (n,), generator=g),
            "logp_old": torch.full((n,), -math.log(4.0)) + 0.01 * torch.randn(n, generator=g),
            "values_old": torch.randn(n, generator=g) * 0.1, "advantages": torch.randn(n, generator=g),
            "returns": torch.randn(n, generator=g)}


@pytest.mark.group("ppo_update")
def test_ppo_update_counts_steps(learner):
    ppo, envs, torch_l = learner.module("ppo"), learner.module("envs"), learner.lib("torch")
    with torch.random.fork_rng(devices=[]):  # the initial weights are made here, by the course's ActorCritic
        start = learner.course("envs").ActorCritic(6, 4, 16, 0).state_dict()
    agent = envs.ActorCritic(6, 4, 16)  # a container on your side, loaded with them
    agent.load_state_dict(start)
    opt = torch_l.optim.Adam(agent.parameters(), lr=1e-3)
    cfg = ppo.PPOConfig(epochs=3, minibatch_size=16)
    stats = ppo.ppo_update(agent, opt, _batch(40, 6, 0), cfg, torch_l.Generator().manual_seed(0))
    check(isinstance(stats, dict) and stats.get("steps") == 9,
          f"ppo_update with 40 samples, minibatch 16, 3 epochs returned {stats!r}; expected 'steps': 9 (3 x 3 minibatches)")
    before = agent.state_dict()
    stats = ppo.ppo_update(agent, opt, _batch(40, 6, 1), ppo.PPOConfig(epochs=3, minibatch_size=16, target_kl=-1.0),
                           torch_l.Generator().manual_seed(0))
    check(stats.get("steps") == 1, f"with target_kl=-1 (always exceeded) ppo_update took {stats.get('steps')} steps; "
                                   "expected 1: stop after the first minibatch whose k3 exceeds target_kl")
    after = agent.state_dict()
    check(any(not torch.equal(before[k], after[k]) for k in before), "ppo_update did not change the agent's weights")
    check(any(not torch.equal(start[k], before[k]) for k in start), "the first ppo_update did not change the agent's weights")


@pytest.mark.group("ppo_update")
def test_ppo_update_clips_the_gradient_before_the_step(learner):
    """One step of plain SGD with lr 1 moves the weights by exactly the (clipped) gradient."""
    ppo, envs, torch_l = learner.module("ppo"), learner.module("envs"), learner.lib("torch")
    with torch.random.fork_rng(devices=[]):
        start = learner.course("envs").ActorCritic(6, 4, 16, 1).state_dict()
    agent = envs.ActorCritic(6, 4, 16)
    agent.load_state_dict(start)
    batch = _batch(32, 6, 2)
    batch["advantages"] = batch["advantages"] * 10  # a gradient far larger than max_grad_norm
    max_norm = 0.01
    stats = ppo.ppo_update(agent, torch_l.optim.SGD(agent.parameters(), lr=1.0), batch,
                           ppo.PPOConfig(epochs=1, minibatch_size=32, max_grad_norm=max_norm), torch_l.Generator().manual_seed(0))
    check(isinstance(stats, dict) and stats.get("steps") == 1,
          f"ppo_update with 32 samples, minibatch 32, 1 epoch returned {stats!r}; expected 'steps': 1")
    after = agent.state_dict()
    moved = sum(float(((after[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
    what = (f"one ppo_update step with SGD(lr=1) and max_grad_norm={max_norm} moved the weights by {moved:.4g} "
            "(L2 norm over all parameters)")
    check(moved <= max_norm * 1.001, f"{what}; with the gradient clipped to norm {max_norm} it moves them by at most "
                                     f"{max_norm}.\nHint: {CLIP_HINT}")
    check(moved >= max_norm / 2, f"{what}; expected about {max_norm} (the gradient is far larger, clipped to that norm)")


# --- D. end to end: the course's loop, run here with your functions ---------------------------------


@pytest.mark.group("end_to_end")
def test_gridworld_learns(learner):
    envs, loops = learner.course("envs"), learner.course("graded_loops")  # the course's loop, run by the test
    with loops.LearnerPPO(learner, loops.gridworld_agent(learner), 60, "PPO on the gridworld") as ppo:
        history = envs.train_gridworld(0, 10, ppo=ppo)
    last = history[-1]
    check(last["return"] >= 0.7 and last["greedy_return"] >= 0.85,
          f"after 10 PPO updates the gridworld return is {last['return']:.2f} (greedy {last['greedy_return']:.2f}); "
          "expected >= 0.7 (greedy 0.86, the best possible)")


@pytest.mark.gpu
@pytest.mark.group("logprobs_gpu")
def test_logprobs_on_gpu_bf16(learner):
    ppo = learner.module("ppo")
    logits = (torch.randn(4, 64, 1000, generator=_gen(2)) * 30).to(torch.bfloat16).cuda()
    labels = torch.randint(0, 1000, (4, 64), generator=_gen(3)).cuda()
    got = ppo.logprobs_from_logits(logits, labels)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # float32 log_softmax over 1000 bf16 values of magnitude <= ~150: error well below 1e-3
    assert_close(got, want, rtol=1e-5, atol=1e-3, dtype=torch.float32, call="logprobs_from_logits(bf16 [4,64,1000] on cuda)")
