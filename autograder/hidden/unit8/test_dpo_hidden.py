"""Hidden tests, Unit 8 part B: the DPO loss family against TRL's own loss code called on the same
log-probs (DPOTrainer's loss for sigmoid DPO and IPO with TRL's length normalisation, CPOTrainer's
for conservative DPO and SimPO), and against closed forms (log 2 at zero margin for any beta and
label smoothing, IPO's quadratic, label smoothing's mix, the exact gradient and its direction),
margins of +-1e3 in float32 (logsigmoid, not log(sigmoid)), rewards detached, bool-free ties in the
statistics.  Where TRL is not installed, its documented formulas stand in (the figures say which)."""

import collections
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


def _trl(name):
    """TRL's trainer class, or None where TRL is not installed (or moved the class)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        if name == "dpo":
            from trl.trainer.dpo_trainer import DPOTrainer as cls
        else:
            from trl.experimental.cpo.cpo_trainer import CPOTrainer as cls
    except Exception:  # noqa: BLE001  no TRL, or another layout: the documented formulas below
        return None
    return cls


def trl_dpo(pc, pr, rc, rr, beta, loss_type, lengths=None):
    """TRL DPOTrainer's loss (its _compute_loss, called with a stand-in trainer and a stand-in model
    whose per-token log-probs sum to the given sequence log-probs) and the metrics it logs; for
    "ipo" TRL divides each log-ratio by the completion's length, given in ``lengths`` [2B].
    Returns (mean loss, {metric: value}, which)."""
    cls = _trl("dpo")
    B = pc.shape[0]
    lengths = torch.ones(2 * B, dtype=torch.long) if lengths is None else lengths
    if cls is not None:
        try:
            L = int(lengths.max()) + 1
            completion = torch.zeros(2 * B, L)
            for i, n in enumerate(lengths.tolist()):
                completion[i, 1 : 1 + n] = 1.0
            log_probs = torch.zeros(2 * B, L - 1, dtype=pc.dtype)
            log_probs[:, 0] = torch.cat([pc, pr])
            outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(2 * B, L - 1),
                                      mean_logits=torch.zeros(2 * B, L - 1), is_top1=torch.zeros(2 * B, L - 1, dtype=torch.bool))
            accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
            trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                                      precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                                      loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                                      use_weighting=False, _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
                                      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
            inputs = {"input_ids": torch.zeros(2 * B, L, dtype=torch.long), "attention_mask": torch.ones(2 * B, L),
                      "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
            loss = cls._compute_loss(trainer, lambda **kw: outputs, inputs, False)
            return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}, "TRL DPOTrainer"
        except Exception:  # noqa: BLE001  TRL's internals moved: the documented formulas below
            pass
    chosen, rejected = pc - rc, pr - rr
    if loss_type == "ipo":
        h = chosen / lengths[:B] - rejected / lengths[B:]
        loss = ((h - 1 / (2 * beta)) ** 2).mean()
    else:
        loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    cr, rj = beta * chosen, beta * rejected
    return loss, {"rewards/chosen": float(cr.mean()), "rewards/rejected": float(rj.mean()),
                  "rewards/accuracies": float((cr > rj).float().mean()), "rewards/margins": float((cr - rj).mean())}, "formulas"


def trl_cpo(x, y, beta, loss_type, label_smoothing=0.0, gamma=0.0):
    """TRL CPOTrainer's cpo_loss on (x, y): its "sigmoid" with label smoothing is conservative DPO when x and
    y are the log-ratios policy - reference; its "simpo" is SimPO on length-averaged log-probs.  Returns
    (losses, chosen rewards, rejected rewards, which)."""
    cls = _trl("cpo")
    if cls is not None:
        try:
            trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                      simpo_gamma=gamma, accelerator=SimpleNamespace(device="cpu"))
            return (*cls.cpo_loss(trainer, x, y), "TRL CPOTrainer")
        except Exception:  # noqa: BLE001
            pass
    z = beta * (x - y) - (gamma if loss_type == "simpo" else 0.0)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * x, beta * y, "formulas"


# --- the mistakes, on the trusted side -----------------------------------------------------------------------


def closed_form(pc, pr, rc, rr, beta, loss_type="sigmoid", eps=0.0, gamma=0.0, *, beta_divides=False, swap=False,
                ref_sign=-1.0, smoothing_swapped=False, ipo_half=True, use_ref=None):
    """The handout's formulas, with switches for the mistakes each test tells apart."""
    if swap:
        pc, pr, rc, rr = pr, pc, rr, rc
    simpo = loss_type == "simpo"
    with_ref = (not simpo) if use_ref is None else use_ref
    chosen = pc + ref_sign * rc if with_ref else pc
    rejected = pr + ref_sign * rr if with_ref else pr
    h = chosen - rejected
    if loss_type == "ipo":
        return (h - 1 / ((2 if ipo_half else 1) * beta)) ** 2
    z = (h / beta if beta_divides else beta * h) - (gamma if simpo else 0.0)
    e = 1 - eps if smoothing_swapped else eps
    return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)


