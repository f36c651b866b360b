"""Hidden tests, Unit 8 part C: group-relative advantages against TRL's formula (its nanstd, groups
in consecutive rows, eps 1e-4; with and without the std; groups of equal rewards, bool rewards,
groups of 2), the k3 KL (>= 0, exact zero, against torch.distributions' KL where the policy is
known), the per-token clipped surrogate (ratio 1, exact clip edges, zero gradient where clipped the
way the advantage pushes), and the GRPO loss with both aggregations against TRL GRPOTrainer's own
loss code ("grpo" and "bnpo") called on the same log-probs, with garbage off the mask."""

import collections
import math
import os
from types import SimpleNamespace

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


# --- TRL as the oracle -------------------------------------------------------------------------------------


def _trl_grpo():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
        from trl.trainer.utils import nanstd
    except Exception:  # noqa: BLE001  no TRL: the documented formulas below
        return None, None
    return GRPOTrainer, nanstd


def advantages_oracle(rewards, G, scale=True, over_batch=False, biased=False, eps=1e-4):
    """TRL's group advantages: (r - group mean) / (group std + 1e-4), the std from TRL's nanstd (Bessel)
    where TRL is installed; the switches give the mistakes."""
    _, nanstd = _trl_grpo()
    r = torch.as_tensor(rewards, dtype=torch.float64)
    grouped = r.view(-1, G)
    if over_batch:
        mean = r.mean().expand_as(r)
        std = r.std().expand_as(r)
    else:
        mean = grouped.mean(1).repeat_interleave(G)
        if biased:
            std = grouped.std(1, correction=0).repeat_interleave(G)
        else:
            std = (nanstd(grouped, dim=1) if nanstd is not None else grouped.std(1)).repeat_interleave(G)
    adv = r - mean
    return adv / (std + eps) if scale else adv


def trl_grpo_loss(logp, logp_old, logp_ref, adv, mask, clip_eps, beta, aggregation):
    """TRL GRPOTrainer's loss (its _compute_loss with a stand-in trainer whose per-token log-probs are
    the given ones): loss_type "grpo" is the per-sequence mean, "bnpo" the mean over all tokens.
    Returns (loss, {"kl", "clipfrac"}, which)."""
    cls, _ = _trl_grpo()
    if cls is not None:
        try:
            N, T = logp.shape
            accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x,
                                          reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True)
            trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                                      top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                                      importance_sampling_level="token", beta=beta,
                                      args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
                                      loss_type={"sequence": "grpo", "token": "bnpo"}[aggregation],
                                      epsilon_low=clip_eps, epsilon_high=clip_eps, use_vllm=False,
                                      current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
                                      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
            trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
            inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1),
                      "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
                      "advantages": adv, "old_per_token_logps": logp_old, "ref_per_token_logps": logp_ref}
            loss = cls._compute_loss(trainer, None, inputs)
            metrics = trainer._metrics["train"]
            return loss, {"kl": metrics["kl"][-1], "clipfrac": metrics["clip_ratio/region_mean"][-1]}, "TRL GRPOTrainer"
        except Exception:  # noqa: BLE001  TRL's internals moved: the documented formulas below
            pass
    return (*grpo_formula(logp, logp_old, logp_ref, adv, mask, clip_eps, beta, aggregation), "formulas")


