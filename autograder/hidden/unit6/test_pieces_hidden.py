"""Hidden tests, Unit 6 parts A-C: GAE (episode ends, token masks), masked statistics, entropy and
log-probs from logits, the clipped policy and value losses (values, gradients, masks) and RLHF
reward shaping, each against an independent oracle on inputs drawn from the grading run's seed."""


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close, check

SETTINGS = dict(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


# --- oracles (float64, plain loops: slow and obviously right) ---------------------------------


def gae_oracle(r, v, d, gamma, lam, next_value=None, use_dones=True):
    r, v, d = (np.asarray(a, dtype=np.float64) for a in (r, v, d))
    T = r.shape[0]
    nv = np.zeros_like(v[0]) if next_value is None else np.asarray(next_value, dtype=np.float64)
    adv = np.zeros_like(r)
    last = np.zeros_like(v[0])
    for t in reversed(range(T)):
        nonterm = 1.0 - d[t] if use_dones else np.ones_like(d[t])
        v_next = nv if t == T - 1 else v[t + 1]
        delta = r[t] + gamma * v_next * nonterm - v[t]
        last = delta + gamma * lam * nonterm * last
        adv[t] = last
    return adv, adv + v


def gae_masked_oracle(r, v, m, gamma, lam):
    r, v, m = (np.asarray(a, dtype=np.float64) for a in (r, v, m))
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b] > 0)
        if len(idx) == 0:
            continue
        done = np.zeros(len(idx))
        done[-1] = 1.0
        a, _ = gae_oracle(r[b, idx], v[b, idx], done, gamma, lam)
        adv[b, idx] = a
    return adv, np.where(m > 0, adv + v, 0.0)


def masked_mean_oracle(x, m, dim=None):
    x, m = np.asarray(x, dtype=np.float64), np.asarray(m, dtype=np.float64)
    x = np.where(m > 0, x, 0.0)
    return (x * m).sum() / m.sum() if dim is None else (x * m).sum(dim) / m.sum(dim)


