"""Hidden tests, Part C: encoding with the prompt masked, padding, the shifted response loss, and
a real LoRA fine-tune of the course GPT: data made here, training in the learner's process, and the
trained weights brought back: the loss, measured here by the course's own GPT with the adapters
folded in, falls below the stated threshold, and the base weights stay bit for bit what they were."""

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autograder.checks import assert_close, check
from autograder.course_code import reference_module

PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
EOS, PAD, IGNORE = 255, 0, -100
LOSS_THRESHOLD = 1.5      # nats per response token, measured here after training (chance: ln 256 = 5.5)
# lr 5e-3, not 1e-2: with 1e-2 the reference solution ended above 1.5 for 2 of 40 secret seeds (1.69, 2.84:
# AdamW overshoots on some base weights); with 5e-3 its loss over 70 seeds was 0.76-1.17 (median 0.95).
STEPS, BATCH, LR = 100, 12, 5e-3
TARGETS, R, ALPHA = ("c_attn", "c_proj", "c_fc"), 8, 16.0


def _encode(example, max_len=128):
    prompt = list(PROMPT.format(instruction=example["instruction"]).encode("utf-8"))
    response = list(example["response"].encode("utf-8")) + [EOS]
    return (prompt + response)[:max_len], ([IGNORE] * len(prompt) + response)[:max_len]


@pytest.mark.group("finetune")
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=st.text(max_size=30), response=st.text(max_size=30), max_len=st.integers(20, 128))
def test_encode_example(learner, instruction, response, max_len):
    example = {"instruction": instruction, "response": response}
    got = learner.module("finetune").encode_example(example, max_len)
    ids, labels = _encode(example, max_len)
    check(isinstance(got, dict) and got.get("input_ids") == ids,
          f"encode_example({example!r}, max_len={max_len})['input_ids'] should be the UTF-8 bytes of the prompt, then of the "
          f"response, then EOS=255, cut to max_len: expected {ids[:12]}... ({len(ids)}), got {str(got)[:120]}")
    prompt_len = len(PROMPT.format(instruction=instruction).encode("utf-8"))
    check(got.get("labels") == labels,
          f"encode_example(...)['labels'] should be -100 on the {prompt_len} prompt tokens and the token itself on every "
          f"response token and EOS (cut to max_len={max_len}); got {str(got.get('labels'))[:120]}")


@pytest.mark.group("finetune")
def test_collate(learner, rng):
    ft = learner.module("finetune")
    examples = []
    for _ in range(int(rng.integers(2, 6))):
        n = int(rng.integers(1, 12))
        ids = rng.integers(1, 255, size=n).tolist()
        labels = [IGNORE if rng.random() < 0.4 else t for t in ids]
        examples.append({"input_ids": ids, "labels": labels})
    t = max(len(e["input_ids"]) for e in examples)
    want_ids = torch.full((len(examples), t), PAD, dtype=torch.long)
    want_labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        want_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        want_labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    got = ft.collate(examples)
    check(isinstance(got, (tuple, list)) and len(got) == 2, "collate returns (input_ids, labels)")
    ids, labels = got
    check(isinstance(ids, torch.Tensor) and ids.dtype == torch.long and torch.equal(ids, want_ids),
          f"collate: input_ids should be int64 [{len(examples)}, {t}], right-padded with PAD=0; got {ids!r:.200}")
    check(isinstance(labels, torch.Tensor) and labels.dtype == torch.long and torch.equal(labels, want_labels),
          f"collate: labels should be int64 [{len(examples)}, {t}], right-padded with -100; got {labels!r:.200}")


@pytest.mark.group("finetune")
def test_response_loss(learner, torch_gen):
    ft = learner.module("finetune")
    b, t, v = 3, 9, 17
    logits = torch.randn(b, t, v, generator=torch_gen) * 2
    labels = torch.randint(v, (b, t), generator=torch_gen)
    labels[torch.rand(b, t, generator=torch_gen) < 0.4] = IGNORE
    labels[:, 1] = 3  # at least one scored position per row
    want = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    scored = labels[:, 1:] != IGNORE
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].clamp(min=0).reshape(-1), reduction="none")
    # float32 log-softmax over 17 logits, averaged: ~1e-6.
    assert_close(ft.response_loss(logits, labels), want, rtol=1e-5, atol=1e-6, call=f"response_loss(logits[{b},{t},{v}], labels)",
                 mistakes={"logits[:, i] predicts the NEXT token: compare logits[:, :-1] with labels[:, 1:]":
                           F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=IGNORE),
                           "average over the scored (label != -100) positions only":
                           (per_token * scored.reshape(-1)).sum() / scored.numel()})


def _base_weights(shapes: dict, gen) -> dict:
    """The base model's weights, chosen here. A pretrained model is confident: its final
    LayerNorm gain is set to 8 so that the frozen, tied output head can reach large logits."""
    state = {}
    for name, shape in shapes.items():
        if name.endswith("ln_f.weight"):
            state[name] = torch.full(shape, 8.0)
        elif ".ln_" in name or name.startswith("transformer.ln_"):
            state[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            state[name] = torch.randn(shape, generator=gen) * 0.02
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.02
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _eval_loss(model, rows):
    """Response-token loss of a model (built here) on every distinct row, computed here."""
    pairs = [_encode(r) for r in rows]
    t = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), t), PAD, dtype=torch.long)
    labels = torch.full((len(pairs), t), IGNORE, dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        ids[i, : len(a)], labels[i, : len(b)] = torch.tensor(a), torch.tensor(b)
    with torch.no_grad():
        logits = model(ids)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                 ignore_index=IGNORE))


