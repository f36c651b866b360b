"""Visible tests for Unit 7, Parts B and C (the training loop, and it learns).
Run: pytest exercises/unit7/test_train.py   (the last test trains for about 5 CPU seconds)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check

EXACT = dict(rtol=1e-9, atol=1e-11)
TC = dict(batch_size=4, block_size=8, accum_steps=2, total_steps=40, warmup_steps=5, max_lr=1e-2, min_lr=1e-3,
          weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0, seed=0)


@pytest.mark.group("loss_optim")
def test_cross_entropy_with_ignored_targets(learner):
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 2.0, 3.0]]], dtype=torch.float64)
    targets = torch.tensor([[0, -100, 2]])
    got = learner.module("train").cross_entropy(logits, targets)
    want = F.cross_entropy(logits.reshape(-1, 3), targets.reshape(-1))
    all_positions = (torch.logsumexp(logits[0], -1) - logits[0].gather(1, targets[0].clamp(min=0)[:, None]).squeeze(1))
    assert_close(got, want, **EXACT, call="cross_entropy(logits[1,3,3], targets [[0, -100, 2]])",
                 mistakes={"average over the positions whose target is not ignore_index (-100), and only those":
                           (all_positions * (targets[0] != -100)).mean()})


@pytest.mark.group("loss_optim")
def test_split_decay(learner):
    o = learner.course("oracles")
    cfg = o.gpt_config(n_layer=1)
    decay, no_decay = learner.module("train").split_decay(o.learner_gpt(learner, cfg, None, torch.float32))
    want_no = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
               "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"]
    hint = (" Hint: embeddings are not decayed (nor is the head tied to them)" if "model.embed_tokens.weight" in decay else
            " Hint: norm weights (1-d) are not decayed" if any("norm" in n for n in decay) else "")
    check(list(no_decay) == want_no and len(decay) == 7,
          f"split_decay(GPT with 1 layer): not decayed {list(no_decay)}; expected {want_no}; decayed {list(decay)} (the 7 "
          f"Linear weights).{hint}")


@pytest.mark.group("loss_optim")
def test_adamw_two_steps_against_torch(learner):
    o = learner.course("oracles")
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    params = o.learner_parameters(learner, [w])
    opt = learner.module("train").AdamW(params.parameters(), lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    ref_w = torch.nn.Parameter(w.clone())
    ref = torch.optim.AdamW([ref_w], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5, foreach=False)
    for step, g in enumerate([torch.tensor([[0.1, -0.2], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.5]])]):
        g = g.double()
        o.set_grads(learner, params, [g])
        opt.step()
        ref_w.grad = g.clone()
        ref.step()
        assert_close(params.state_dict()["0"], ref_w.detach(), **EXACT,
                     call=f"AdamW(lr 0.1, betas (0.9, 0.99), weight_decay 0.5) after step {step + 1}",
                     hint="decoupled decay p *= 1 - lr * wd first, then the bias-corrected Adam update")


@pytest.mark.group("schedule_clip")
def test_lr_schedule_warmup_and_floor(learner):
    train = learner.module("train")
    cfg = train.TrainConfig(**dict(TC, warmup_steps=4, total_steps=10, max_lr=1.0, min_lr=0.1))
    got = [train.lr_at(s, cfg) for s in range(12)]
    want = learner.course("oracles").schedule(dict(TC, warmup_steps=4, total_steps=10, max_lr=1.0, min_lr=0.1), 12)
    hint = ""
    if got[:4] == [0.25, 0.5, 0.75, 1.0]:
        hint = " Hint: warm-up starts at 0: max_lr * step / warmup_steps (step 0 is the first step)"
    check(all(abs(a - b) < 1e-12 for a, b in zip(got, want)),
          f"lr_at(0..11) with warmup 4, total 10, max 1.0, min 0.1 = {[round(x, 4) for x in got]}; expected "
          f"{[round(x, 4) for x in want]}.{hint}")


@pytest.mark.group("schedule_clip")
def test_clip_grad_norm_of_a_generator(learner):
    o = learner.course("oracles")
    grads = [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([[0.0, 4.0]], dtype=torch.float64)]
    params = o.learner_parameters(learner, [torch.zeros(2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)])
    o.set_grads(learner, params, grads)
    norm = learner.module("train").clip_grad_norm(params.parameters(), 1.0)
    assert_close(norm, 5.0, **EXACT, call="clip_grad_norm(generator of 2 parameters, grads [3, 0] and [[0, 4]], 1.0)")
    got = o.learner_grads(learner, params, ["0", "1"])
    assert_close(got["0"], grads[0] / (5.0 + 1e-6), **EXACT, call="the first gradient after clipping to norm 1",
                 mistakes={"go through the parameters once: model.parameters() is a generator, empty the second time":
                           grads[0]})


@pytest.mark.group("step_data")
def test_accumulation_equals_the_large_batch(learner):
    o = learner.course("oracles")
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, 0, torch.float64)
    gen = torch.Generator().manual_seed(0)
    micro = [(torch.randint(0, 50, (2, 6), generator=gen), torch.randint(0, 50, (2, 6), generator=gen)) for _ in range(3)]
    gpt = o.learner_gpt(learner, cfg, state)
    learner.module("train").accumulate_gradients(gpt, micro)
    hf = o.to_llama(state, cfg)
    out = hf(input_ids=torch.cat([m[0] for m in micro]), use_cache=False).logits
    F.cross_entropy(out.reshape(-1, 50), torch.cat([m[1] for m in micro]).reshape(-1)).backward()
    name = "model.layers.1.mlp.down_proj.weight"
    got = o.learner_grads(learner, gpt, [name])[name]
    want = dict(hf.named_parameters())[name].grad
    assert_close(got, want, **EXACT, call=f"accumulate_gradients(GPT, 3 micro-batches [2, 6]): the gradient of {name}",
                 mistakes={"divide each micro-batch's loss by the number of micro-batches before backward()": 3 * want})


@pytest.mark.group("step_data")
def test_train_step_clips_before_the_step(learner):
    """Two steps with clipping far below the norm: a step clipped after optimizer.step() differs."""
    o = learner.course("oracles")
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, 1, torch.float64)
    gen = torch.Generator().manual_seed(1)
    gpt = o.learner_gpt(learner, cfg, state)
    train = learner.module("train")
    opt = train.make_optimizer(gpt, train.TrainConfig(**TC))
    hf, late_hf = o.to_llama(state, cfg), o.to_llama(state, cfg)
    ref, late = o.reference_optimizer(hf, TC), o.reference_optimizer(late_hf, TC)
    for step in range(2):
        micro = [(torch.randint(0, 50, (3, 7), generator=gen), torch.randint(0, 50, (3, 7), generator=gen))]
        train.train_step(gpt, opt, micro, 1e-2, 1e-3)
        o.reference_step(hf, ref, micro, 1e-2, 1e-3)
        o.reference_step(late_hf, late, micro, 1e-2, 1e-3, clip_after_step=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert_close(gpt.state_dict()[name], hf.state_dict()[name], rtol=1e-10, atol=1e-13,
                 call=f"two train_step calls (max_grad_norm 1e-3): {name}",
                 mistakes={"clip the gradients after backward and before optimizer.step() (clipping after the step "
                           "changes nothing that step used)": late_hf.state_dict()[name]})


@pytest.mark.group("step_data")
def test_get_batch_windows(learner):
    data = np.arange(20, dtype="<u2")
    train = learner.module("train")
    loaded = learner.harness("call_stored", train.load_tokens, [learner.put_file(data.tobytes(), ".bin")])
    gen = learner.lib("torch").Generator().manual_seed(3)
    x, y = learner.harness("fetch", learner.harness("call_stored", train.get_batch, [loaded, 4, 5, gen]))
    starts = torch.randint(0, 15, (4,), generator=torch.Generator().manual_seed(3))
    want = torch.stack([torch.arange(s, s + 5) for s in starts.tolist()])
    check(torch.equal(x, want) and torch.equal(y, want + 1),
          f"get_batch(arange(20), 4, 5, generator seeded 3) gave x {x.tolist()}; expected {want.tolist()} (starts from "
          "torch.randint(0, len(data) - block_size, (batch_size,), generator=generator)), and y = x + 1 here")


@pytest.mark.group("checkpoint")
def test_resume_gives_the_same_losses(learner):
    o = learner.course("oracles")
    cfg = o.gpt_config()
    state = o.fresh_weights(cfg, 2, torch.float64)
    data = learner.course("source").sample_ids(3000, 5).astype("<u2")
    tc = dict(TC, total_steps=6, warmup_steps=2)
    train = learner.module("train")
    path = learner.put_file(data.tobytes(), ".bin")
    loaded = learner.harness("call_stored", train.load_tokens, [path])

    def run(steps, **kw):
        gpt = o.learner_gpt(learner, cfg, state)
        out = learner.harness("call_stored", train.train, [gpt, loaded, train.TrainConfig(**tc)], {"steps": steps, **kw})
        return learner.harness("fetch", out)

    full = run(4)
    folder = learner.lib("tempfile").mkdtemp()
    run(2, checkpoint_path=f"{folder}/c.pt")
    resumed = run(2, resume_from=f"{folder}/c.pt")
    check(resumed == full[2:], f"train for 4 steps gave losses {full}; 2 steps, saved and resumed for 2 more, gave "
                               f"{resumed} for steps 3-4: they must be equal, bit for bit (restore the model, the optimizer, "
                               "the step and the generator)")


MODEL = dict(vocab_size=42, d_model=64, n_layer=2, n_head=4, d_mlp=172, max_seq_len=256)
RUN = dict(batch_size=16, block_size=64, accum_steps=1, total_steps=250, warmup_steps=25, max_lr=3e-3, min_lr=3e-4,
           weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0, seed=0)


@pytest.mark.group("learns")
def test_it_learns(learner, record_property):
    """The graded run of Part C with fixed seeds (the grader uses secret ones): about 5 CPU seconds."""
    src, o = learner.course("source"), learner.course("oracles")
    path = learner.put_file(src.generate(150_000, 1))
    train, model, torch_l = learner.module("train"), learner.module("model"), learner.lib("torch")
    with learner.time_limit(120):  # (the grader's limit for one call; your own run has none)
        ids = learner.harness("call_stored", train.encode_dataset, [path, src.vocab()])
        folder = learner.lib("tempfile").mkdtemp()
        learner.harness("call_stored", train.write_tokens, [ids, f"{folder}/train.bin"])
        data = learner.harness("call_stored", train.load_tokens, [f"{folder}/train.bin"])
    torch_l.manual_seed(0)
    gpt = model.GPT(model.GPTConfig(**o.gpt_config(**MODEL)))
    threads = torch_l.get_num_threads()
    torch_l.set_num_threads(1)  # small matrices: one thread is fastest, and the same on every machine
    try:
        with learner.time_limit(180):
            losses = learner.harness("fetch", learner.harness("call_stored", train.train, [gpt, data, train.TrainConfig(**RUN)]))
    finally:
        torch_l.set_num_threads(threads)
    hf = o.to_llama(gpt.state_dict(), o.gpt_config(**MODEL), torch.float32, exact=False)
    windows = src.random_windows(src.sample_ids(80_000, 2), 512, 65, 3)
    val, best, bigram = o.windows_loss(hf, windows), src.optimal_loss(windows), src.bigram_loss(windows)
    record_property("figures", f"validation {val:.4f}, best possible {best:.4f}, previous word only {bigram:.4f}")
    check(val - best <= 0.05, f"after 250 steps the validation loss is {val:.4f} nats, {val - best:+.4f} from the best "
                              f"possible {best:.4f} (previous word only: {bigram:.4f}; training loss "
                              f"{np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}); expected within 0.05")