def grpo_formula(logp, logp_old, logp_ref, adv, mask, clip_eps, beta, aggregation, *, kl="k3", swap_minmax=False,
                 no_mask_zero=False):
    m = torch.as_tensor(mask, dtype=torch.float64)
    ratio = torch.exp(logp - logp_old)
    a = adv.unsqueeze(-1)
    pick = torch.max if swap_minmax else torch.min
    surrogate = -pick(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    d = logp_ref - logp
    k = {"k3": d.exp() - d - 1, "k1": -d, "reversed": (-d).exp() + d - 1}[kl]
    per = surrogate + beta * k
    per = per * m if no_mask_zero else torch.where(m > 0, per, torch.zeros_like(per))
    if aggregation == "sequence":
        loss = ((per * m).sum(-1) / m.sum(-1)).mean()
    else:
        loss = (per * m).sum() / m.sum()
    clipped = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
    km = torch.where(m > 0, k, torch.zeros_like(k))
    return loss, {"kl": float(km.sum() / m.sum()), "clipfrac": float((clipped.double() * m).sum() / m.sum())}


def response_layout(rng, N, T):
    """A response mask [N, T]: every row at least one token, lengths differ."""
    m = np.zeros((N, T))
    for i in range(N):
        m[i, : int(rng.integers(1, T + 1))] = 1.0
    m[0] = 1.0
    m[-1, 1:] = 0.0
    return m


# --- C. advantages ------------------------------------------------------------------------------------------


@pytest.mark.group("grpo_advantages")
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_against_trl(learner, rng, scale):
    grpo = learner.module("grpo")
    G, groups = 6, 5
    spreads = np.array([0.1, 1.0, 5.0, 0.5, 2.0]).repeat(G)  # groups of very different spreads
    rewards = rng.normal(size=G * groups) * spreads + np.arange(groups).repeat(G)
    got = grpo.group_advantages(torch.tensor(rewards), G, scale)
    call = f"group_advantages(rewards [{G * groups}] float64 in {groups} groups of {G} with different spreads, {G}, scale_rewards={scale})"
    strided = advantages_oracle(torch.tensor(rewards).view(G, groups).t().reshape(-1), G, scale)  # view(G, -1).t()
    mistakes = {"groups are consecutive rows: rewards.view(-1, group_size), one row per prompt": strided,
                "groups are consecutive rows (rows 0 .. group_size - 1 answer the first prompt), not every "
                f"{groups}th reward": strided.view(groups, G).t().reshape(-1)}
    r = torch.tensor(rewards)
    group_mean = r.view(-1, G).mean(1).repeat_interleave(G)
    group_std = r.view(-1, G).std(1).repeat_interleave(G)
    if scale:
        mistakes["the std is taken within each group (its own rewards), not over the whole batch"] = \
            (r - group_mean) / (r.std() + 1e-4)
        mistakes["the mean is taken within each group (its own rewards), not over the whole batch"] = \
            (r - r.mean()) / (group_std + 1e-4)
        mistakes["the mean and the std are taken within each group, not over the whole batch"] = \
            advantages_oracle(rewards, G, scale, over_batch=True)
        mistakes["the std of a group uses Bessel's correction (torch.std's default, TRL's nanstd)"] = \
            advantages_oracle(rewards, G, scale, biased=True)
        mistakes["eps is added to the std, outside the square root: (r - mean) / (std + eps)"] = \
            (r - group_mean) / torch.sqrt(r.view(-1, G).var(1).repeat_interleave(G) + 1e-4)
        mistakes["eps keeps the division finite: divide by (std + eps), not by the std alone"] = (r - group_mean) / group_std
    else:
        mistakes["scale_rewards=False only subtracts the group's mean (Dr. GRPO)"] = advantages_oracle(rewards, G, True)
        mistakes["the mean is taken within each group (its own rewards), not over the whole batch"] = \
            advantages_oracle(rewards, G, False, over_batch=True)
    # TRL's nanstd multiplies by Bessel's factor count / (count - 1) in float32: the oracle is good to ~1e-8
    assert_close(got, advantages_oracle(rewards, G, scale), rtol=1e-6, atol=1e-9, call=call, mistakes=mistakes,
                 hint="A = (r - mean of its group) / (std of its group + 1e-4)" if scale else "A = r - mean of its group")


@pytest.mark.group("grpo_advantages")
@settings(**SETTINGS)
@given(G=st.integers(2, 6), groups=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["bool", "float32", "equal"]))
@example(G=2, groups=1, seed=0, kind="bool")
@example(G=4, groups=3, seed=1, kind="equal")
def test_group_advantages_bool_and_equal_rewards(learner, G, groups, seed, kind):
    """Verifiable rewards are often bools; a group whose rewards are all equal gets exactly 0."""
    grpo = learner.module("grpo")
    g = np.random.default_rng(seed)
    if kind == "bool":
        rewards = torch.tensor(g.random(G * groups) < 0.5)
    elif kind == "equal":
        rewards = torch.tensor(np.repeat(g.integers(0, 3, size=groups), G), dtype=torch.float32)
    else:
        rewards = torch.tensor(g.normal(size=G * groups), dtype=torch.float32)
    got = grpo.group_advantages(rewards, G)
    want = advantages_oracle(rewards.double(), G)
    call = (f"group_advantages(rewards {rewards.tolist()} ({rewards.dtype}), group_size={G})")
    check(isinstance(got, torch.Tensor) and got.is_floating_point() and got.dtype != torch.float16 and got.dtype != torch.bfloat16,
          f"{call} gave {getattr(got, 'dtype', type(got).__name__)}; expected a float32 (or float64) tensor")
    nan = "a group whose rewards are all equal has std 0: divide by (std + eps) so its advantages are 0, not NaN"
    # float32 arithmetic on rewards of size ~1: ~1e-6; equal groups are exactly 0
    assert_close(got, want, rtol=1e-4, atol=1e-5 if kind != "equal" else 0.0, call=call, nan_hint=nan,
                 hint="A = (r - mean of its group) / (std of its group + 1e-4), computed in float32 or wider")


