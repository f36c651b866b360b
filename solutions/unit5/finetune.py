"""Part C: fine-tune the course GPT with LoRA on a small instruction dataset.

The course makes the data (``make_instruction_data``), writes it as JSON lines and loads it with
Hugging Face ``datasets``, exactly as you would load a real instruction set from disk.  Text is
byte-level: token id = byte value, and byte 255 (never in UTF-8 text) ends a response (EOS).
The loss is counted on the response only: the prompt is context, not something to learn.
"""

from __future__ import annotations

import json
import os
import random

import torch
import torch.nn.functional as F

EOS = 255           # end of response; 0xFF never occurs in UTF-8 text
PAD = 0             # padding id; its labels are IGNORE, so its value never matters
IGNORE = -100       # label of a position that is not scored (F.cross_entropy's ignore_index)
PROMPT = "### Instruction:\n{instruction}\n### Response:\n"

_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo", "Peru": "Lima",
             "Kenya": "Nairobi", "Norway": "Oslo", "Chile": "Santiago"}
_SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "owl": "hoot", "sheep": "baa",
           "lion": "roar", "frog": "ribbit"}
_OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "day": "night", "wet": "dry",
              "early": "late", "open": "closed"}


def all_examples() -> list[dict]:
    """Every distinct instruction of the course's toy instruction set (24 of them)."""
    rows = [{"instruction": f"What is the capital of {k}?", "response": f"The capital is {v}."}
            for k, v in _CAPITALS.items()]
    rows += [{"instruction": f"What does a {k} say?", "response": f"A {k} says {v}."} for k, v in _SOUNDS.items()]
    rows += [{"instruction": f"What is the opposite of {k}?", "response": f"The opposite is {v}."}
             for k, v in _OPPOSITES.items()]
    return rows


def make_instruction_data(n: int, seed: int) -> list[dict]:
    """``n`` rows drawn (with replacement) from the toy instruction set."""
    rows = all_examples()
    rand = random.Random(seed)
    return [dict(rand.choice(rows)) for _ in range(n)]


def write_jsonl(rows: list[dict], path: str) -> str:
    """One JSON object per line, as instruction datasets are usually shipped."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def load_instruction_dataset(path: str):
    """A ``datasets.Dataset`` with columns ``instruction`` and ``response``, read from local JSON lines."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for the hub
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset("json", data_files=path, split="train")


def encode_text(text: str) -> list[int]:
    """Byte-level tokens: the UTF-8 bytes of the text."""
    return list(text.encode("utf-8"))


def encode_example(example: dict, max_len: int = 128) -> dict:
    """{"input_ids": prompt + response + [EOS], "labels": same length, IGNORE on every prompt
    token, the token itself on every response token and on EOS}; both cut to ``max_len``."""
    # TODO: tokens of PROMPT.format(instruction=...) then of the response then EOS; labels mask the prompt.
    ### BEGIN SOLUTION
    prompt = encode_text(PROMPT.format(instruction=example["instruction"]))
    response = encode_text(example["response"]) + [EOS]
    input_ids = (prompt + response)[:max_len]
    labels = ([IGNORE] * len(prompt) + response)[:max_len]
    return {"input_ids": input_ids, "labels": labels}
    ### END SOLUTION


def collate(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad encoded examples to the longest: (input_ids [b, t] int64 padded with PAD,
    labels [b, t] int64 padded with IGNORE)."""
    # TODO: t = longest input_ids; fill with PAD / IGNORE; copy each example into its row.
    ### BEGIN SOLUTION
    t = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), t), PAD, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
    return input_ids, labels
    ### END SOLUTION


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored positions: logits[:, i] predicts labels[:, i + 1]."""
    # TODO: shift (drop the last logit and the first label), then F.cross_entropy(..., ignore_index=IGNORE).
    ### BEGIN SOLUTION
    logits = logits[:, :-1].reshape(-1, logits.size(-1))
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
    ### END SOLUTION


def finetune(model: torch.nn.Module, dataset, steps: int = 150, batch_size: int = 16, lr: float = 1e-2,
             seed: int = 0) -> list[float]:
    """Train the model's trainable parameters (the adapters) with AdamW (weight_decay=0) on random
    batches of the dataset (rows sampled with torch.Generator().manual_seed(seed)).
    ``model(input_ids)`` returns logits. Returns the loss of every step, as floats."""
    # TODO: encode every row once; AdamW over the parameters with requires_grad; loop: sample, collate,
    #       response_loss, zero_grad, backward, step; record loss.item().
    ### BEGIN SOLUTION
    encoded = [encode_example(row) for row in dataset]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        input_ids, labels = collate([encoded[i] for i in rows])
        loss = response_loss(model(input_ids), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
    ### END SOLUTION