def whiten_oracle(x, m, shift_mean=True):
    x, m = np.asarray(x, dtype=np.float64), np.asarray(m, dtype=np.float64)
    vals = x[m > 0]
    mean, var = vals.mean(), vals.var(ddof=1)
    out = (x - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return np.where(m > 0, out, 0.0)


def policy_loss_oracle(logp_new, logp_old, adv, eps, mask=None, swap=False, clip_adv=False):
    logp_new, logp_old, adv = (torch.as_tensor(a, dtype=torch.float64) for a in (logp_new, logp_old, adv))
    lr = logp_new - logp_old
    ratio = lr.exp()
    if clip_adv:
        clipped = -adv.clamp(-eps, eps) * ratio
    else:
        clipped = -adv * ratio.clamp(1 - eps, 1 + eps)
    per = torch.min(-adv * ratio, clipped) if swap else torch.max(-adv * ratio, clipped)
    m = torch.ones_like(lr) if mask is None else torch.as_tensor(mask, dtype=torch.float64)
    mean = lambda x: torch.where(m > 0, x, torch.zeros_like(x)).mul(m).sum() / m.sum()  # noqa: E731
    return mean(per), mean(((ratio - 1).abs() > eps).double()), mean(-lr), mean(ratio - 1 - lr)


def value_loss_oracle(vn, vo, R, eps=None, mask=None, around_new=False, use_min=False):
    vn, vo, R = (torch.as_tensor(a, dtype=torch.float64) for a in (vn, vo, R))
    loss = (vn - R) ** 2
    if eps is not None:
        center = vn if around_new else vo
        vclip = center + (vn - vo).clamp(-eps, eps)
        loss = torch.min(loss, (vclip - R) ** 2) if use_min else torch.max(loss, (vclip - R) ** 2)
    m = torch.ones_like(vn) if mask is None else torch.as_tensor(mask, dtype=torch.float64)
    return 0.5 * torch.where(m > 0, loss, torch.zeros_like(loss)).mul(m).sum() / m.sum()


def random_mask(rng, B, T, min_len=1):
    """Left padding (a prompt), a response of random length, right padding: rows differ."""
    m = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        start = int(rng.integers(0, T - min_len + 1))
        end = int(rng.integers(start + min_len, T + 1))
        m[b, start:end] = 1.0
    return m


# --- A. GAE --------------------------------------------------------------------------------------


@pytest.mark.group("gae")
def test_gae_against_oracle(learner, rng):
    ppo = learner.module("ppo")
    T, N = 17, 5
    r = rng.normal(size=(T, N))
    v = rng.normal(size=(T, N))
    d = (rng.random((T, N)) < 0.2).astype(np.float64)
    d[3, :] = 1.0  # at least one episode end in every column
    nv = rng.normal(size=N)
    gamma, lam = float(rng.uniform(0.8, 0.999)), float(rng.uniform(0.8, 0.99))
    adv, ret = ppo.compute_gae(torch.tensor(r), torch.tensor(v), torch.tensor(d), gamma, lam, next_value=torch.tensor(nv))
    want, want_ret = gae_oracle(r, v, d, gamma, lam, nv)
    # float64 inputs, a 17-step recursion: only rounding differs
    assert_close(adv, want, rtol=1e-9, atol=1e-9, call=f"compute_gae(r[{T},{N}] float64, dones with episode ends, next_value[{N}])",
                 mistakes={"GAE must stop at episode ends: multiply the next value AND the next advantage by (1 - dones[t])":
                           gae_oracle(r, v, d, gamma, lam, nv, use_dones=False)[0],
                           "dones[t] == 1 ends the episode at step t itself (not at t + 1)":
                           gae_oracle(r, v, np.concatenate([np.zeros((1, N)), d[:-1]]), gamma, lam, nv)[0]})
    assert_close(ret, want_ret, rtol=1e-9, atol=1e-9, call="compute_gae(...) returns", hint="returns = advantages + values")


@pytest.mark.group("gae")
def test_gae_next_value_defaults_to_zero(learner, rng):
    ppo = learner.module("ppo")
    r, v = rng.normal(size=(6,)), rng.normal(size=(6,))
    d = np.zeros(6)
    adv, _ = ppo.compute_gae(torch.tensor(r), torch.tensor(v), torch.tensor(d), 0.99, 0.95)
    assert_close(adv, gae_oracle(r, v, d, 0.99, 0.95)[0], rtol=1e-9, atol=1e-9,
                 call="compute_gae(r[6], v[6], no dones, next_value=None)", hint="next_value=None means V_T = 0")


@pytest.mark.group("gae")
@settings(**SETTINGS)
@given(cut=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_gae_episodes_are_independent(learner, cut, seed):
    """Across a done, what comes after cannot change the advantages before it."""
    ppo = learner.module("ppo")
    g = np.random.default_rng(seed)
    T = 12
    r, v = g.normal(size=(T, 2)), g.normal(size=(T, 2))
    d = np.zeros((T, 2))
    d[cut - 1] = 1.0
    full, _ = ppo.compute_gae(torch.tensor(r), torch.tensor(v), torch.tensor(d), 0.97, 0.9)
    head, _ = ppo.compute_gae(torch.tensor(r[:cut]), torch.tensor(v[:cut]), torch.tensor(d[:cut]), 0.97, 0.9)
    assert_close(full[:cut], head, rtol=1e-9, atol=1e-9,
                 call=f"compute_gae over 12 steps with dones at step {cut - 1}, first {cut} steps vs those steps alone",
                 hint="an episode's advantages must not see the next episode: GAE resets at dones")
    # and they are the episode's own advantages (a compute_gae that returns zeros is "independent" too)
    assert_close(head, gae_oracle(r[:cut], v[:cut], d[:cut], 0.97, 0.9)[0], rtol=1e-9, atol=1e-9,
                 call=f"compute_gae over the first {cut} steps (an episode that ends at its last step)")


def _with_holes(g, m):
    """Mask out one interior position of every response of 3 or more tokens."""
    m = m.copy()
    for b in range(m.shape[0]):
        idx = np.flatnonzero(m[b])
        if len(idx) >= 3:
            m[b, idx[int(g.integers(1, len(idx) - 1))]] = 0.0
    return m


@pytest.mark.group("gae")
def test_gae_masked_skips_holes(learner, rng):
    """A masked-out position inside a response is not a step: GAE carries across it."""
    ppo = learner.module("ppo")
    B, T = 4, 9
    m = np.zeros((B, T), dtype=np.float32)
    m[:, 2:8] = 1.0
    m = _with_holes(rng, m)
    r = np.where(m > 0, rng.normal(size=(B, T)), 1e3)
    v = np.where(m > 0, rng.normal(size=(B, T)), -1e3)
    lam = float(rng.uniform(0.8, 0.99))
    adv, _ = ppo.compute_gae_masked(torch.tensor(r), torch.tensor(v), torch.tensor(m), 1.0, lam)
    assert_close(adv, gae_masked_oracle(r, v, m, 1.0, lam)[0], rtol=1e-9, atol=1e-9,
                 call=f"compute_gae_masked(r[{B},{T}], mask 001111110 with one hole per row, gamma 1, lam {lam:.3f})",
                 hint="skip masked-out positions entirely: carry the next value and advantage across them")


@pytest.mark.group("gae")
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 5), T=st.integers(1, 10), holes=st.booleans())
def test_gae_masked_against_oracle(learner, seed, B, T, holes):
    ppo = learner.module("ppo")
    g = np.random.default_rng(seed)
    m = random_mask(g, B, T)
    if holes:
        m = _with_holes(g, m)
    r = np.where(m > 0, g.normal(size=(B, T)), 1e3)  # garbage outside the mask
    v = np.where(m > 0, g.normal(size=(B, T)), -1e3)
    adv, ret = ppo.compute_gae_masked(torch.tensor(r), torch.tensor(v), torch.tensor(m), 1.0, 0.95)
    want, want_ret = gae_masked_oracle(r, v, m, 1.0, 0.95)
    assert_close(adv, want, rtol=1e-9, atol=1e-9, call=f"compute_gae_masked(r[{B},{T}], v, mask with {int(m.sum())} ones, gamma 1, lam .95)",
                 hint="skip masked-out positions entirely: carry the next value and advantage across them; 0 after each row's last token")
    assert_close(ret, want_ret, rtol=1e-9, atol=1e-9, call="compute_gae_masked(...) returns (0 outside the mask)")


