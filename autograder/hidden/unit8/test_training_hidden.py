"""Hidden tests, Unit 8 part D: dpo_step and grpo_step against replays run here from the same weights
(made here) on the same batch, one unpadded sequence at a time (every loss type; gradient clipping
that bites; GRPO's logp_old taken once before several iterations; the statistics returned; the
reference left as it was), then the course's loops run here with the learner's steps: DPO on
preference pairs written to files and loaded with datasets must reach a held-out reward accuracy
and margin with KL to the reference bounded, and GRPO on arithmetic must raise the mean reward, all
measured here on the weights that come back."""

import dataclasses
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check
from autograder.testing import one_torch_thread
from autograder.course_code import reference_module


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one torch thread here is several times faster than two on a shared machine."""
    with one_torch_thread():
        yield

CONFIG = dict(vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2)


def trusted_models(learner, seed, n=2):
    gpt = learner.course("common.gpt")
    models = []
    for k in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % 100_000 + k)
            model = gpt.GPT(gpt.GPTConfig(**CONFIG))
        for p in model.parameters():
            if p.dim() > 1:
                p.data.mul_(3.0)  # away from GPT-2's tiny init: the two models differ, gradients are not tiny
        models.append(model)
    return models


def learner_copy(learner, model):
    theirs = learner.module("common.gpt")
    copy = theirs.GPT(theirs.GPTConfig(**dataclasses.asdict(model.config)))
    copy.load_state_dict(model.state_dict())
    return copy


def row_token_logps(model, ids, attention, response):
    """Per row, unpadded: log p of each scored token (response tokens after the first real token), [n_scored]."""
    real = attention > 0
    row = ids[real].unsqueeze(0)
    logits = model(row)[0, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, row[0, 1:].unsqueeze(-1)).squeeze(-1)
    return logp, response[real][1:] > 0


def copy_of(model):
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


# --- D. dpo_step against a replay ------------------------------------------------------------------------


def dpo_replay(policy, reference, batch, cfg, lr, steps, *, swap=False, clip=True, average=None):
    """The handout's dpo_step, ``steps`` times with SGD, here: (weights, per-step losses, last stats)."""
    policy, reference = copy_of(policy), copy_of(reference)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    n = ids.shape[0] // 2
    average = cfg["loss_type"] in ("ipo", "simpo") if average is None else average

    def seq(model, b):
        logp, scored = row_token_logps(model, ids[b], att[b], resp[b])
        total = torch.where(scored, logp, torch.zeros_like(logp)).sum()
        return total / scored.sum() if average else total

    losses, stats = [], {}
    for _ in range(steps):
        logps = torch.stack([seq(policy, b) for b in range(2 * n)])
        with torch.no_grad():
            ref = torch.stack([seq(reference, b) for b in range(2 * n)])
        pc, pr = (logps[n:], logps[:n]) if swap else (logps[:n], logps[n:])
        rc, rr = (ref[n:], ref[:n]) if swap else (ref[:n], ref[n:])
        beta, eps = cfg["beta"], cfg["label_smoothing"]
        chosen, rejected = (pc, pr) if cfg["loss_type"] == "simpo" else (pc - rc, pr - rr)
        if cfg["loss_type"] == "ipo":
            per = (chosen - rejected - 1 / (2 * beta)) ** 2
        else:
            z = beta * (chosen - rejected) - (cfg["gamma"] if cfg["loss_type"] == "simpo" else 0.0)
            per = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        loss = per.mean()
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg["max_grad_norm"])
        optimizer.step()
        cr, rj = (beta * chosen).detach(), (beta * rejected).detach()
        losses.append(float(loss))
        stats = {"loss": float(loss), "accuracy": float((cr > rj).double().mean()), "margin": float((cr - rj).mean()),
                 "chosen": float(cr.mean()), "rejected": float(rj.mean())}
    return policy.state_dict(), losses, stats


