"""Hidden tests, Unit 7 Part B: cross-entropy against F.cross_entropy (ignored targets, bf16 logits,
huge logits), which parameters are decayed (the GPT and a model of other layers), AdamW against
torch.optim.AdamW step by step (two groups, changing learning rates, a parameter without a
gradient), the schedule against transformers' cosine schedule with warm-up (edge cases), clipping
against clip_grad_norm_ (a generator of parameters, a norm exactly at the limit, max_norm 0),
accumulated gradients against one large batch, the training step against a replay with torch's
pieces (clipping active: clipping after the step shows), token data through datasets, a memory map
that reads only what it must (memory measured outside the worker), windows replayed from the
generator, and checkpoints resumed in a fresh worker, bit for bit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check
from autograder.hidden.unit7._common import EXACT, oracles, source


def _randn(gen, *shape, scale=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


TC = dict(batch_size=4, block_size=8, accum_steps=2, total_steps=40, warmup_steps=5, max_lr=1e-2, min_lr=1e-3,
          weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0, seed=0)


def _tc(learner, **changes):
    return learner.module("train").TrainConfig(**dict(TC, **changes))


# --- the loss ---------------------------------------------------------------------------------------------


@pytest.mark.group("loss_optim")
@pytest.mark.parametrize("shape, vocab, ignored", [((3, 7), 11, 0.0), ((2, 5), 50, 0.3), ((13,), 4, 0.0), ((1, 1), 2, 0.0)])
def test_cross_entropy_matches_torch(learner, seed, shape, vocab, ignored):
    gen = torch.Generator().manual_seed(seed)
    logits = _randn(gen, *shape, vocab, scale=3.0)
    targets = torch.randint(0, vocab, shape, generator=gen)
    if ignored:
        drop = torch.rand(shape, generator=gen) < ignored
        drop.view(-1)[0] = False  # at least one target counts
        targets = torch.where(drop, torch.full_like(targets, -100), targets)
    got = learner.module("train").cross_entropy(logits, targets)
    want = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    keep = targets.reshape(-1) != -100
    flat = torch.logsumexp(logits.reshape(-1, vocab), 1) - logits.reshape(-1, vocab).gather(
        1, targets.reshape(-1).clamp(min=0)[:, None]).squeeze(1)
    mistakes = {"the loss is logsumexp(logits) - logits[target], not its negative": -want,
                "the mean over every position, not the sum": flat[keep].sum()}
    if ignored:
        mistakes["average over the positions whose target is not ignore_index (-100), and only those"] = (flat * keep).mean()
    assert_close(got, want, **EXACT, mistakes=mistakes,
                 call=f"cross_entropy(logits{list(logits.shape)} float64, targets{list(shape)}"
                      f"{' with -100 at ignored positions' if ignored else ''})",
                 hint="mean over the counted positions of logsumexp(logits_i) - logits_i[target_i]")
    check(isinstance(got, torch.Tensor) and got.dim() == 0, f"cross_entropy returned {type(got).__name__} of shape "
          f"{tuple(getattr(got, 'shape', ()))}; expected a 0-dim tensor")


@pytest.mark.group("loss_optim")
def test_cross_entropy_honours_an_ignore_index_inside_the_vocabulary(learner, seed):
    """ignore_index is a parameter, not -100 written in: padding may be a real token id (here 5 of 11),
    so targets both below and above it count, and only those equal to it are left out."""
    gen = torch.Generator().manual_seed(seed)
    logits = _randn(gen, 4, 6, 11, scale=3.0)
    targets = torch.randint(0, 11, (4, 6), generator=gen)
    targets[0, :3] = torch.tensor([5, 2, 9])  # one ignored, one below it and one above it, whatever the draw
    got = learner.module("train").cross_entropy(logits, targets, ignore_index=5)
    want = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=5)
    flat = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none")
    assert_close(got, want, **EXACT, call="cross_entropy(logits[4,6,11] float64, targets, ignore_index=5)",
                 mistakes={"ignore_index=5 was not used: -100 is only its default": flat.mean(),
                           "leave out the targets EQUAL to ignore_index (t != ignore_index), not those on one side of it":
                           flat[targets.reshape(-1) > 5].mean()},
                 hint="keep = targets != ignore_index, with the ignore_index you were given")


@pytest.mark.group("loss_optim")
def test_cross_entropy_of_huge_and_bf16_logits(learner, torch_gen):
    ce = learner.module("train").cross_entropy
    big = torch.tensor([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]], dtype=torch.float64)
    target = torch.tensor([1, 0])
    assert_close(ce(big, target), F.cross_entropy(big, target), rtol=1e-12, atol=1e-9,
                 call="cross_entropy([[1e4, 0, -1e4], [5e3, 5e3, 0]], targets [1, 0])",
                 nan_hint="log(sum(exp(z))) overflows at z = 1e4: use torch.logsumexp (it subtracts the max)")
    logits = (torch.randn(4, 16, 1000, generator=torch_gen) * 20).to(torch.bfloat16)
    targets = torch.randint(0, 1000, (4, 16), generator=torch_gen)
    got = ce(logits, targets)
    want = F.cross_entropy(logits.double().reshape(-1, 1000), targets.reshape(-1))
    check(isinstance(got, torch.Tensor) and got.dtype in (torch.float32, torch.float64),
          f"cross_entropy(bf16 logits) returned {getattr(got, 'dtype', type(got))}; expected float32\n"
          "Hint: upcast bf16 logits to float32 before logsumexp: bf16 keeps 8 bits of mantissa")
    # float32 over 1000 exactly representable bf16 values: ~1e-6; logsumexp in bf16 is off by ~0.1
    assert_close(got, want, rtol=1e-4, atol=1e-4, call="cross_entropy(logits[4,16,1000] bf16 of size ~20, targets)",
                 hint="upcast bf16 logits to float32 before logsumexp: bf16 keeps 8 bits of mantissa")


# --- which parameters decay ----------------------------------------------------------------------------------


@pytest.mark.group("loss_optim")
def test_split_decay_on_the_gpt(learner):
    o = oracles()
    cfg = o.gpt_config()
    gpt = o.learner_gpt(learner, cfg, None, torch.float32)
    got = learner.module("train").split_decay(gpt)
    hf = o.to_llama(o.fresh_weights(cfg, 0), cfg, torch.float32, exact=False)
    decay, no_decay = o.decay_names(hf)
    check(isinstance(got, (tuple, list)) and len(got) == 2, f"split_decay(GPT) returned {got!r:.200}; expected two lists")
    got_decay, got_no = list(got[0]), list(got[1])
    wrong_in = sorted(set(got_decay) - set(decay))
    hint = ""
    if "model.embed_tokens.weight" in wrong_in:
        hint = "\nHint: embeddings are not decayed (nor is the head tied to them)"
    elif any("norm" in n for n in wrong_in):
        hint = "\nHint: norm weights (1-d) are not decayed"
    check(got_decay == decay and got_no == no_decay,
          f"split_decay(GPT): decayed {got_decay}; expected {decay} (every Linear weight, in named_parameters order); "
          f"not decayed {got_no}; expected {no_decay}{hint}")
    check("lm_head.weight" not in got_decay + got_no,
          "split_decay lists lm_head.weight: the tied head is the embedding's tensor, listed once (named_parameters)")


@pytest.mark.group("loss_optim")
def test_split_decay_on_other_layers(learner):
    """The rule is about what a parameter is, not what it is called: a model of an Embedding, a
    Linear with a bias, a LayerNorm named "ln", a Conv1d and a Linear called "head"."""
    nn_l = learner.lib("torch").nn
    modules = [("embed", nn_l.Embedding(10, 6)), ("proj", nn_l.Linear(6, 6)), ("ln", nn_l.LayerNorm(6)),
               ("conv", nn_l.Conv1d(6, 6, 3)), ("head", nn_l.Linear(6, 4, bias=False))]
    got = learner.module("train").split_decay(nn_l.ModuleDict(dict(modules)))
    decay = ["proj.weight", "conv.weight", "head.weight"]
    no_decay = ["embed.weight", "proj.bias", "ln.weight", "ln.bias", "conv.bias"]
    check(isinstance(got, (tuple, list)) and len(got) == 2 and list(got[0]) == decay and list(got[1]) == no_decay,
          f"split_decay(ModuleDict(embed=Embedding, proj=Linear, ln=LayerNorm, conv=Conv1d, head=Linear)) returned "
          f"{got!r:.300}; expected ({decay}, {no_decay}): decay every weight with 2+ dims except embeddings; "
          "biases and norm weights (1-d) are not decayed, whatever their names")


# --- AdamW ------------------------------------------------------------------------------------------------------


@pytest.mark.group("loss_optim")
# (0.3, 0.45) as well as the usual betas: with b > 0.5, 1 % b equals 1 - b, so a formula written
# with the wrong operator would pass on (0.9, 0.95) alone
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.3, 0.45)], ids=["usual", "low"])
def test_adamw_matches_torch_step_by_step(learner, seed, betas):
    """Three tensors in two groups (weight decay 0.1 and 0), five steps with new gradients each time
    (of sizes 0.1 to 10) and the learning rate changed between steps (one step at lr 0); the third
    tensor has no gradient at step 3, and the first one none at step 4."""
    o = oracles()
    gen = torch.Generator().manual_seed(seed)
    tensors = [_randn(gen, 4, 3), _randn(gen, 5), _randn(gen, 2, 2, 2)]
    first, second = o.learner_parameters(learner, tensors[:2]), o.learner_parameters(learner, tensors[2:])
    opt = learner.module("train").AdamW([{"params": first.parameters(), "weight_decay": 0.1},
                                         {"params": second.parameters(), "weight_decay": 0.0}],
                                        lr=1e-2, betas=betas, eps=1e-8)
    ref_params = [torch.nn.Parameter(t.clone()) for t in tensors]
    ref = torch.optim.AdamW([{"params": ref_params[:2], "weight_decay": 0.1}, {"params": ref_params[2:], "weight_decay": 0.0}],
                            lr=1e-2, betas=betas, eps=1e-8, foreach=False)
    lrs = [1e-2, 3e-2, 0.0, 5e-3, 2e-2]
    for step, lr in enumerate(lrs):
        grads = [_randn(gen, *t.shape, scale=10.0 ** (step % 3 - 1)) for t in tensors]
        if step == 2:
            grads[2] = None
        if step == 3:  # the first of its group: the tensor after it still has a gradient, and must step
            grads[0] = None
        o.set_grads(learner, first, grads[:2])
        o.set_grads(learner, second, grads[2:])
        o.set_group_lr(learner, opt, [lr, lr])
        opt.step()
        for p, g in zip(ref_params, grads):
            p.grad = None if g is None else g.clone()
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        got = [first.state_dict()["0"], first.state_dict()["1"], second.state_dict()["0"]]
        for i, p in enumerate(ref_params):
            no_grad = step == 2 and i == 2
            assert_close(got[i], p.detach(), **EXACT,
                         call=f"AdamW(2 groups, weight_decay 0.1 / 0.0, betas {betas}): parameter {i} {list(p.shape)} "
                              f"after step {step + 1} (lr {lr:g}{'; it had no gradient this step' if no_grad else ''})",
                         hint="p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr * (m / (1 - b1^t)) "
                              "/ (sqrt(v / (1 - b2^t)) + eps), with t counted per parameter and each group's own lr and "
                              "weight_decay read at every step; a parameter without a gradient is left alone")
    state = opt.state_dict()
    check(isinstance(state, dict) and len(state.get("state", {})) == 3,
          "AdamW.state_dict()['state'] should hold the moments of the 3 parameters: keep them in self.state[p], so "
          "that checkpoints carry them")


# --- the schedule ------------------------------------------------------------------------------------------------


SCHEDULES = [dict(warmup_steps=5, total_steps=40), dict(warmup_steps=0, total_steps=12), dict(warmup_steps=1, total_steps=3),
             dict(warmup_steps=7, total_steps=7), dict(warmup_steps=10, total_steps=100, min_lr=0.0)]


@pytest.mark.group("schedule_clip")
@pytest.mark.parametrize("case", range(len(SCHEDULES)))
def test_lr_at_matches_transformers(learner, case):
    tc = dict(TC, **SCHEDULES[case])
    cfg = _tc(learner, **SCHEDULES[case])
    steps = tc["total_steps"] + 3
    lr_at = learner.module("train").lr_at
    got = [lr_at(s, cfg) for s in range(steps)]
    want = oracles().schedule(tc, steps)
    w, total = tc["warmup_steps"], tc["total_steps"]
    what = f"lr_at(step, warmup_steps={w}, total_steps={total}, max_lr={tc['max_lr']:g}, min_lr={tc['min_lr']:g})"
    for s, (g, e) in enumerate(zip(got, want)):
        check(isinstance(g, (int, float)), f"{what} at step {s} returned {type(g).__name__}; expected a float")
        if abs(g - e) > 1e-12 + 1e-9 * abs(e):
            if s < w and abs(g - tc["max_lr"] * (s + 1) / w) < 1e-12:
                hint = "\nHint: warm-up starts at 0: max_lr * step / warmup_steps (step 0 is the first step)"
            elif s >= total:
                hint = "\nHint: past total_steps the rate stays at min_lr"
            elif s >= w and abs(g - tc["max_lr"] * 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, total - w)))) < 1e-12:
                hint = "\nHint: the cosine runs from max_lr down to min_lr: min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * progress))"
            else:
                hint = ""
            check(False, f"{what} at step {s} = {g!r}; expected {e!r} (transformers' cosine schedule with warm-up; "
                         f"the first steps: got {[round(x, 6) for x in got[:6]]}, expected {[round(x, 6) for x in want[:6]]}){hint}")


# --- clipping ----------------------------------------------------------------------------------------------------------


@pytest.mark.group("schedule_clip")
@pytest.mark.parametrize("scale, max_norm", [(1.0, 0.5), (0.01, 1.0), (1.0, 0.0), (3.0, None), (1.0, "1.5x")])
def test_clip_grad_norm_matches_torch(learner, seed, scale, max_norm):
    """Three parameters (one without a gradient), passed as a generator; ``max_norm=None`` here means
    a limit exactly equal to the norm (torch still scales by max_norm / (total + 1e-6)), and "1.5x" a
    limit 1.5 times the norm: under the limit, so nothing is scaled (not even up, by 1.5)."""
    o = oracles()
    gen = torch.Generator().manual_seed(seed)
    tensors = [_randn(gen, 3, 4), _randn(gen, 7), _randn(gen, 2)]
    grads = [_randn(gen, 3, 4, scale=scale), None, _randn(gen, 2, scale=scale)]
    params = o.learner_parameters(learner, tensors)
    o.set_grads(learner, params, grads)
    ref = [torch.nn.Parameter(t.clone()) for t in tensors]
    for p, g in zip(ref, grads):
        p.grad = None if g is None else g.clone()
    total = float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    limit = total if max_norm is None else total * float(max_norm[:-1]) if isinstance(max_norm, str) else max_norm
    got_norm = learner.module("train").clip_grad_norm(params.parameters(), limit)
    want_norm = float(torch.nn.utils.clip_grad_norm_(ref, limit))
    what = f"clip_grad_norm(<generator of 3 parameters>, max_norm={limit:g}) with a total gradient norm {total:.4g}"
    assert_close(got_norm, want_norm, **EXACT, call=what + ": the returned norm",
                 hint="return the total L2 norm of all the gradients together, before clipping")
    got = o.learner_grads(learner, params, ["0", "1", "2"])
    check(got["1"] is None, f"{what}: the parameter without a gradient got one")
    for i in (0, 2):
        assert_close(got[str(i)], ref[i].grad, **EXACT, call=what + f": gradient {i} afterwards",
                     mistakes={"go through the parameters once: model.parameters() is a generator, empty the second time":
                               grads[i],
                               "scale by max_norm / (total + 1e-6): one factor for all the gradients (the global norm)":
                               grads[i] * min(1.0, limit / (float(grads[i].norm()) + 1e-6))},
                     hint="multiply every gradient in place by min(1, max_norm / (total + 1e-6))")
    if max_norm is None:  # and parameters none of which has a gradient: the norm of nothing is 0 (torch's too)
        bare = o.learner_parameters(learner, tensors[:1])
        nothing = learner.module("train").clip_grad_norm(bare.parameters(), 1.0)
        check(nothing == 0.0, f"clip_grad_norm(<a parameter without a gradient>, 1.0) returned {nothing!r}; expected 0.0 "
                              "(torch.nn.utils.clip_grad_norm_ gives 0 too)")


# --- accumulation and the training step -------------------------------------------------------------------------------


def _batches(gen, cfg, n, b, t):
    return [(torch.randint(0, cfg["vocab_size"], (b, t), generator=gen), torch.randint(0, cfg["vocab_size"], (b, t), generator=gen))
            for _ in range(n)]


@pytest.mark.group("step_data")
def test_accumulated_gradients_equal_one_large_batch(learner, seed):
    """4 micro-batches of 2 sequences: the gradients equal those of one batch of 8 (float64); a second
    call starts again from zero."""
    o = oracles()
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, seed, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    micro = _batches(gen, cfg, 4, 2, 9)
    gpt = o.learner_gpt(learner, cfg, state)
    accumulate = learner.module("train").accumulate_gradients
    loss = accumulate(gpt, micro)
    loss_again = accumulate(gpt, micro)
    hf = o.to_llama(state, cfg)
    x, y = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
    out = hf(input_ids=x, use_cache=False).logits
    big = F.cross_entropy(out.reshape(-1, cfg["vocab_size"]), y.reshape(-1))
    big.backward()
    names = [n for n, _ in hf.named_parameters()]
    got = o.learner_grads(learner, gpt, names)
    assert_close(loss, float(big.detach()), **EXACT, call="accumulate_gradients(GPT, 4 micro-batches of [2, 9]): the returned loss",
                 mistakes={"return the mean of the micro-batches' losses, not their sum": 4 * float(big.detach())})
    for name, p in hf.named_parameters():
        check(got[name] is not None, f"after accumulate_gradients, {name} has no gradient")
        assert_close(got[name], p.grad, **EXACT, call=f"accumulate_gradients(GPT, 4 micro-batches of [2, 9]) called twice: "
                     f"the gradient of {name}, against one batch of 8",
                     mistakes={"divide each micro-batch's loss by the number of micro-batches before backward()": 4 * p.grad,
                               "start from zero: model.zero_grad(set_to_none=True) first (.grad accumulates across calls)":
                               2 * p.grad, "start from zero, and divide each micro-batch's loss by their number": 8 * p.grad},
                     hint="for each micro-batch: (cross_entropy(model(x), y) / n).backward(), after zeroing the gradients")
    assert_close(loss_again, float(big.detach()), **EXACT, call="accumulate_gradients, second call: the returned loss")


@pytest.mark.group("step_data")
def test_train_step_matches_a_replay_with_torch(learner, seed):
    """Three steps with 2 micro-batches each, clipping active (max_grad_norm 1e-3, far below the
    norm), the lr changing, float64: the weights after each step and the returned (loss, norm) equal a
    replay with torch.optim.AdamW, F.cross_entropy and clip_grad_norm_ here.  (Adam hardly cares
    about one uniform scale of the gradients, so a step clipped too late differs through eps and
    through the moments of later steps: about 1e-6 here, far above the agreement of a correct step.)"""
    o = oracles()
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, seed, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    tc = dict(TC, max_grad_norm=1e-3)
    gpt = o.learner_gpt(learner, cfg, state)
    train = learner.module("train")
    opt = train.make_optimizer(gpt, train.TrainConfig(**tc))
    hf = o.to_llama(state, cfg)
    ref = o.reference_optimizer(hf, tc)
    late_hf = o.to_llama(state, cfg)
    late = o.reference_optimizer(late_hf, tc)
    for step, lr in enumerate([1e-2, 3e-3, 2e-2]):
        micro = _batches(gen, cfg, 2, 3, 7)
        got = train.train_step(gpt, opt, micro, lr, 1e-3)
        want = o.reference_step(hf, ref, micro, lr, 1e-3)
        o.reference_step(late_hf, late, micro, lr, 1e-3, clip_after_step=True)
        what = f"train_step(GPT, your AdamW, 2 micro-batches [3, 7], lr {lr:g}, max_grad_norm 1e-3), step {step + 1}"
        check(isinstance(got, (tuple, list)) and len(got) == 2, f"{what} returned {got!r:.100}; expected (loss, norm)")
        assert_close(got[0], want[0], **EXACT, call=what + ": the returned loss")
        assert_close(got[1], want[1], **EXACT, call=what + ": the returned gradient norm (before clipping)")
        weights = gpt.state_dict()
        late_state = late_hf.state_dict()
        for name, p in hf.state_dict().items():
            assert_close(weights[name], p, rtol=1e-10, atol=1e-13, call=f"{what}: {name} afterwards",
                         mistakes={"clip the gradients after backward and before optimizer.step() (clipping after the step "
                                   "changes nothing that step used)": late_state[name]},
                         hint="accumulate_gradients; clip_grad_norm(model.parameters(), max_grad_norm); set every group's "
                              "lr; optimizer.step()")


# What correct code may differ from the oracle by, per autocast dtype.  bf16: a float32 norm output one ulp
# away can round to the other bf16 neighbour and move a logit by 2**-8 of its size: 1.1e-5 was seen on one
# draw in 8 (1e-5 failed it); 1e-3 allows several such flips.  float16 keeps 3 more bits: 8x less.
AUTOCAST_TOLERANCE = {torch.bfloat16: 1e-3, torch.float16: 1.25e-4}


@pytest.mark.group("step_data")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_train_step_under_autocast(learner, seed, dtype):
    """autocast_dtype=torch.bfloat16 or torch.float16 on the CPU.  The blocks' output projections are
    zero, so the logits are lm_head(norm(embedding)), computed by the same half-precision matmul in any
    correct model: the loss equals Hugging Face's Llama under torch.autocast("cpu", dtype) to ~1e-6,
    while the float32 loss (and, for float16, the bfloat16 one) is at least 5 tolerances away (the
    final norm's weight is large); the gradients stay float32, like the weights."""
    o = oracles()
    cfg = o.gpt_config(d_model=64, d_mlp=128, n_layer=1)
    tolerance = AUTOCAST_TOLERANCE[dtype]
    # The inputs are chosen here so that the dtype visibly moves the loss: the next draw is taken until
    # the other losses are 5 tolerances away (bf16 moves it by 1e-2 to 5e-2, one draw in five by less).
    for draw in range(seed, seed + 20):
        state = o.fresh_weights(cfg, draw, torch.float32)
        for name in state:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                state[name] = torch.zeros_like(state[name])
        state["model.norm.weight"] = state["model.norm.weight"] * 50
        micro = _batches(torch.Generator().manual_seed(draw), cfg, 2, 8, 32)
        hf = o.to_llama(state, cfg, torch.float32, exact=False)
        losses = {d: o.reference_step(hf, o.reference_optimizer(hf, TC), micro, 0.0, None, autocast_dtype=d)[0]
                  for d in (None, torch.bfloat16, torch.float16)}  # None: no autocast, float32
        want = losses[dtype]
        others = {str(d or torch.float32).removeprefix("torch."): v for d, v in losses.items() if d != dtype}
        gap = min(abs(want - v) for v in others.values())
        if gap > 5 * tolerance:
            break
    check(gap > 5 * tolerance, f"test set-up: {dtype} changes the loss by only {gap:.2g} here (a course bug)")
    gpt = o.learner_gpt(learner, cfg, state, torch.float32)
    got = learner.module("train").accumulate_gradients(gpt, micro, dtype)
    what = f"accumulate_gradients(GPT float32, 2 micro-batches [8, 32], autocast_dtype={dtype})"
    close = [name for name, v in others.items() if isinstance(got, float) and abs(got - v) <= tolerance]
    hint = (f"\nHint: that is the {close[0]} loss: run the forward pass and the loss inside torch.autocast(device_type="
            "x.device.type, dtype=autocast_dtype)" if close else "")
    check(isinstance(got, float) and abs(got - want) <= tolerance,
          f"{what} gave the loss {got!r}; Llama under torch.autocast(cpu, {dtype}) gives {want:.7f} (and "
          + ", ".join(f"{v:.7f} in {name}" for name, v in others.items()) + f").{hint}")
    grad = o.learner_grads(learner, gpt, ["model.layers.0.self_attn.q_proj.weight"])["model.layers.0.self_attn.q_proj.weight"]
    check(isinstance(grad, torch.Tensor) and grad.dtype == torch.float32,
          f"{what}: the gradient of a float32 weight is {getattr(grad, 'dtype', grad)}; expected float32 (autocast only "
          "around the forward pass and the loss)")


# --- data ---------------------------------------------------------------------------------------------------------------


@pytest.mark.group("step_data")
def test_encode_dataset_through_datasets(learner, seed):
    """A text file of the course's grammar with an empty line, doubled spaces and no final line
    break: the ids of its words, line after line."""
    src = source()
    text = src.generate(3000, seed % 100_000)
    lines = text.splitlines()
    lines.insert(len(lines) // 2, "")
    lines[1] = "  " + lines[1].replace(" ", "  ") + " "
    text = "\n".join(lines)  # no final newline
    vocab = src.vocab()
    want = np.asarray([vocab[w] for line in text.splitlines() for w in line.split()], dtype=np.uint16)
    path = learner.put_file(text)
    with learner.time_limit(90):
        got = learner.module("train").encode_dataset(path, vocab)
    check(isinstance(got, np.ndarray) and got.dtype == np.uint16 and got.ndim == 1,
          f"encode_dataset(path, vocab) returned {type(got).__name__} {getattr(got, 'dtype', '')} "
          f"{getattr(got, 'shape', '')}; expected a 1-d uint16 numpy array")
    same = got.shape == want.shape and np.array_equal(got, want)
    first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
    check(same, f"encode_dataset on {len(lines)} lines ({len(want)} words; one empty line, doubled spaces, no final "
                f"line break) gave {len(got)} ids; the first difference is at id {first} (expected "
                f"{want[first:first + 5].tolist()}, got {got[first:first + 5].tolist()}): split each line with "
                "line.split() and keep the lines in order")


@pytest.mark.fresh_worker
@pytest.mark.group("step_data")
def test_memmap_reads_only_the_windows(learner, seed):
    """A 64 MiB token file: load_tokens must map it, not read it (the anonymous memory it keeps is
    measured from outside the worker), and get_batch must read only its windows (the worker's peak
    memory during the call, measured from outside)."""
    n = 32 * 2**20
    ids = (np.arange(n, dtype=np.int64) * 7919 + seed) % 50_000
    path = learner.put_file(ids.astype("<u2").tobytes(), suffix=".bin")
    learner.restart()
    train = learner.module("train")
    stored, load_cost = learner.measure_harness("call_stored", train.load_tokens, [path])
    gen = learner.lib("torch").Generator().manual_seed(seed % 2**31)
    batch, cost = learner.measure_harness("call_stored", train.get_batch, [stored, 8, 128, gen])
    got = learner.harness("fetch", batch)
    check(load_cost.kept_bytes < 16 * 2**20,
          f"load_tokens(a 64 MiB file) keeps {load_cost.kept_bytes / 2**20:.0f} MiB of memory afterwards (measured from "
          "outside your process); a memory map keeps almost none: np.memmap(path, dtype=np.uint16, mode='r')")
    check(cost.peak_bytes < 48 * 2**20,
          f"get_batch(a memory map of 32M tokens, 8, 128) used {cost.peak_bytes / 2**20:.0f} MiB at its peak (measured "
          "outside your process); read only the windows: data[s : s + block_size + 1] for each start, never the whole array")
    x, y = oracles().reference_batch(ids.astype(np.uint16), 8, 128, torch.Generator().manual_seed(seed % 2**31))
    check(isinstance(got, (tuple, list)) and len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, (x, y))),
          "get_batch on the memory map: the windows differ from those the generator's randint draws")