# --- A. masked statistics, entropy, log-probs ---------------------------------------------------


@pytest.mark.group("masked_ops")
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_masked_mean(learner, rng, dim):
    ppo = learner.module("ppo")
    m = random_mask(rng, 6, 9)
    m[:, 0] = 1.0  # every row and column has a position
    m[0, :] = 1.0
    x = np.where(m > 0, rng.normal(size=(6, 9)), rng.uniform(1e4, 1e5, size=(6, 9)))
    for mask in (torch.tensor(m), torch.tensor(m > 0)):
        got = ppo.masked_mean(torch.tensor(x), mask, dim)
        assert_close(got, masked_mean_oracle(x, m, dim), rtol=1e-10, atol=1e-12,
                     call=f"masked_mean(x[6,9] float64, {mask.dtype} mask, dim={dim})",
                     mistakes={"divide by the number of masked positions, not by the number of elements":
                               np.where(m > 0, x, 0).sum() / x.size if dim is None else np.where(m > 0, x, 0).mean(dim)})


@pytest.mark.group("masked_ops")
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(learner, rng, shift_mean):
    ppo = learner.module("ppo")
    m = random_mask(rng, 5, 8, min_len=2)
    x = np.where(m > 0, rng.normal(3.0, 2.0, size=(5, 8)), rng.uniform(50, 100, size=(5, 8)))
    got = ppo.masked_whiten(torch.tensor(x), torch.tensor(m), shift_mean)
    everywhere = (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8) + (0 if shift_mean else x.mean())
    vals = x[m > 0]
    biased = np.where(m > 0, (x - vals.mean()) / np.sqrt(vals.var() + 1e-8) + (0 if shift_mean else vals.mean()), 0.0)
    assert_close(got, whiten_oracle(x, m, shift_mean), rtol=1e-8, atol=1e-10,
                 call=f"masked_whiten(x[5,8] float64, mask, shift_mean={shift_mean})",
                 mistakes={"the mean and variance must come from the masked positions only": np.where(m > 0, everywhere, 0.0),
                           "the mean and variance must come from the masked positions only (and the output is 0 outside the mask)": everywhere,
                           "use the Bessel-corrected variance: multiply by n / (n - 1)": biased})


