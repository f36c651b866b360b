"""Course code (read it, do not edit it): the two toy tasks of Unit 8 and the loops that train on them.

* Preferences: a prompt is 2-5 digits; a response is a digit, 0-2 more digits and EOS.  The chosen
  response starts with the prompt's FIRST digit, the rejected one with another digit; both share
  the rest.  A small GPT can learn the rule (attend to position 0 and copy), so held-out pairs tell
  whether DPO learned it.  Pairs are written as JSON lines and read back with Hugging Face
  ``datasets`` (``load_preferences``); ``collate_pairs`` pads them as TRL does: prompts on the left,
  responses on the right, chosen rows first.
* Arithmetic, for GRPO: a prompt is ``a + b =`` (digits 0-4); the policy samples up to 2 tokens;
  the reward is 1 when the first one is the digit a + b, else 0: a verifiable reward that this file
  computes.  A response ends at its first EOS (included).

The loops (``train_dpo``, ``train_grpo``) take your functions through their ``dpo`` / ``grpo``
argument: by default your dpo.py / grpo.py, imported when first needed (this file imports none of
your code).  The grader passes its own view of them instead and runs the loops on its side; what it
checks (held-out preference accuracy, margin and KL; the reward) is measured by this file, one
sequence at a time with ``torch.distributions``, not with your functions.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributions import Categorical, kl_divergence

from common.gpt import GPT, GPTConfig

# the vocabulary: digits 0-9, then four symbols
PLUS, EQ, EOS, PAD = 10, 11, 12, 13
VOCAB = 16
DIGITS = 5  # arithmetic operands are 0 .. DIGITS - 1


def policy_config() -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2)


def new_policy(seed: int, config: GPTConfig | None = None) -> GPT:
    """A freshly initialised course GPT (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(config or policy_config())


def frozen_copy(model: GPT) -> GPT:
    """The reference: a copy of the model as it starts, never trained."""
    reference = GPT(model.config)
    reference.load_state_dict(model.state_dict())
    return reference.requires_grad_(False)


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one thread is faster than several, especially on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --- preference pairs --------------------------------------------------------------------------------


def make_preference_rows(seed: int, n: int) -> list[dict]:
    """n pairs {"prompt", "chosen", "rejected"} of token ids; the chosen response starts with the
    prompt's first digit."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rnd.randrange(10) for _ in range(rnd.randint(2, 5))]
        tail = [rnd.randrange(10) for _ in range(rnd.randint(0, 2))] + [EOS]
        other = (prompt[0] + rnd.randrange(1, 10)) % 10
        rows.append({"prompt": prompt, "chosen": [prompt[0], *tail], "rejected": [other, *tail]})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def load_preferences(path: str | Path):
    """The pairs of a JSON-lines file as a ``datasets.Dataset`` (columns prompt, chosen, rejected)."""
    import datasets

    datasets.disable_progress_bars()
    cache = Path(path).parent / f".{Path(path).name}.cache"
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))


def collate_pairs(rows) -> dict:
    """Pairs -> a batch of 2B rows [chosen..., rejected...] as TRL pads them: each prompt on the left
    to the longest prompt, each response on the right to the longest response (PAD tokens).

    Returns "input_ids" (int64), "attention_mask" and "response_mask" (float32, 1 on real tokens and
    on response tokens), each [2B, P + R]."""
    if isinstance(rows, dict):  # a datasets slice: {"prompt": [...], "chosen": [...], "rejected": [...]}
        rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    prompts = [list(r["prompt"]) for r in rows] * 2
    responses = [list(r["chosen"]) for r in rows] + [list(r["rejected"]) for r in rows]
    p, r = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(prompts), p + r), PAD, dtype=torch.long)
    attention = torch.zeros(len(prompts), p + r)
    response = torch.zeros(len(prompts), p + r)
    for i, (prompt, answer) in enumerate(zip(prompts, responses)):
        ids[i, p - len(prompt) : p] = torch.tensor(prompt)
        ids[i, p : p + len(answer)] = torch.tensor(answer)
        attention[i, p - len(prompt) : p + len(answer)] = 1.0
        response[i, p : p + len(answer)] = 1.0
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def learner_module(name: str):
    """Your dpo.py or grpo.py, imported when a loop first needs it."""
    import importlib

    return importlib.import_module(f"unit8.{name}")


def train_dpo(policy: GPT, reference: GPT, data, steps: int = 100, batch_size: int = 32, lr: float = 3e-3,
              cfg=None, seed: int = 0, dpo=None, every: int = 0, evaluate_on=None) -> list[dict]:
    """DPO on pairs (a ``datasets.Dataset`` or a list of rows): ``steps`` steps of ``batch_size``
    pairs, drawn in a fresh random order each epoch.  One entry per step: dpo_step's statistics, and
    every ``every`` steps (if evaluate_on is given) what ``evaluate_preferences`` measures there."""
    dpo = learner_module("dpo") if dpo is None else dpo
    cfg = cfg or dpo.DPOConfig(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, gamma=0.5, max_grad_norm=1.0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history, order = [], []
    with one_thread():
        for step in range(steps):
            if len(order) < batch_size:
                order = torch.randperm(len(data), generator=generator).tolist()
            picked, order = order[:batch_size], order[batch_size:]
            rows = data[picked] if not isinstance(data, list) else [data[i] for i in picked]
            start = time.perf_counter()
            stats = dict(dpo.dpo_step(policy, reference, optimizer, collate_pairs(rows), cfg))
            stats["seconds"] = time.perf_counter() - start
            if every and evaluate_on is not None and (step + 1) % every == 0:
                stats.update({f"eval_{k}": v for k, v in evaluate_preferences(policy, reference, evaluate_on,
                                                                              cfg.beta).items()})
            history.append(stats)
    return history


@torch.no_grad()
def response_logprob(model: GPT, prompt: list[int], response: list[int]) -> tuple[float, torch.Tensor]:
    """log p(response | prompt) of one unpadded sequence, and the policy's logits at each response
    position [R, V], with torch.distributions: the course's own measurement."""
    seq = torch.tensor([list(prompt) + list(response)])
    logits = model(seq)[0, len(prompt) - 1 : -1].double()
    return float(Categorical(logits=logits).log_prob(torch.tensor(response)).sum()), logits


@torch.no_grad()
def evaluate_preferences(policy: GPT, reference: GPT, rows, beta: float) -> dict:
    """Held-out figures, one unpadded sequence at a time: "accuracy" (share of pairs whose implicit
    reward beta * (log pi - log pi_ref) is higher for the chosen response), "margin" (mean chosen -
    rejected reward) and "kl": KL(policy || reference) over the whole vocabulary at each chosen
    response position, averaged over positions (nats per token)."""
    if isinstance(rows, dict):
        rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    wins, margins, kls, positions = 0, 0.0, 0.0, 0
    with one_thread():
        for row in rows:
            chosen, logits = response_logprob(policy, row["prompt"], row["chosen"])
            ref_chosen, ref_logits = response_logprob(reference, row["prompt"], row["chosen"])
            rejected, _ = response_logprob(policy, row["prompt"], row["rejected"])
            ref_rejected, _ = response_logprob(reference, row["prompt"], row["rejected"])
            margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
            wins += margin > 0
            margins += margin
            kls += float(kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits)).sum())
            positions += len(row["chosen"])
    return {"accuracy": wins / len(rows), "margin": margins / len(rows), "kl": kls / positions}