@pytest.mark.group("step_data")
@pytest.mark.parametrize("length, batch, block", [(3000, 8, 16), (12, 64, 9), (10, 3, 9)])
def test_get_batch_replays_from_the_generator(learner, seed, length, batch, block):
    """Consecutive batches from one generator equal the ones torch.randint(0, len - block_size) draws
    here; a short array (every start drawn) reaches its last window; a window of exactly len - 1."""
    data = np.random.default_rng(seed).integers(0, 60_000, length).astype(np.uint16)
    train = learner.module("train")
    loaded = learner.harness("call_stored", train.load_tokens, [learner.put_file(data.astype("<u2").tobytes(), ".bin")])
    gen_l = learner.lib("torch").Generator().manual_seed(seed % 2**31)
    gen = torch.Generator().manual_seed(seed % 2**31)
    for k in range(3):
        got = learner.harness("fetch", learner.harness("call_stored", train.get_batch, [loaded, batch, block, gen_l]))
        x, y = oracles().reference_batch(data, batch, block, gen)
        what = f"get_batch(data of {length} tokens, batch_size {batch}, block_size {block}), call {k + 1}"
        check(isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got),
              f"{what} returned {type(got).__name__}; expected (x, y)")
        check(got[0].dtype == torch.int64 and tuple(got[0].shape) == (batch, block) and tuple(got[1].shape) == (batch, block),
              f"{what}: x is {got[0].dtype} {tuple(got[0].shape)}; expected int64 ({batch}, {block}) (and y the same)")
        starts = []
        for row in got[0]:
            hits = [s for s in range(length - block + 1) if np.array_equal(data[s : s + block].astype(np.int64), row.numpy())]
            starts.append(hits[0] if hits else None)
        hint = ""
        if None not in starts and all(s is not None for s in starts) and max(starts) <= length - block - 1 and \
                not torch.equal(got[0], x):
            hint = " (the windows are real windows of data, but not the ones torch.randint(0, len(data) - block_size, " \
                   "(batch_size,), generator=generator) draws: one call, those bounds)"
        check(torch.equal(got[0], x), f"{what}: x differs from the windows the generator draws.{hint}")
        check(torch.equal(got[1], y), f"{what}: y must be x shifted by one: data[s + 1 : s + 1 + block_size]")