def draw(rng, B, spread=3.0):
    """Sequence log-probs [B] in float64: policy and reference near each other, all negative."""
    ref_c, ref_r = -rng.uniform(2, 30, size=B), -rng.uniform(2, 30, size=B)
    pc = ref_c + rng.normal(0, spread, size=B)
    pr = ref_r + rng.normal(0, spread, size=B)
    return [torch.tensor(v, dtype=torch.float64) for v in (pc, pr, ref_c, ref_r)]


def mistakes_for(pc, pr, rc, rr, beta, loss_type, eps=0.0, gamma=0.0):
    m = {"chosen and rejected are swapped: the margin is (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)":
         closed_form(pc, pr, rc, rr, beta, loss_type, eps, gamma, swap=True)}
    if loss_type != "simpo":
        m["the log-ratio is policy - reference: subtract the reference's log-prob"] = \
            closed_form(pc, pr, rc, rr, beta, loss_type, eps, gamma, ref_sign=1.0)
        m["the reference enters as policy - reference: forgetting it leaves the policy's own log-probs"] = \
            closed_form(pc, pr, rc, rr, beta, loss_type, eps, gamma, use_ref=False)
    else:
        m["SimPO has no reference: z = beta * (policy_chosen - policy_rejected) - gamma"] = \
            closed_form(pc, pr, rc, rr, beta, loss_type, eps, gamma, use_ref=True)
    if loss_type == "ipo":
        m["IPO's target margin is 1 / (2 beta): loss = (h - 1 / (2 beta))^2"] = \
            closed_form(pc, pr, rc, rr, beta, "ipo", ipo_half=False)
    else:
        m["beta multiplies the margin: z = beta * h, not h / beta"] = \
            closed_form(pc, pr, rc, rr, beta, loss_type, eps, gamma, beta_divides=True)
        # at eps = 0 the swapped weights give the flipped loss, the same value as chosen and rejected swapped
        m["label smoothing eps weighs the flipped pair: -(1 - eps) logsigmoid(z) - eps logsigmoid(-z)"] = \
            closed_form(pc, pr, rc, rr, beta, loss_type, eps, gamma, smoothing_swapped=True)
        if loss_type == "simpo":
            m["SimPO subtracts its target margin gamma: z = beta * (chosen - rejected) - gamma"] = \
                closed_form(pc, pr, rc, rr, beta, loss_type, eps, 0.0)
    return m


def _call(learner, B, beta, loss_type, eps, gamma):
    return (f"dpo_loss(4 x float64 [{B}] sequence log-probs, beta={beta:.3g}, loss_type={loss_type!r}, "
            f"label_smoothing={eps:.3g}, gamma={gamma:.3g})")


# --- B. against TRL ---------------------------------------------------------------------------------------------


@pytest.mark.group("dpo_loss")
def test_sigmoid_against_trl_dpo_trainer(learner, rng, record_property):
    dpo = learner.module("dpo")
    B = 8
    pc, pr, rc, rr = draw(rng, B)
    beta = float(rng.uniform(0.05, 0.5))
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta, "sigmoid", 0.0)
    per_pair = []
    for i in range(B):  # TRL returns the batch mean: one pair at a time gives each pair's loss
        loss, _, which = trl_dpo(pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], beta, "sigmoid")
        per_pair.append(loss)
    mean, metrics, which = trl_dpo(pc, pr, rc, rr, beta, "sigmoid")
    record_property("figures", f"oracle: {which}")
    call = _call(learner, B, beta, "sigmoid", 0.0, 0.0)
    assert_close(losses, torch.stack(per_pair), rtol=1e-10, atol=1e-12, call=call + f"[0] against {which}",
                 mistakes=mistakes_for(pc, pr, rc, rr, beta, "sigmoid"))
    assert_close(losses.mean(), mean, rtol=1e-10, atol=1e-12, call=call + f"[0].mean() against {which}'s loss")
    assert_close(chosen.mean(), metrics["rewards/chosen"], rtol=1e-6, atol=1e-9, call=call + "[1] (chosen rewards), their mean",
                 hint="the implicit reward is beta * (policy_chosen - ref_chosen), as TRL logs rewards/chosen")
    assert_close(rejected.mean(), metrics["rewards/rejected"], rtol=1e-6, atol=1e-9, call=call + "[2] (rejected rewards), their mean")