@pytest.mark.group("masked_ops")
def test_entropy_against_float64(learner, rng):
    ppo = learner.module("ppo")
    z = rng.normal(size=(3, 4, 40)) * np.array([1.0, 30.0, 1e3])[:, None, None]
    z[2, 0, :3] = [1e4, -1e4, 1e4]
    logits = torch.tensor(z, dtype=torch.float32)
    zd = logits.double()
    want = -(zd.softmax(-1) * zd.log_softmax(-1)).sum(-1)
    got = ppo.entropy_from_logits(logits)
    check(isinstance(got, torch.Tensor) and got.shape == (3, 4), f"entropy_from_logits(float32 [3,4,40]) gave shape "
                                                                 f"{getattr(got, 'shape', None)}; expected (3, 4)")
    hint = "-(p * log p) is nan where p underflows to 0; logsumexp(z) - sum(p * z) is not"
    # float32 softmax over 40 values: absolute error ~1e-6 per term at scale 1-30
    assert_close(got[:2], want[:2], rtol=1e-4, atol=1e-4, call="entropy_from_logits(float32 [2,4,40], scales 1 and 30)", hint=hint)
    # scale 1e3-1e4: float32 spacing near 1e4 is ~1e-3, and H = logsumexp(z) - sum(p z) cancels two such numbers
    assert_close(got[2], want[2], rtol=1e-3, atol=3e-3, call="entropy_from_logits(float32 [4,40], scale 1e3 and +-1e4)", hint=hint)


@pytest.mark.group("masked_ops")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_logprobs_from_logits(learner, torch_gen, dtype):
    ppo = learner.module("ppo")
    logits = (torch.randn(3, 7, 100, generator=torch_gen, dtype=torch.float64) * 25).to(dtype)
    labels = torch.randint(0, 100, (3, 7), generator=torch_gen)
    got = ppo.logprobs_from_logits(logits, labels)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # float32 log_softmax over 100 values up to ~100 in size: ~1e-5 absolute; float64 exact to rounding
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    mistakes = {}
    if dtype == torch.bfloat16:
        mistakes["compute log_softmax in float32: in bf16 the log-probs keep only 8 bits"] = \
            torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    assert_close(got, want, dtype=out_dtype, call=f"logprobs_from_logits({dtype} [3,7,100], labels [3,7])",
                 mistakes=mistakes, **tol)


# --- B. policy loss -------------------------------------------------------------------------------


def _policy_inputs(rng, shape, clip_share=0.5):
    logp_old = rng.uniform(-6, -0.1, size=shape)
    logratio = rng.normal(0, 0.3, size=shape)
    logratio[rng.random(shape) < clip_share / 2] *= 3  # many ratios far outside [1 - eps, 1 + eps]
    adv = rng.normal(size=shape)
    return logp_old + logratio, logp_old, adv


@pytest.mark.group("policy_loss")
@pytest.mark.parametrize("masked", [False, True])
def test_policy_loss_against_oracle(learner, rng, masked):
    ppo = learner.module("ppo")
    new, old, adv = _policy_inputs(rng, (6, 10))
    mask = random_mask(rng, 6, 10) if masked else None
    if masked:
        new = np.where(mask > 0, new, old + rng.uniform(-3, 3, size=new.shape))  # garbage ratios off the mask
    eps = float(rng.uniform(0.1, 0.3))
    args = [torch.tensor(new), torch.tensor(old), torch.tensor(adv), eps]
    out = ppo.ppo_policy_loss(*args, mask=None if mask is None else torch.tensor(mask))
    check(isinstance(out, (tuple, list)) and len(out) == 4, f"ppo_policy_loss returned {type(out).__name__}; expected (loss, clipfrac, k1, k3)")
    want = policy_loss_oracle(new, old, adv, eps, mask)
    call = f"ppo_policy_loss(logp_new[6,10] float64, logp_old, A, eps={eps:.3f}, mask={'random' if masked else None})"
    assert_close(out[0], want[0], rtol=1e-9, atol=1e-12, call=call + "[0] (loss)",
                 mistakes={"the loss is mean(MAX(-A r, -A clip(r))): the pessimistic bound": policy_loss_oracle(new, old, adv, eps, mask, swap=True)[0],
                           "clip the ratio, not the advantage": policy_loss_oracle(new, old, adv, eps, mask, clip_adv=True)[0]})
    assert_close(out[1], want[1], rtol=1e-9, atol=1e-12, call=call + "[1] (clipfrac)", hint="clipfrac = mean(|ratio - 1| > eps)")
    assert_close(out[2], want[2], rtol=1e-9, atol=1e-12, call=call + "[2] (k1)", mistakes={"k1 = mean(-logratio) = mean(logp_old - logp_new)": -want[2]})
    assert_close(out[3], want[3], rtol=1e-9, atol=1e-12, call=call + "[3] (k3)", hint="k3 = mean((ratio - 1) - logratio)")