# --- arithmetic, for GRPO ----------------------------------------------------------------------------


def make_prompts(generator: torch.Generator, n: int) -> torch.Tensor:
    """n prompts [a, PLUS, b, EQ], a and b uniform in 0 .. DIGITS - 1: [n, 4]."""
    a = torch.randint(0, DIGITS, (n,), generator=generator)
    b = torch.randint(0, DIGITS, (n,), generator=generator)
    return torch.stack([a, torch.full_like(a, PLUS), b, torch.full_like(a, EQ)], dim=1)


def all_prompts() -> torch.Tensor:
    a, b = torch.meshgrid(torch.arange(DIGITS), torch.arange(DIGITS), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    return torch.stack([a, torch.full_like(a, PLUS), b, torch.full_like(a, EQ)], dim=1)


@torch.no_grad()
def sample(policy: GPT, prompts: torch.Tensor, max_new: int, generator: torch.Generator,
           eos: int | None = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample max_new tokens after each prompt (temperature 1).  Returns (sequences [n, P + max_new],
    response_mask [n, P + max_new]: 1 on the response up to and including its first ``eos``; with
    eos=None, on the whole response)."""
    seq = prompts
    for _ in range(max_new):
        probs = torch.softmax(policy(seq)[:, -1].float(), dim=-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], dim=1)
    response = seq[:, prompts.shape[1] :]
    ended = (response == eos).long() if eos is not None else torch.zeros_like(response)
    before_end = (ended.cumsum(dim=1) - ended) == 0  # no eos strictly before this token
    mask = torch.cat([torch.zeros_like(prompts, dtype=torch.float32), before_end.float()], dim=1)
    return seq, mask


def reward(prompts: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """1.0 where the first response token is the digit a + b, else 0.0: [n]."""
    return (sequences[:, prompts.shape[1]] == prompts[:, 0] + prompts[:, 2]).float()


@torch.no_grad()
def greedy_accuracy(policy: GPT) -> float:
    """Share of the DIGITS**2 prompts whose most likely first token is the right sum."""
    prompts = all_prompts()
    with one_thread():
        return float((policy(prompts)[:, -1].argmax(dim=-1) == prompts[:, 0] + prompts[:, 2]).float().mean())


@torch.no_grad()
def sampled_kl(policy: GPT, reference: GPT, sequences: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(policy || reference) over the vocabulary at each response position, averaged (nats/token)."""
    logits, ref_logits = policy(sequences)[:, :-1].double(), reference(sequences)[:, :-1].double()
    kl = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits))
    m = mask[:, 1:].double()
    return float((kl * m).sum() / m.sum())