@pytest.mark.group("dpo_loss")
def test_ipo_against_trl_with_its_length_normalisation(learner, rng, record_property):
    """TRL's IPO divides each summed log-ratio by the completion's length; the learner's dpo_loss gets
    log-probs already averaged (sequence_logprobs(..., average=True)): the same numbers."""
    dpo = learner.module("dpo")
    B = 6
    pc, pr, rc, rr = draw(rng, B)
    lengths = torch.tensor(rng.integers(1, 9, size=2 * B))
    beta = float(rng.uniform(0.1, 1.0))
    avg = [pc / lengths[:B], pr / lengths[B:], rc / lengths[:B], rr / lengths[B:]]
    losses = dpo.dpo_loss(*avg, beta, "ipo")[0]
    want, which = [], ""
    for i in range(B):
        loss, _, which = trl_dpo(pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], beta, "ipo",
                                 torch.stack([lengths[i], lengths[B + i]]))
        want.append(loss)
    record_property("figures", f"oracle: {which}")
    assert_close(losses, torch.stack(want), rtol=1e-10, atol=1e-12,
                 call=_call(learner, B, beta, "ipo", 0.0, 0.0) + f" (length-averaged log-probs) against {which}",
                 mistakes=mistakes_for(*avg, beta, "ipo"), hint="IPO: (h - 1 / (2 beta))^2 with h the margin of the log-ratios")


@pytest.mark.group("dpo_loss")
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_label_smoothing_and_simpo_against_trl_cpo(learner, rng, record_property, loss_type):
    """Conservative DPO (label smoothing) is TRL CPOTrainer's sigmoid loss applied to the log-ratios;
    SimPO is its simpo loss applied to the (length-averaged) policy log-probs."""
    dpo = learner.module("dpo")
    B = 8
    pc, pr, rc, rr = draw(rng, B, spread=1.0)
    beta = float(rng.uniform(0.5, 2.5)) if loss_type == "simpo" else float(rng.uniform(0.05, 0.5))
    eps = float(rng.uniform(0.05, 0.4))
    gamma = float(rng.uniform(0.2, 1.5))
    if loss_type == "simpo":
        pc, pr = pc / 10, pr / 10  # length-averaged log-probs are small
        x, y = pc, pr
    else:
        x, y = pc - rc, pr - rr
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, gamma)
    want, want_c, want_r, which = trl_cpo(x, y, beta, loss_type, eps, gamma)
    record_property("figures", f"oracle: {which}")
    call = _call(learner, B, beta, loss_type, eps, gamma)
    assert_close(losses, want, rtol=1e-10, atol=1e-12, call=call + f"[0] against {which}",
                 mistakes=mistakes_for(pc, pr, rc, rr, beta, loss_type, eps, gamma))
    assert_close(chosen, want_c, rtol=1e-10, atol=1e-12, call=call + "[1] (chosen rewards)",
                 hint="SimPO's reward is beta * policy_chosen (no reference)" if loss_type == "simpo" else
                 "the implicit reward is beta * (policy_chosen - ref_chosen)")
    assert_close(rejected, want_r, rtol=1e-10, atol=1e-12, call=call + "[2] (rejected rewards)")


# --- B. closed forms -------------------------------------------------------------------------------------------