def _check_weights(mine, ref, what, mistakes):
    # float32, a few SGD steps on a batched vs a row-by-row forward: differences of summation order only (~1e-6)
    tol = dict(rtol=1e-3, atol=1e-5)
    close = all(isinstance(mine.get(k), torch.Tensor) and mine[k].shape == v.shape
                and torch.allclose(mine[k].double(), v.double(), **tol) for k, v in ref.items())
    wrong = {} if close else {hint: replay() for hint, replay in mistakes.items()}
    for name, reference in ref.items():
        assert_close(mine[name], reference, **tol, call=f"{what}: weight {name} afterwards",
                     mistakes={hint: weights[name] for hint, weights in wrong.items()},
                     hint="compare with the handout's step: the policy's log-probs with a graph, the reference's without, "
                          "the mean loss over the pairs, zero_grad, backward, clip_grad_norm_, step")


@pytest.mark.group("steps")
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.15), ("ipo", 0.0), ("simpo", 0.1)])
def test_dpo_step_against_replay(learner, seed, loss_type, eps):
    dpo, torch_l, tasks = learner.module("dpo"), learner.lib("torch"), learner.course("tasks")
    policy, reference = trusted_models(learner, seed)
    batch = tasks.collate_pairs(tasks.make_preference_rows(seed % 100_000, 6))  # left- and right-padded, made here
    cfg = dict(beta={"sigmoid": 0.5, "ipo": 0.5, "simpo": 2.0}[loss_type], loss_type=loss_type, label_smoothing=eps,
               gamma=0.4, max_grad_norm=0.5)
    lr, steps = 0.05, 3
    mine_policy, mine_ref = learner_copy(learner, policy), learner_copy(learner, reference)
    optimizer = torch_l.optim.SGD(mine_policy.parameters(), lr=lr)
    results = [dpo.dpo_step(mine_policy, mine_ref, optimizer, batch, dpo.DPOConfig(**cfg)) for _ in range(steps)]
    want, losses, stats = dpo_replay(policy, reference, batch, cfg, lr, steps)
    what = f"{steps} x dpo_step(policy, reference, SGD(lr={lr}), 6 pairs, DPOConfig({cfg}))"
    check(all(isinstance(r, dict) for r in results), f"{what} returned {results[0]!r}; expected dicts of statistics")
    mistakes = {"the first half of the batch's rows are the chosen responses, the second half the rejected":
                lambda: dpo_replay(policy, reference, batch, cfg, lr, steps, swap=True)[0],
                "clip the policy's gradient norm to max_grad_norm after backward and before step":
                lambda: dpo_replay(policy, reference, batch, cfg, lr, steps, clip=False)[0]}
    if loss_type in ("ipo", "simpo"):
        mistakes[f"{loss_type} uses length-averaged log-probs: average=True for the policy and the reference"] = \
            lambda: dpo_replay(policy, reference, batch, cfg, lr, steps, average=False)[0]
    _check_weights(mine_policy.state_dict(), want, what, mistakes)
    ref_after = mine_ref.state_dict()
    check(all(torch.equal(ref_after[k], v) for k, v in reference.state_dict().items()),
          f"{what} changed the reference's weights: only the policy is trained")
    for step, (result, loss) in enumerate(zip(results, losses)):
        # float32 losses of a batched vs a row-by-row forward
        assert_close(result.get("loss"), loss, rtol=1e-4, atol=1e-6, call=f"{what}: step {step + 1}'s 'loss' (before its update)")
    for key in ("accuracy", "margin", "chosen", "rejected"):
        assert_close(results[-1].get(key), stats[key], rtol=1e-4, atol=1e-6,
                     call=f"{what}: the last step's {key!r}", hint="preference_stats of the step's implicit rewards")


# --- D. grpo_step against a replay ----------------------------------------------------------------------


def grpo_batch(rng, N, G):
    """Sampled-looking sequences [N, 9]: left-padded prompts (2-4 tokens), responses of 1-4 tokens, rewards."""
    T = 9
    ids = torch.tensor(rng.integers(0, 16, size=(N, T)))
    attention = np.zeros((N, T), dtype=np.float32)
    response = np.zeros((N, T), dtype=np.float32)
    for i in range(N):
        p, r = int(rng.integers(2, 5)), int(rng.integers(1, 5))
        attention[i, 4 - p : 4 + r] = 1.0
        response[i, 4 : 4 + r] = 1.0
    rewards = torch.tensor(rng.normal(size=N), dtype=torch.float32)
    rewards[:G] = 1.0  # one group of equal rewards: advantages 0
    return {"input_ids": ids, "attention_mask": torch.tensor(attention), "response_mask": torch.tensor(response),
            "rewards": rewards}