# --- C. the k3 KL and the clipped surrogate ---------------------------------------------------------------


@pytest.mark.group("grpo_loss")
def test_k3_against_the_exact_kl(learner, rng):
    """E over tokens sampled from the policy of k3 is KL(policy || reference): with every token of a small
    vocabulary weighted by its probability, the weighted sum of k3 is the exact KL (torch.distributions)."""
    grpo = learner.module("grpo")
    V = 7
    policy = torch.distributions.Categorical(logits=torch.tensor(rng.normal(size=(4, V))))
    ref = torch.distributions.Categorical(logits=torch.tensor(rng.normal(size=(4, V))))
    tokens = torch.arange(V).expand(4, V).t()  # [V, 4]: every token at every one of 4 positions
    logp, logp_ref = policy.log_prob(tokens).t(), ref.log_prob(tokens).t()  # [4, V]
    k3 = grpo.per_token_kl(logp, logp_ref)
    d = logp_ref - logp
    assert_close(k3, d.exp() - d - 1, rtol=1e-10, atol=1e-12, call="per_token_kl(logp [4,7], logp_ref [4,7]) float64",
                 mistakes={"k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1 (the reference over the policy inside exp)":
                           (-d).exp() + d - 1, "k3, not k1 = logp - logp_ref": -d})
    exact = torch.distributions.kl_divergence(policy, ref)
    assert_close((policy.probs * k3).sum(-1), exact, rtol=1e-9, atol=1e-12,
                 call="sum over the vocabulary of p * per_token_kl against KL(policy || reference)",
                 hint="k3 is an unbiased estimate of KL(policy || reference) under the policy's samples")
    check(bool((k3 >= 0).all()), "per_token_kl gave negative values; k3 is >= 0 everywhere")
    same = grpo.per_token_kl(logp, logp.clone())
    assert_close(same, torch.zeros_like(logp), atol=0.0, call="per_token_kl(logp, logp) (policy == reference)")


def _exact_ratio_inputs(ratios):
    """(logp, logp_old) float64 whose exp(logp - logp_old) is exactly each ratio (the clip edges)."""
    new, old = [], []
    for r in ratios:
        for o in (-1.0, -0.5, -2.0, -0.25, -4.0, -1.5, -3.0, -0.75):
            n = o + math.log(r)
            if math.exp(n - o) == r:
                new.append(n)
                old.append(o)
                break
        else:  # pragma: no cover
            raise AssertionError(f"no exact log-probs for ratio {r}")
    new, old = torch.tensor(new, dtype=torch.float64), torch.tensor(old, dtype=torch.float64)
    assert torch.equal(torch.exp(new - old), torch.tensor(ratios, dtype=torch.float64))
    return new, old


@pytest.mark.group("grpo_loss")
@pytest.mark.parametrize("eps", [0.25, 0.0])
def test_clipped_token_loss_edges(learner, rng, eps):
    """Rows are sequences (one advantage each), columns tokens: ratios exactly at 1 +- eps, inside, far
    outside; a clip of 0.0 clips every ratio to 1."""
    grpo = learner.module("grpo")
    ratios = [[1.25, 0.75, 1.0, 1.5], [0.5, 1.125, 0.875, 2.0], [1.25, 0.75, 1.5, 0.5]]
    flat = [r for row in ratios for r in row]
    new, old = _exact_ratio_inputs(flat)
    new, old = new.view(3, 4), old.view(3, 4)
    adv = torch.tensor([1.5, -0.75, 0.0], dtype=torch.float64)
    got = grpo.clipped_token_loss(new, old, adv, eps)
    r = torch.tensor(ratios, dtype=torch.float64)
    a = adv[:, None]
    want = torch.max(-a * r, -a * r.clamp(1 - eps, 1 + eps))
    assert_close(got, want, rtol=1e-12, atol=1e-12, call=f"clipped_token_loss(logp [3,4] with ratios exactly {ratios}, A {adv.tolist()}, eps={eps})",
                 mistakes={"the loss is max(-A r, -A clip(r)): the pessimistic bound (min of the objectives)": torch.min(-a * r, -a * r.clamp(1 - eps, 1 + eps)),
                           "clip the ratio, not the advantage": torch.max(-a * r, -a.clamp(-eps, eps) * r)})