@pytest.mark.group("dpo_loss")
@settings(**SETTINGS)
@given(beta=st.floats(0.01, 5.0), eps=st.sampled_from([0.0, 0.1, 0.3, 0.49]), B=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
@example(beta=0.1, eps=0.0, B=1, seed=0)
def test_zero_margin_is_log2(learner, beta, eps, B, seed):
    dpo = learner.module("dpo")
    g = np.random.default_rng(seed)
    rc, rr = (torch.tensor(-g.uniform(1, 50, size=B), dtype=torch.float64) for _ in range(2))
    shift = torch.tensor(g.normal(0, 5, size=B), dtype=torch.float64)  # the same log-ratio for both: margin 0
    losses, chosen, rejected = dpo.dpo_loss(rc + shift, rr + shift, rc, rr, beta, "sigmoid", eps)
    call = (f"dpo_loss(policy = reference + the same shift for chosen and rejected, beta={beta!r}, "
            f"label_smoothing={eps}) (inputs: np.random.default_rng({seed}), B={B})")
    assert_close(losses, torch.full((B,), math.log(2.0), dtype=torch.float64), rtol=1e-12, atol=1e-12, call=call,
                 hint="at zero margin z = 0 and the loss is log 2 for any beta and label smoothing")
    assert_close(chosen - rejected, torch.zeros(B, dtype=torch.float64), atol=1e-9, call=call + ": chosen - rejected rewards")
    assert_close(chosen, beta * shift, rtol=1e-9, atol=1e-12, call=call + "[1] (chosen rewards)")


@pytest.mark.group("dpo_loss")
def test_ipo_quadratic_and_smoothing_mix(learner, rng):
    dpo = learner.module("dpo")
    beta = 0.25
    h = torch.tensor([-1.0, 0.0, 2.0, 3.5], dtype=torch.float64)  # margins built on purpose
    zeros = torch.zeros(4, dtype=torch.float64)
    ipo = dpo.dpo_loss(h, zeros, zeros, zeros, beta, "ipo")[0]
    assert_close(ipo, (h - 2.0) ** 2, rtol=1e-12, atol=1e-12, call="dpo_loss(margins [-1, 0, 2, 3.5], beta=0.25, 'ipo')",
                 mistakes={"IPO's target margin is 1 / (2 beta) = 2 here, not 1 / beta": (h - 4.0) ** 2,
                           "IPO squares the distance to the target margin": (h - 2.0).abs()})
    for eps in (0.0, 0.2, 0.5):
        got = dpo.dpo_loss(h, zeros, zeros, zeros, 1.0, "sigmoid", eps)[0]
        want = (1 - eps) * -F.logsigmoid(h) + eps * -F.logsigmoid(-h)
        assert_close(got, want, rtol=1e-12, atol=1e-12, call=f"dpo_loss(margins [-1, 0, 2, 3.5], beta=1, label_smoothing={eps})",
                     mistakes={"label smoothing eps weighs the flipped pair: -(1 - eps) logsigmoid(z) - eps logsigmoid(-z)":
                               (1 - eps) * -F.logsigmoid(-h) + eps * -F.logsigmoid(h)} if eps != 0.5 else None)
    sym = dpo.dpo_loss(h, zeros, zeros, zeros, 1.0, "sigmoid", 0.5)[0]
    flipped = dpo.dpo_loss(-h, zeros, zeros, zeros, 1.0, "sigmoid", 0.5)[0]
    assert_close(sym, flipped, rtol=1e-12, atol=1e-12, call="dpo_loss(h) against dpo_loss(-h) at label_smoothing=0.5",
                 hint="at label smoothing 0.5 the pair carries no preference: the loss is the same for h and -h")


@pytest.mark.group("dpo_loss")
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("simpo", 0.1)])
def test_exact_gradient_and_its_direction(learner, rng, loss_type, eps):
    dpo = learner.module("dpo")
    B = 6
    pc, pr, rc, rr = draw(rng, B, spread=2.0)
    if loss_type != "sigmoid":
        pc, pr, rc, rr = (x / 10 for x in (pc, pr, rc, rr))
    beta, gamma = (0.3, 0.5) if loss_type != "simpo" else (2.0, 0.5)
    out, grads = learner.harness("value_and_grad", dpo.dpo_loss, [pc, pr, rc, rr, beta, loss_type, eps, gamma], [0, 1, 2, 3], pick=0)
    leaves = [x.clone().requires_grad_() for x in (pc, pr, rc, rr)]
    closed_form(*leaves, beta, loss_type, eps, gamma).sum().backward()
    names = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    call = f"d sum(dpo_loss(..., beta={beta}, {loss_type!r}, label_smoothing={eps})) / d "
    for k in (0, 1):
        check(grads[k] is not None, f"no gradient reached {names[k]} from the loss (is something detached?)")
        assert_close(grads[k], leaves[k].grad, rtol=1e-9, atol=1e-12, call=call + names[k])
    if loss_type == "simpo":
        check(all(g is None or bool((g == 0).all()) for g in grads[2:]),
              "SimPO's loss depends on the reference's log-probs: it has no reference (they are ignored)")
    else:
        for k in (2, 3):
            assert_close(grads[k], leaves[k].grad, rtol=1e-9, atol=1e-12, call=call + names[k])
    if loss_type == "sigmoid" and eps == 0.0:
        check(bool((grads[0] < 0).all()) and bool((grads[1] > 0).all()),
              "DPO's gradient must raise every chosen log-prob and lower every rejected one (d loss / d chosen < 0, "
              f"d loss / d rejected > 0); got {grads[0].tolist()} and {grads[1].tolist()}")