def _merged_weights(base: dict, trained: dict, targets: list[str], scalings: dict) -> dict:
    """The base weights with every adapter of the trained state dict folded in, here:
    W + scaling * B @ A (nn.Linear's layout, [d_out, d_in]).  Checks the adapters' names and shapes."""
    merged = dict(base)
    for module in targets:
        w = base[f"{module}.weight"]
        a, b = trained.get(f"{module}.lora_A"), trained.get(f"{module}.lora_B")
        check(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor),
              f"after inject_lora and finetune, {module} should hold adapters {module}.lora_A and {module}.lora_B in "
              f"the model's state_dict(); found {sorted(k for k in trained if k.startswith(module + '.'))}")
        check(tuple(a.shape) == (R, w.shape[1]) and tuple(b.shape) == (w.shape[0], R),
              f"{module}.lora_A should be [r, d_in] = [{R}, {w.shape[1]}] and lora_B [d_out, r] = [{w.shape[0]}, {R}]; "
              f"got {list(a.shape)} and {list(b.shape)}")
        scaling = scalings[module]
        check(isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling),
              f"{module}.scaling should be a number (alpha / r = {ALPHA / R:g}); got {scaling!r}")
        merged[f"{module}.weight"] = w + float(scaling) * (b.float() @ a.float())
    return merged


@pytest.mark.group("finetune")
def test_lora_finetune_learns_and_keeps_base_frozen(learner, rng, seed, torch_gen, record_property):
    """The data are made here (the course's own copy of make_instruction_data) and handed over as a
    read-only file; your finetune trains your adapters in your process; the trained weights come
    back (state_dict()) and the loss is measured here, by the course's GPT with the base weights
    and your adapters folded in (W + scaling * B @ A)."""
    ft, lora = learner.module("finetune"), learner.module("lora")
    course_gpt = learner.course("common.gpt")
    rows = reference_module("unit5.finetune").make_instruction_data(256, int(rng.integers(1 << 30)))
    path = learner.put_file("".join(json.dumps(row) + "\n" for row in rows), suffix=".jsonl")
    dataset = ft.load_instruction_dataset(path)
    check(len(dataset) == 256, f"the dataset loaded from {path} has {len(dataset)} rows; 256 were written")

    trusted = course_gpt.GPT(course_gpt.GPTConfig())
    shapes = {k: tuple(v.shape) for k, v in trusted.state_dict().items()}
    base = _base_weights(shapes, torch_gen)
    trusted.load_state_dict(base)
    trusted.eval()
    targets = [name for name, module in trusted.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
    distinct = [dict(r) for r in {(r["instruction"], r["response"]): r for r in rows}.values()]
    before = _eval_loss(trusted, distinct)

    # The learner's side: the same GPT, to be adapted and trained there.
    gpt = learner.module("common.gpt")
    ltorch = learner.lib("torch")
    ltorch.set_num_threads(1)  # the grading machine's cores are shared; one thread is fastest there
    model = gpt.GPT(gpt.GPTConfig())
    model.load_state_dict(base)
    lora.inject_lora(model, list(TARGETS), R, ALPHA)
    start = time.perf_counter()
    with learner.time_limit(60):
        losses = ft.finetune(model, dataset, STEPS, BATCH, LR, int(rng.integers(1 << 30)))
    seconds = time.perf_counter() - start
    check(isinstance(losses, list) and len(losses) == STEPS and all(isinstance(x, float) for x in losses),
          f"finetune(..., steps={STEPS}) should return {STEPS} losses as floats; got {str(losses)[:100]}")

    trained = model.state_dict()
    check(isinstance(trained, dict) and all(isinstance(v, torch.Tensor) for v in trained.values()),
          "the fine-tuned model's state_dict() should be a dict of tensors")
    changed = []
    for name, value in base.items():
        parts = name.rsplit(".", 1)
        key = name if name in trained else f"{parts[0]}.base.{parts[1]}"
        if key not in trained or not torch.equal(trained[key], value):
            changed.append(name)
    check(not changed, f"fine-tuning changed base weights {changed[:4]}: only the adapters may train (and finetune "
                       "must not merge them into the base)")
    # Each adapter's scaling, as your LoRALinear holds it (a wrong scaling is the lora_layer tests' business).
    found = learner.lib("operator").attrgetter(*[f"{m}.scaling" for m in targets])(model)
    after = _eval_loss(_load(course_gpt, _merged_weights(base, trained, targets, dict(zip(targets, found)))), distinct)
    record_property("figures", f"response loss measured here: {before:.3f} -> {after:.3f} in {seconds:.1f} s of training")
    check(after < LOSS_THRESHOLD,
          f"after {STEPS} steps (batch {BATCH}, lr {LR}, {seconds:.1f} s) the response loss, measured here with your "
          f"adapters folded into the base weights, is {after:.3f} (it was {before:.3f}; your own log went "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}); it should fall below {LOSS_THRESHOLD}. Check: AdamW over the "
          "trainable parameters, zero_grad each step, the shifted loss")


def _load(course_gpt, state: dict):
    model = course_gpt.GPT(course_gpt.GPTConfig())
    model.load_state_dict(state)
    return model.eval()