@pytest.mark.group("grpo_loss")
def test_clipped_token_loss_gradient(learner, rng):
    grpo = learner.module("grpo")
    N, T, eps = 5, 8, 0.2
    old = torch.tensor(-rng.uniform(0.1, 4, size=(N, T)))
    new = old + torch.tensor(rng.normal(0, 0.4, size=(N, T)))
    adv = torch.tensor(rng.normal(size=N))
    _, grads = learner.harness("value_and_grad", grpo.clipped_token_loss, [new, old, adv, eps], [0])
    check(grads[0] is not None, "no gradient reaches logp from clipped_token_loss (is the ratio detached?)")
    leaf = new.clone().requires_grad_()
    ratio = (leaf - old).exp()
    a = adv[:, None]
    torch.max(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)).sum().backward()
    frozen = ((a > 0) & (ratio.detach() > 1 + eps)) | ((a < 0) & (ratio.detach() < 1 - eps))
    check(bool(frozen.any()), "test set-up: no clipped token")
    check(bool((grads[0][frozen] == 0).all()), f"{int((grads[0][frozen] != 0).sum())} of {int(frozen.sum())} tokens whose ratio is "
                                               "clipped the way their advantage pushes got a nonzero gradient; it must be exactly 0")
    assert_close(grads[0], leaf.grad, rtol=1e-9, atol=1e-12, call=f"d sum(clipped_token_loss(logp [{N},{T}], ...)) / d logp",
                 hint="where unclipped, d(-A r)/d logp = -A r")


# --- C. the GRPO loss against TRL ----------------------------------------------------------------------------


def _inputs(rng, N, T, garbage=True):
    m = response_layout(rng, N, T)
    logp = -rng.uniform(0.05, 4, size=(N, T))
    old = logp + rng.normal(0, 0.3, size=(N, T))
    ref = logp + rng.normal(0, 0.5, size=(N, T))
    if garbage:  # finite garbage off the mask, in all three
        logp, old, ref = (np.where(m > 0, x, -rng.uniform(20, 60, size=(N, T))) for x in (logp, old, ref))
    adv = rng.normal(size=N)
    return [torch.tensor(x) for x in (logp, old, ref, adv, m)]


@pytest.mark.group("grpo_loss")
@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_loss_against_trl(learner, rng, record_property, aggregation):
    grpo = learner.module("grpo")
    N, T = 8, 7
    logp, old, ref, adv, m = _inputs(rng, N, T)
    clip_eps, beta = float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.02, 0.2))
    out = grpo.grpo_loss(logp, old, ref, adv, m, clip_eps, beta, aggregation)
    check(isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict),
          f"grpo_loss returned {type(out).__name__}; expected (loss, {{'kl': ..., 'clipfrac': ...}})")
    loss, stats = out
    # TRL's oracle gets the clean inputs: it multiplies by the mask, so garbage would leak into its own figures
    clean = [torch.where(m > 0, x, torch.zeros_like(x)) for x in (logp, old, ref)]
    want, metrics, which = trl_grpo_loss(*clean, adv, m, clip_eps, beta, aggregation)
    record_property("figures", f"oracle: {which}")
    call = (f"grpo_loss(logp [{N},{T}] float64 with garbage off the mask, logp_old, logp_ref, A [{N}], mask (lengths "
            f"{m.sum(1).int().tolist()}), clip_eps={clip_eps:.3f}, beta={beta:.3f}, aggregation={aggregation!r})")
    other = "token" if aggregation == "sequence" else "sequence"
    assert_close(loss, want, rtol=1e-9, atol=1e-12, call=call + f"[0] against {which}",
                 mistakes={f"aggregation={aggregation!r}: " + ("the mean over sequences of each sequence's token mean"
                                                               if aggregation == "sequence" else
                                                               "the sum over all masked tokens / their number"):
                           grpo_formula(*clean, adv, m, clip_eps, beta, other)[0],
                           "the KL term is k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1":
                           grpo_formula(*clean, adv, m, clip_eps, beta, aggregation, kl="k1")[0],
                           "the KL penalty is added to the loss: + beta * k3":
                           grpo_formula(*clean, adv, m, clip_eps, -beta, aggregation)[0],
                           "the surrogate is -min(r A, clip(r) A) per token":
                           grpo_formula(*clean, adv, m, clip_eps, beta, aggregation, swap_minmax=True)[0]})
    assert_close(stats["kl"], metrics["kl"], rtol=1e-9, atol=1e-12, call=call + f"[1]['kl'] against {which}'s kl",
                 hint="kl = the mean of per_token_kl over the masked tokens")
    assert_close(stats["clipfrac"], metrics["clipfrac"], rtol=1e-9, atol=1e-12,
                 call=call + f"[1]['clipfrac'] against {which}'s clip_ratio/region_mean",
                 hint="clipfrac counts the masked tokens clipped the way their advantage pushes: (r > 1 + eps and A > 0) "
                      "or (r < 1 - eps and A < 0)")