@pytest.mark.group("dpo_loss")
def test_huge_margins_stay_finite(learner):
    """Margins of +-1e3 (float32 sequence log-probs differ by that much): logsigmoid stays finite where
    log(sigmoid(z)) is log(0) = -inf."""
    dpo = learner.module("dpo")
    pc = torch.tensor([-1.0, -2000.0, -5.0, -3.0])
    pr = torch.tensor([-2000.0, -1.0, -5.0, -4.0])
    zeros = torch.zeros(4)
    losses = dpo.dpo_loss(pc, pr, zeros, zeros, 1.0, "sigmoid", 0.1)[0]
    z = (pc - pr).double()
    want = -(0.9 * F.logsigmoid(z) + 0.1 * F.logsigmoid(-z))
    hint = "use F.logsigmoid(z): log(sigmoid(z)) is log(0) = -inf once sigmoid underflows (z below about -100)"
    # float32: logsigmoid(-1999) = -1999 exactly representable to ~1e-4
    assert_close(losses, want, rtol=1e-5, atol=1e-4, call="dpo_loss(float32 margins [1999, -1999, 0, 1], beta=1, label_smoothing=0.1)",
                 hint=hint, nan_hint=hint)


@pytest.mark.group("dpo_loss")
def test_rewards_are_detached(learner, rng):
    dpo = learner.module("dpo")
    pc, pr, rc, rr = draw(rng, 4)
    for pick, name in ((1, "chosen"), (2, "rejected")):
        _, grads = learner.harness("value_and_grad", dpo.dpo_loss, [pc, pr, rc, rr, 0.1], [0, 1], pick=pick)
        check(all(g is None for g in grads), f"dpo_loss(...)[{pick}] ({name} rewards) carries a gradient back to the "
                                            "policy's log-probs: the rewards are statistics, detach them")


# --- B. the statistics ------------------------------------------------------------------------------------------


@pytest.mark.group("dpo_metrics")
def test_preference_stats_against_trl_metrics(learner, rng, record_property):
    dpo = learner.module("dpo")
    B = 10
    pc, pr, rc, rr = draw(rng, B)
    beta = 0.2
    _, metrics, which = trl_dpo(pc, pr, rc, rr, beta, "sigmoid")
    stats = dpo.preference_stats(beta * (pc - rc), beta * (pr - rr))
    record_property("figures", f"oracle: {which}")
    check(isinstance(stats, dict) and {"accuracy", "margin", "chosen", "rejected"} <= set(stats),
          f"preference_stats returned {stats!r}; expected a dict with 'accuracy', 'margin', 'chosen', 'rejected'")
    for key, trl_key in (("accuracy", "rewards/accuracies"), ("margin", "rewards/margins"), ("chosen", "rewards/chosen"),
                         ("rejected", "rewards/rejected")):
        check(isinstance(stats[key], float), f"preference_stats(...)[{key!r}] is {type(stats[key]).__name__}; expected a float")
        # TRL computes the accuracy in float32
        assert_close(stats[key], metrics[trl_key], rtol=1e-6, atol=1e-7,
                     call=f"preference_stats(10 chosen and rejected rewards)[{key!r}] against {which}'s {trl_key}")


@pytest.mark.group("dpo_metrics")
def test_preference_stats_ties_and_signs(learner):
    dpo = learner.module("dpo")
    chosen = torch.tensor([0.0, 0.0, 1.0, -2.0, 0.5, 0.25], dtype=torch.float64)
    rejected = torch.tensor([0.0, 1.0, 0.0, -2.0, 0.5, -0.25], dtype=torch.float64)  # tie, loss, win, tie, tie, win
    stats = dpo.preference_stats(chosen, rejected)
    want = {"accuracy": 2 / 6, "margin": (0 - 1 + 1 + 0 + 0 + 0.5) / 6, "chosen": -0.25 / 6, "rejected": -0.75 / 6}
    for key, value in want.items():
        # a share computed in float32 (as TRL does) is exact to ~1e-8
        assert_close(stats[key], value, rtol=1e-6, atol=1e-9,
                     call=f"preference_stats(chosen {chosen.tolist()}, rejected {rejected.tolist()})[{key!r}]",
                     mistakes={"a tie is not a win: accuracy counts chosen > rejected, strictly": 5 / 6,
                               "accuracy is the share of pairs whose chosen reward is higher, not of those whose "
                               "rejected reward is": 1 / 6} if key == "accuracy" else
                     {"margin is the mean of chosen - rejected": -value} if key == "margin" else None)