def grpo_replay(policy, reference, batch, cfg, lr, *, old_each_time=False, group_std=True, clip=True):
    """The handout's grpo_step with SGD, here, one unpadded row at a time: (weights, stats)."""
    policy, reference = copy_of(policy), copy_of(reference)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    ids, att, resp, rewards = batch["input_ids"], batch["attention_mask"], batch["response_mask"], batch["rewards"]
    N, G = ids.shape[0], cfg["group_size"]
    r = rewards.double().view(-1, G)
    adv = r - r.mean(1, keepdim=True)
    if cfg["scale_rewards"]:
        adv = adv / ((r.std(1, keepdim=True) if group_std else rewards.double().std()) + 1e-4)
    adv = adv.reshape(-1).float()

    def scored(model):
        return [row_token_logps(model, ids[b], att[b], resp[b]) for b in range(N)]

    with torch.no_grad():
        old = [lp for lp, _ in scored(policy)]
        ref = [lp for lp, _ in scored(reference)]
    totals = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0}
    eps, beta = cfg["clip_eps"], cfg["beta"]
    for _ in range(cfg["iterations"]):
        rows = scored(policy)
        if old_each_time:
            old = [lp.detach() for lp, _ in rows]
        per_seq, tokens, kl_sum, clipped_sum, count = [], [], 0.0, 0.0, 0
        for b, (logp, m) in enumerate(rows):
            lp, lo, lr_ = logp[m], old[b][m], ref[b][m]
            ratio = (lp - lo).exp()
            a = adv[b]
            per = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
            d = lr_ - lp
            k3 = d.exp() - d - 1
            per = per + beta * k3
            per_seq.append(per.mean())
            tokens.append(per)
            kl_sum += float(k3.sum())
            clipped_sum += float((((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))).sum())
            count += int(m.sum())
        loss = torch.stack(per_seq).mean() if cfg["aggregation"] == "sequence" else torch.cat(tokens).sum() / count
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg["max_grad_norm"])
        optimizer.step()
        totals["loss"] += float(loss)
        totals["kl"] += kl_sum / count
        totals["clipfrac"] += clipped_sum / count
    steps = cfg["iterations"]
    return policy.state_dict(), {**{k: v / steps for k, v in totals.items()}, "steps": steps}