@pytest.mark.group("grpo_loss")
@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_loss_at_ratio_one_is_the_policy_gradient(learner, rng, aggregation):
    """logp == logp_old == logp_ref: the loss is minus the (aggregated) advantage and its gradient the plain
    policy gradient, -A / (tokens of the sequence) / N or -A / (all tokens)."""
    grpo = learner.module("grpo")
    N, T = 6, 5
    logp, _, _, adv, m = _inputs(rng, N, T, garbage=False)
    out, grads = learner.harness("value_and_grad", grpo.grpo_loss, [logp, logp.clone(), logp.clone(), adv, m, 0.2, 0.1, aggregation],
                                 [0], pick=0)
    lengths = m.sum(1, keepdim=True)
    if aggregation == "sequence":
        want_loss, want_grad = -adv.mean(), -adv[:, None] * m / lengths / N
    else:
        want_loss, want_grad = -(adv[:, None] * m).sum() / m.sum(), -adv[:, None] * m / m.sum()
    call = f"grpo_loss(logp == logp_old == logp_ref [{N},{T}], lengths {m.sum(1).int().tolist()}, aggregation={aggregation!r})"
    assert_close(out[0], want_loss, rtol=1e-10, atol=1e-12, call=call + "[0]")
    check(grads[0] is not None, "no gradient reaches logp from grpo_loss")
    assert_close(grads[0], want_grad, rtol=1e-10, atol=1e-12, call="d " + call + " / d logp",
                 hint="at ratio 1 the gradient is the plain policy gradient, weighted as the aggregation weighs each token "
                      "(0 off the mask)")
    assert_close(out[1]["kl"], torch.tensor(0.0, dtype=torch.float64), atol=1e-12, call=call + "[1]['kl']")
    assert_close(out[1]["clipfrac"], torch.tensor(0.0, dtype=torch.float64), atol=0.0, call=call + "[1]['clipfrac']")
    # clip_eps=0: every ratio is exactly 1, the edge of [1 - 0, 1 + 0] and not beyond it, so nothing is clipped
    # and the loss is the same (a clipped token would be counted by r >= 1 + eps or r <= 1 - eps)
    edge = grpo.grpo_loss(logp, logp.clone(), logp.clone(), adv, m, 0.0, 0.1, aggregation)
    assert_close(edge[0], want_loss, rtol=1e-10, atol=1e-12, call=call.replace("aggregation", "clip_eps=0.0, aggregation") + "[0]")
    assert_close(edge[1]["clipfrac"], torch.tensor(0.0, dtype=torch.float64), atol=0.0,
                 call=call.replace("aggregation", "clip_eps=0.0, aggregation") + "[1]['clipfrac']",
                 hint="a token is clipped only beyond the range: r > 1 + eps (A > 0) or r < 1 - eps (A < 0), strictly")


@pytest.mark.group("grpo_loss")
def test_grpo_loss_kl_gradient_pulls_to_the_reference(learner, rng):
    """With zero advantages only the KL term is left: its gradient is beta * (1 - exp(logp_ref - logp)) per
    token (weighted by the aggregation), which pushes logp towards logp_ref."""
    grpo = learner.module("grpo")
    N, T, beta = 4, 6, 0.5
    logp, old, ref, _, m = _inputs(rng, N, T, garbage=False)
    adv = torch.zeros(N, dtype=torch.float64)
    _, grads = learner.harness("value_and_grad", grpo.grpo_loss, [logp, old, ref, adv, m, 0.2, beta, "token"], [0], pick=0)
    want = beta * (1 - (ref - logp).exp()) * m / m.sum()
    check(grads[0] is not None, "no gradient reaches logp from the KL term of grpo_loss")
    assert_close(grads[0], want, rtol=1e-9, atol=1e-12, call=f"d grpo_loss(A = 0, beta={beta}, 'token') / d logp",
                 mistakes={"the KL penalty is added to the loss: + beta * k3": -want},
                 hint="d k3 / d logp = 1 - exp(logp_ref - logp); the loss adds beta * k3")