@pytest.mark.group("step_data")
def test_get_batch_refuses_data_too_short(learner):
    train = learner.module("train")
    loaded = learner.harness("call_stored", train.load_tokens, [learner.put_file(np.arange(8, dtype="<u2").tobytes(), ".bin")])
    with pytest.raises(ValueError):
        learner.harness("call_stored", train.get_batch, [loaded, 2, 8, learner.lib("torch").Generator()])


# --- checkpoints ---------------------------------------------------------------------------------------------------------


@pytest.mark.fresh_worker
@pytest.mark.group("checkpoint")
def test_resume_is_bit_exact_in_a_fresh_worker(learner, seed):
    """6 steps in one go, and 3 steps saved to a checkpoint, whose bytes are carried to a fresh worker
    and resumed there for 3 more steps (into a model of other weights): the same losses, bit for bit,
    and the same weights.  The uninterrupted run also matches a replay with torch's pieces here."""
    o = oracles()
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, seed, torch.float64)
    data = source().sample_ids(4000, seed % 100_000).astype(np.uint16)
    tc = dict(TC, total_steps=8, warmup_steps=3, max_grad_norm=0.5, seed=seed % 1000)
    path = learner.put_file(data.astype("<u2").tobytes(), ".bin")

    def run(steps, checkpoint=None, resume=None, weights=state):
        train = learner.module("train")
        gpt = o.learner_gpt(learner, cfg, weights)
        loaded = learner.harness("call_stored", train.load_tokens, [path])
        out = learner.harness("call_stored", train.train, [gpt, loaded, train.TrainConfig(**tc)],
                              {"steps": steps, "checkpoint_path": checkpoint, "resume_from": resume})
        return learner.harness("fetch", out), gpt.state_dict()

    with learner.time_limit(60):
        full, full_weights = run(6)
        folder = learner.lib("tempfile").mkdtemp()
        first, _ = run(3, checkpoint=f"{folder}/ckpt.pt")
        saved = learner.lib("builtins").open(f"{folder}/ckpt.pt", "rb").read()
    check(isinstance(saved, bytes) and len(saved) > 0, "train(..., checkpoint_path=p) wrote nothing at p")
    replay = o.reference_train(o.to_llama(state, cfg), data, tc, 6)
    check(isinstance(full, list) and len(full) == 6, f"train(..., steps=6) returned {full!r:.100}; expected 6 losses")
    assert_close(torch.tensor(full), torch.tensor(replay), rtol=1e-9, atol=1e-11,
                 call="train(GPT, data, 6 steps) losses, against the loop replayed here with torch's AdamW and F.cross_entropy")
    learner.restart()
    ckpt = learner.put_file(saved, ".pt")
    other = o.fresh_weights(cfg, seed + 1, torch.float64)
    with learner.time_limit(60):
        resumed, resumed_weights = run(3, resume=ckpt, weights=other)
    check(isinstance(resumed, list) and len(resumed) == 3, f"train(..., steps=3, resume_from=ckpt) returned {resumed!r:.100}")
    if resumed != full[3:]:
        lost = {"schedule": "the schedule must continue from the saved step (start = load_checkpoint(...), then lr_at(step))",
                "generator": "restore the generator's state (the batches continue where they stopped)",
                "optimizer": "restore the optimizer's state_dict (Adam's moments and step counts)"}
        hints = [f"\nHint: {text}" for what, text in lost.items()
                 if np.allclose(resumed, o.reference_train(o.to_llama(state, cfg), data, tc, 6, resume_at=3,
                                                           forget=(what,))[3:], rtol=1e-9, atol=1e-11)]
        check(False, f"resumed from a 3-step checkpoint in a fresh worker, train gave losses {resumed}; the uninterrupted "
                     f"run gave {full[3:]} for steps 4-6 (they must be equal, bit for bit: save and restore the model, the "
                     f"optimizer's state, the step and the generator's state){''.join(hints)}")
    for name, w in full_weights.items():
        check(torch.equal(resumed_weights[name], w), f"after the resumed run, {name} differs from the uninterrupted run's")