@pytest.mark.group("policy_loss")
def test_gradient_is_zero_exactly_where_clipped(learner, rng):
    ppo = learner.module("ppo")
    new, old, adv = _policy_inputs(rng, (40,), clip_share=0.8)
    eps = 0.2
    n_t, o_t, a_t = torch.tensor(new), torch.tensor(old), torch.tensor(adv)
    _, grads = learner.harness("value_and_grad", ppo.ppo_policy_loss, [n_t, o_t, a_t, eps], [0], pick=0)
    check(grads[0] is not None, "no gradient reaches logp_new from the loss (is the ratio detached?)")
    ratio = (n_t - o_t).exp()
    frozen = ((a_t > 0) & (ratio > 1 + eps)) | ((a_t < 0) & (ratio < 1 - eps))
    check(bool(frozen.any()) and bool((~frozen).any()), "test inputs lack clipped or unclipped samples")
    ref = n_t.clone().requires_grad_()
    policy_loss_oracle(ref, o_t, a_t, eps)[0].backward()
    g = grads[0]
    check(bool((g[frozen] == 0).all()), f"{int((g[frozen] != 0).sum())} of {int(frozen.sum())} samples whose ratio is clipped in the "
                                        "direction of their advantage got a nonzero gradient; it must be exactly 0 (the clipped term is constant)")
    # the others: d/dlogp (-A r / N) = -A r / N
    wrong = n_t.clone().requires_grad_()
    policy_loss_oracle(wrong, o_t, a_t, eps, swap=True)[0].backward()
    assert_close(g, ref.grad, rtol=1e-9, atol=1e-15, call="d loss / d logp_new for 40 samples (float64)",
                 mistakes={"the loss is mean(MAX(-A r, -A clip(r))): with min, the clipped samples keep their gradient": wrong.grad})


@pytest.mark.group("policy_loss")
@pytest.mark.parametrize("masked", [False, True])
def test_ratio_one_is_the_policy_gradient(learner, rng, masked):
    ppo = learner.module("ppo")
    shape = (5, 6)
    logp = torch.tensor(rng.uniform(-5, -0.1, size=shape))
    adv = torch.tensor(rng.normal(size=shape))
    mask = torch.tensor(random_mask(rng, *shape)) if masked else torch.ones(shape, dtype=torch.float64)
    out, grads = learner.harness("value_and_grad", ppo.ppo_policy_loss, [logp, logp.clone(), adv, 0.2],
                                 [0], {"mask": mask} if masked else {}, 0)
    want_loss = -(adv * mask).sum() / mask.sum()
    assert_close(out[0], want_loss, rtol=1e-10, atol=1e-12, call="ppo_policy_loss at ratio 1 (logp_new == logp_old)",
                 hint="at ratio 1 the loss is -mean(A)")
    check(grads[0] is not None, "no gradient reaches logp_new from the loss")
    assert_close(grads[0], -adv * mask / mask.sum(), rtol=1e-10, atol=1e-12,
                 call="d loss / d logp_new at ratio 1", hint="at ratio 1 the gradient is the plain policy gradient -A / N (only masked positions)")
    assert_close(out[1], torch.tensor(0.0, dtype=torch.float64), call="clipfrac at ratio 1")
    assert_close(out[3], torch.tensor(0.0, dtype=torch.float64), atol=1e-12, call="k3 at ratio 1")


@pytest.mark.group("policy_loss")
def test_ratio_from_tiny_probabilities(learner, rng):
    """Sequence log-probs of -100 and below: exp(logp) underflows in float32, exp(difference) does not."""
    ppo = learner.module("ppo")
    old = rng.uniform(-300, -110, size=16).astype(np.float32)
    new = (old + rng.normal(0, 0.1, size=16)).astype(np.float32)
    adv = rng.normal(size=16).astype(np.float32)
    out = ppo.ppo_policy_loss(torch.tensor(new), torch.tensor(old), torch.tensor(adv), 0.2)
    want = policy_loss_oracle(torch.tensor(new).double(), torch.tensor(old).double(), adv, 0.2)
    # float32 inputs: the log-prob difference of values ~200 carries ~1e-5 error, so the ratio too
    assert_close(out[0], want[0], rtol=1e-4, atol=1e-5, call="ppo_policy_loss(float32 log-probs in [-300, -110])",
                 hint="ratio = exp(logp_new - logp_old); exp(logp_new) / exp(logp_old) is 0 / 0 in float32")
    assert_close(out[3], want[3], rtol=1e-3, atol=1e-5, call="k3 for float32 log-probs in [-300, -110]")


# --- B. value loss ----------------------------------------------------------------------------------