@dataclass(frozen=True)
class Task:
    """A task for GRPO: prompts [n, P] from a generator, a reward [n] computed here from the prompts and
    the sampled sequences, how many tokens to sample, and the token that ends a response (or None)."""
    prompts: Callable[[torch.Generator, int], torch.Tensor]
    reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    max_new: int = 2
    eos: int | None = EOS


ARITHMETIC = Task(make_prompts, reward, max_new=2, eos=EOS)


def train_grpo(policy: GPT, reference: GPT, updates: int = 150, prompts_per_update: int = 16, lr: float = 3e-3,
               cfg=None, seed: int = 0, grpo=None, task: Task = ARITHMETIC) -> list[dict]:
    """GRPO on a task (arithmetic by default): each update samples cfg.group_size responses to each of
    ``prompts_per_update`` prompts from the current policy, rewards them here, and calls grpo_step.
    One entry per update: grpo_step's statistics, then what this file measured on that update's
    samples (before its step): "reward" (their mean reward) and "sampled_kl"; and the seconds."""
    grpo = learner_module("grpo") if grpo is None else grpo
    cfg = cfg or grpo.GRPOConfig(group_size=8, clip_eps=0.2, beta=0.04, scale_rewards=True, aggregation="sequence",
                                 iterations=1, max_grad_norm=1.0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    with one_thread():
        for _ in range(updates):
            start = time.perf_counter()
            prompts = task.prompts(generator, prompts_per_update).repeat_interleave(cfg.group_size, dim=0)
            sequences, response_mask = sample(policy, prompts, task.max_new, generator, task.eos)
            rewards = task.reward(prompts, sequences)
            measured = {"reward": float(rewards.mean()),
                        "sampled_kl": sampled_kl(policy, reference, sequences, response_mask)}
            batch = {"input_ids": sequences, "attention_mask": torch.ones_like(response_mask),
                     "response_mask": response_mask, "rewards": rewards}
            stats = dict(grpo.grpo_step(policy, reference, optimizer, batch, cfg))
            history.append({**stats, **measured, "seconds": time.perf_counter() - start})
    return history