@pytest.mark.group("steps")
# iterations=1 too: the statistics are then those of the one step (a mean over max(steps, 2) halves them)
@pytest.mark.parametrize("aggregation, scale, iterations", [("sequence", True, 3), ("token", False, 3), ("token", True, 1)])
def test_grpo_step_against_replay(learner, rng, seed, aggregation, scale, iterations):
    grpo, torch_l = learner.module("grpo"), learner.lib("torch")
    policy, reference = trusted_models(learner, seed + 7)
    G = 4
    batch = grpo_batch(rng, 3 * G, G)
    cfg = dict(group_size=G, clip_eps=0.1, beta=0.2, scale_rewards=scale, aggregation=aggregation,
               iterations=iterations, max_grad_norm=0.5)
    lr = 0.3  # large SGD steps: the ratios leave [1 - eps, 1 + eps] by the third iteration
    mine_policy, mine_ref = learner_copy(learner, policy), learner_copy(learner, reference)
    stats = grpo.grpo_step(mine_policy, mine_ref, torch_l.optim.SGD(mine_policy.parameters(), lr=lr), batch,
                           grpo.GRPOConfig(**cfg))
    want, want_stats = grpo_replay(policy, reference, batch, cfg, lr)
    what = f"grpo_step(policy, reference, SGD(lr={lr}), 12 responses in 3 groups of 4, GRPOConfig({cfg}))"
    mistakes = {"take logp_old once, under no_grad, before the first iteration (the policy that sampled), not at "
                "every iteration": lambda: grpo_replay(policy, reference, batch, cfg, lr, old_each_time=True)[0],
                "clip the gradient norm to max_grad_norm after backward and before step":
                lambda: grpo_replay(policy, reference, batch, cfg, lr, clip=False)[0]}
    if scale:
        mistakes["the advantages' std is each group's own, not the batch's"] = \
            lambda: grpo_replay(policy, reference, batch, cfg, lr, group_std=False)[0]
    _check_weights(mine_policy.state_dict(), want, what, mistakes)
    check(isinstance(stats, dict) and stats.get("steps") == iterations,
          f"{what} returned {stats!r}; expected a dict with 'steps': {iterations} (one optimizer step per iteration)")
    # one iteration: every ratio is exactly 1 (logp_old is the policy itself), so nothing can be clipped
    check(want_stats["clipfrac"] > 0 or iterations == 1, f"test set-up: no token was clipped ({want_stats})")
    for key in ("loss", "kl", "clipfrac"):
        # float32; clipfrac counts ratios against 1 +- eps, where one token of ~30 may fall either side
        tol = dict(rtol=1e-3, atol=0.04) if key == "clipfrac" else dict(rtol=1e-3, atol=1e-5)
        assert_close(stats.get(key), want_stats[key], call=f"{what}[{key!r}] (the mean over the {iterations} iteration(s))",
                     **tol)
    ref_after = mine_ref.state_dict()
    check(all(torch.equal(ref_after[k], v) for k, v in reference.state_dict().items()),
          f"{what} changed the reference's weights: only the policy is trained")
    if iterations == 1:  # and its edge, iterations=0: no step, the statistics of no step, no ZeroDivisionError
        idle_policy = learner_copy(learner, policy)
        none = dict(cfg, iterations=0)
        idle = grpo.grpo_step(idle_policy, learner_copy(learner, reference),
                              torch_l.optim.SGD(idle_policy.parameters(), lr=lr), batch, grpo.GRPOConfig(**none))
        check(isinstance(idle, dict) and idle.get("steps") == 0
              and all(idle.get(key) == 0.0 for key in ("loss", "kl", "clipfrac")),
              f"grpo_step(..., GRPOConfig({none})) returned {idle!r}; expected {{'loss': 0.0, 'kl': 0.0, 'clipfrac': "
              "0.0, 'steps': 0}\nHint: the mean over no iterations: divide the totals by max(steps, 1)")
        after = idle_policy.state_dict()
        check(all(torch.equal(after[k], v) for k, v in policy.state_dict().items()),
              f"grpo_step(..., GRPOConfig({none})) changed the policy's weights: zero iterations take no step")



# --- D. end to end: the course's loops run here with the learner's steps ------------------------------------


@pytest.mark.group("end_to_end")
def test_dpo_learns_the_preference_rule(learner, seed, record_property):
    tasks, loops = learner.course("tasks"), learner.course("graded_loops")  # data, batches, loop and measures here
    s = seed % 10_000
    folder = Path(tempfile.mkdtemp(prefix="unit8-dpo-"))
    train = tasks.load_preferences(tasks.write_jsonl(tasks.make_preference_rows(s, 512), folder / "train.jsonl"))
    held_out = tasks.make_preference_rows(s + 50_000, 256)  # prompts the policy never saw
    policy = tasks.new_policy(s)
    reference = tasks.frozen_copy(policy)
    start = tasks.evaluate_preferences(policy, reference, held_out, 0.1)
    with loops.LearnerSteps(learner, "dpo", 120, "DPO on preference pairs") as dpo:
        history = tasks.train_dpo(policy, reference, train, steps=100, seed=s, dpo=dpo)
    end = tasks.evaluate_preferences(policy, reference, held_out, 0.1)
    record_property("figures", f"seed {s}: held-out accuracy {start['accuracy']:.2f} -> {end['accuracy']:.2f}, margin "
                               f"{end['margin']:.3f}, KL {end['kl']:.3f} nats/token after 100 steps ({dpo.steps} calls)")
    # Calibration (seeds 0-4, and 30 random seeds): accuracy 0.82-0.97, margin 0.48-1.31, KL 1.2-1.9 with the
    # course's solution;
    # a policy that does not move scores 0 (every margin is exactly 0); chosen and rejected swapped: ~0.05
    check(end["accuracy"] >= 0.7 and end["margin"] >= 0.2,
          f"DPO (seed {s}, 100 steps of 32 pairs): held-out reward accuracy {end['accuracy']:.2f}, margin "
          f"{end['margin']:.3f} (measured here on your weights, one pair at a time); expected >= 0.7 and >= 0.2. Check "
          "the sign of the margin in dpo_loss and that the chosen rows are the first half of the batch")
    check(end["kl"] <= 3.0, f"DPO (seed {s}): KL(policy || reference) is {end['kl']:.2f} nats per response token after 100 "
                            "steps; expected <= 3 (the course's solution: about 1.5). beta scales the margin: z = beta * h")
    check(all(isinstance(h.get("loss"), float) for h in history), "dpo_step's 'loss' must be a float at every step")