@pytest.mark.group("value_loss")
@pytest.mark.parametrize("clip,masked", [(None, False), (0.2, False), (0.2, True), (None, True)])
def test_value_loss_against_oracle(learner, rng, clip, masked):
    ppo = learner.module("ppo")
    shape = (4, 9)
    vo = rng.normal(size=shape)
    vn = vo + rng.normal(0, 0.4, size=shape)
    R = vo + rng.normal(0, 1.0, size=shape)
    mask = random_mask(rng, *shape) if masked else None
    if masked:
        vn = np.where(mask > 0, vn, 1e3)  # garbage off the mask
    args = [torch.tensor(vn), torch.tensor(vo), torch.tensor(R), clip]
    kwargs = {"mask": torch.tensor(mask)} if masked else {}
    out, grads = learner.harness("value_and_grad", ppo.ppo_value_loss, args, [0], kwargs)
    want = value_loss_oracle(vn, vo, R, clip, mask)
    mistakes = {"without the factor 0.5": 2 * want}
    if clip is not None:
        mistakes["clip around the OLD value: V_clip = V_old + clip(V_new - V_old, -eps, eps)"] = value_loss_oracle(vn, vo, R, clip, mask, around_new=True)
        mistakes["take the max of the two squared errors (the pessimistic one), not the min"] = value_loss_oracle(vn, vo, R, clip, mask, use_min=True)
    call = f"ppo_value_loss(V_new[4,9] float64, V_old, R, clip_eps={clip}, mask={'random' if masked else None})"
    assert_close(out, want, rtol=1e-9, atol=1e-12, call=call, mistakes=mistakes)
    ref = torch.tensor(vn).requires_grad_()
    value_loss_oracle(ref, vo, R, clip, mask).backward()
    check(grads[0] is not None, "no gradient reaches values_new from the value loss")
    assert_close(grads[0], ref.grad, rtol=1e-9, atol=1e-12, call=call + ": d loss / d V_new",
                 hint="where the clipped error wins, V_new's gradient is 0 (and 0 off the mask)")


# --- C. RLHF reward shaping ------------------------------------------------------------------------


def rlhf_oracle(scores, lp, lr, m, beta, sign=1.0, at="last"):
    kl = np.where(m > 0, sign * (lp - lr), 0.0)
    rewards = -beta * kl
    for b in range(m.shape[0]):
        idx = np.flatnonzero(m[b] > 0)
        t = {"last": idx[-1], "first": idx[0], "end": m.shape[1] - 1}[at]
        rewards[b, t] += scores[b]
    return rewards, kl


@pytest.mark.group("rlhf_rewards")
def test_rlhf_rewards_against_oracle(learner, rng):
    ppo = learner.module("ppo")
    B, T = 6, 12
    m = random_mask(rng, B, T, min_len=2)
    m[0, -1] = 0.0 if m[0].sum() > 2 else m[0, -1]  # some rows are right-padded
    lp = np.where(m > 0, rng.uniform(-5, -0.1, size=(B, T)), rng.uniform(-50, 0, size=(B, T)))
    lr = np.where(m > 0, lp + rng.normal(0, 0.5, size=(B, T)), rng.uniform(-50, 0, size=(B, T)))
    scores = rng.normal(size=B)
    beta = float(rng.uniform(0.02, 0.2))
    rewards, kl = ppo.rlhf_rewards(torch.tensor(scores), torch.tensor(lp), torch.tensor(lr), torch.tensor(m), beta)
    want_r, want_kl = rlhf_oracle(scores, lp, lr, m, beta)
    call = f"rlhf_rewards(scores[{B}], logp_policy[{B},{T}], logp_ref, mask (left and right padding), beta={beta:.3f})"
    assert_close(kl, want_kl, rtol=1e-10, atol=1e-12, call=call + "[1] (kl)",
                 mistakes={"kl = logp_policy - logp_ref (KL(policy || ref)), not the other way round": rlhf_oracle(scores, lp, lr, m, beta, -1.0)[1]},
                 hint="0 outside the mask")
    assert_close(rewards, want_r, rtol=1e-10, atol=1e-12, call=call + "[0] (rewards)",
                 mistakes={"the penalty is -beta * (logp_policy - logp_ref)": rlhf_oracle(scores, lp, lr, m, beta, -1.0)[0],
                           "the score goes on each row's LAST response token, not the sequence's last position": rlhf_oracle(scores, lp, lr, m, beta, at="end")[0],
                           "the score goes on each row's LAST response token, not the first": rlhf_oracle(scores, lp, lr, m, beta, at="first")[0]})
