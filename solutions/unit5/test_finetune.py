"""Visible tests for Part C. Run: pytest exercises/unit5/test_finetune.py"""

import pytest
import torch
import torch.nn.functional as F

from autograder.checks import assert_close, check


@pytest.mark.group("finetune")
def test_encode_example_masks_the_prompt(learner):
    ft = learner.module("finetune")
    enc = ft.encode_example({"instruction": "Hi?", "response": "Yo."})
    prompt = list("### Instruction:\nHi?\n### Response:\n".encode())
    want_ids = prompt + list(b"Yo.") + [255]
    check(enc["input_ids"] == want_ids, f"input_ids should be the prompt's bytes, the response's, then EOS=255: "
                                        f"expected {want_ids}, got {enc['input_ids']}")
    check(enc["labels"] == [-100] * len(prompt) + list(b"Yo.") + [255],
          "labels are -100 on every prompt token and the token itself on the response and EOS")


@pytest.mark.group("finetune")
def test_response_loss_by_hand(learner):
    ft = learner.module("finetune")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100]])
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(ft.response_loss(logits, labels), want, rtol=1e-6, atol=1e-6, call="response_loss(logits[2,6,11], labels[2,6])",
                 mistakes={"logits[:, i] predicts the NEXT token: compare logits[:, :-1] with labels[:, 1:]":
                           F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)})


@pytest.mark.group("finetune")
def test_collate_pads_right(learner):
    ft = learner.module("finetune")
    ids, labels = ft.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    check(torch.equal(ids, torch.tensor([[5, 6, 7], [8, 0, 0]])), f"input_ids should be right-padded with PAD=0; got {ids.tolist()}")
    check(torch.equal(labels, torch.tensor([[-100, 6, 7], [8, -100, -100]])), f"labels are padded with -100; got {labels.tolist()}")