def _grpo_run(tasks, s: int, grpo) -> tuple[float, float]:
    """(mean reward of the first 10 updates, of the last 10): 150 updates from the policy of seed s + 1."""
    policy = tasks.new_policy(s + 1)
    history = tasks.train_grpo(policy, tasks.frozen_copy(policy), updates=150, seed=s, grpo=grpo)
    return statistics.mean(h["reward"] for h in history[:10]), statistics.mean(h["reward"] for h in history[-10:])


def _seed_the_reference_solves(tasks, seed: int) -> int:
    """The task's seed: the grading seed's, or the next one where the reference solution itself,
    run here, ends above the bar.  A few seeds (9264: 0.27 after 150 updates; about 1 in 30 of a
    sweep) are harder than the bar; a learner is judged only where correct code gets there."""
    for k in range(20):
        candidate = (seed + k) % 10_000
        if _grpo_run(tasks, candidate, reference_module("unit8.grpo"))[1] >= GRPO_BAR:
            return candidate
    raise AssertionError(f"the reference solution passes none of the seeds from {seed % 10_000} on (a course bug)")


GRPO_BAR = 0.3  # the last 10 updates' mean reward: a fresh policy gets about 1/16


@pytest.mark.group("end_to_end")
def test_grpo_raises_the_reward(learner, seed, record_property):
    tasks, loops = learner.course("tasks"), learner.course("graded_loops")  # sampling, rewards and loop here
    s = _seed_the_reference_solves(tasks, seed)
    policy = tasks.new_policy(s + 1)
    reference = tasks.frozen_copy(policy)
    with loops.LearnerSteps(learner, "grpo", 150, "GRPO on arithmetic") as grpo:
        history = tasks.train_grpo(policy, reference, updates=150, seed=s, grpo=grpo)
    first = statistics.mean(h["reward"] for h in history[:10])
    last = statistics.mean(h["reward"] for h in history[-10:])
    greedy = tasks.greedy_accuracy(policy)
    record_property("figures", f"seed {s}: mean reward {first:.2f} -> {last:.2f}, greedy accuracy {greedy:.2f}, sampled KL "
                               f"{history[-1]['sampled_kl']:.2f} after 150 updates")
    # Calibration (the course's solution, 30 random seeds): first 10 updates 0.05-0.09, last 10 0.27-0.67, the one
    # seed under the bar (9264) skipped by _seed_the_reference_solves; a step that does not learn stays near 1/16;
    # advantages with the wrong sign drive the reward to 0
    check(first <= 0.2, f"GRPO (seed {s}): the mean reward of the first 10 updates is {first:.2f}; a fresh policy gets about 1/16")
    check(last >= GRPO_BAR, f"GRPO on arithmetic (seed {s}): the mean reward rose from {first:.2f} (first 10 updates) to only "
                       f"{last:.2f} (last 10 of 150), measured here on the responses your weights sampled; expected >= {GRPO_BAR}. "
                       "Check the sign of the advantages and of the surrogate")
