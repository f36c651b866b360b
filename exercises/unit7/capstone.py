"""Course code (read it, do not edit it): the capstone of the course, ``course capstone``.

Everything you built, end to end, on the course's corpus (``source.py``): a byte-level BPE tokenizer
trained with your Unit 3 ``train_bpe``, your Unit 7 model trained by your Unit 7 loop on the text it
cuts, and samples decoded with your Unit 4 ``KVCache`` and Unit 7's ``generate`` (temperature, top-k,
top-p).  It prints the loss curve against the limit the source allows and a few samples, and checks
how many sampled sentences the grammar accepts.

Where one of your earlier units is not done yet (a TODO raises), a stand-in takes its place and the
output says so: the course's reference solution where this is the instructor's repository (it has
``solutions/``), else, for Unit 3, a byte-level BPE from Hugging Face's ``tokenizers`` and, for Unit 4,
the course's ``cache.ConcatCache``.  Unit 7 itself has no stand-in in a student's copy: fill in its
TODOs first.  Nothing here is graded.

    course capstone                     # your code in exercises/
    course capstone --root solutions    # the course's reference solutions (instructors)
    python -m unit7.capstone            # the same, from the folder that holds the unit folders
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import tempfile
import time
from types import ModuleType, SimpleNamespace

import numpy as np
import torch

from . import source
from .cache import ConcatCache

SPECIAL = "<|endoftext|>"


def _reference(name: str) -> ModuleType | None:
    """The course's reference solution of a learner module, where this repository has solutions/."""
    try:
        from autograder.course_code import reference_module

        return reference_module(name)
    except Exception:  # a student's copy: no solutions, or no course.yml entry
        return None


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if isinstance(exc, NotImplementedError) else f"{type(exc).__name__}: {text}"


# --- Unit 3: the tokenizer ----------------------------------------------------------------------------


class _LibraryBPE:
    """Stand-in for Unit 3: a byte-level BPE trained by Hugging Face's tokenizers library."""

    def __init__(self, path: str, vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self.tok = Tokenizer(models.BPE())
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self.tok.train([path], trainer)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class _UnitBPE:
    """Unit 3's tokenizer (yours, or the reference), trained on a file."""

    def __init__(self, bpe: ModuleType, path: str, vocab_size: int):
        vocab, merges = bpe.train_bpe(path, vocab_size, [SPECIAL])
        self.tok = bpe.Tokenizer(vocab, merges, [SPECIAL])
        self.vocab_size = max(self.tok.vocab) + 1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _probe_bpe(bpe: ModuleType) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("a big dog . a big cat .\n")
    try:
        tok = _UnitBPE(bpe, f.name, 262)
        if tok.decode(tok.encode("a big dog .")) != "a big dog .":
            raise ValueError("decode(encode(text)) is not the text")
    finally:
        os.unlink(f.name)


def tokenizer(path: str, vocab_size: int, log) -> object:
    try:
        bpe = importlib.import_module("unit3.bpe")
        _probe_bpe(bpe)
        log("tokenizer: your Unit 3 train_bpe and Tokenizer")
        return _UnitBPE(bpe, path, vocab_size)
    except Exception as exc:  # not done yet (a TODO raises), or not working
        reason = _why(exc)
    reference = _reference("unit3.bpe")
    if reference is not None:
        log(f"tokenizer: the course's reference Unit 3 stands in (yours: {reason})")
        return _UnitBPE(reference, path, vocab_size)
    log(f"tokenizer: Hugging Face's tokenizers stands in for your Unit 3 ({reason})")
    return _LibraryBPE(path, vocab_size)


# --- Unit 4: the cache -------------------------------------------------------------------------------


def cache_factory(log):
    """(a function (model, batch, max_len) -> an empty cache, what it is)."""
    def unit4(module):
        def make(model, batch, max_len):
            c = model.config
            weight = model.model.embed_tokens.weight
            return module.KVCache(c.n_layer, batch, c.n_head, max_len, c.d_model // c.n_head, weight.dtype, weight.device)
        return make

    try:
        kv = importlib.import_module("unit4.kvcache")
        probe = kv.KVCache(1, 1, 1, 4, 2)
        keys, _ = probe.append(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
        probe.advance(2)
        if tuple(keys.shape) != (1, 1, 2, 2) or probe.length != 2:
            raise ValueError("append/advance do not follow Unit 4's contract")
        log("cache: your Unit 4 KVCache (preallocated)")
        return unit4(kv)
    except Exception as exc:
        reason = _why(exc)
    reference = _reference("unit4.kvcache")
    if reference is not None:
        log(f"cache: the course's reference Unit 4 KVCache stands in (yours: {reason})")
        return unit4(reference)
    log(f"cache: the course's ConcatCache stands in for your Unit 4 KVCache ({reason})")
    return lambda model, batch, max_len: ConcatCache(model.config.n_layer)


# --- Unit 7 ------------------------------------------------------------------------------------------------


def _probe_unit7(model_mod, train_mod, sample_mod) -> None:
    cfg = model_mod.GPTConfig(vocab_size=8, d_model=8, n_layer=1, n_head=2, d_mlp=8, max_seq_len=16)
    gpt = model_mod.GPT(cfg)
    data = np.arange(40, dtype=np.uint16) % 8
    train_mod.train(gpt, data, train_mod.TrainConfig(batch_size=2, block_size=4, total_steps=1, warmup_steps=0))
    sample_mod.generate(gpt, torch.zeros(1, 1, dtype=torch.long), 2, cache=ConcatCache(1))


def unit7(log) -> SimpleNamespace:
    names = ("model", "train", "sample")
    try:
        mods = [importlib.import_module(f"unit7.{n}") for n in names]
        _probe_unit7(*mods)
        log("model, training loop, generate: your Unit 7")
        return SimpleNamespace(**dict(zip(names, mods)))
    except Exception as exc:
        reason = _why(exc)
    refs = [_reference(f"unit7.{n}") for n in names]
    if all(refs):
        log(f"model, training loop, generate: the course's reference Unit 7 stands in (yours: {reason})")
        return SimpleNamespace(**dict(zip(names, refs)))
    raise SystemExit(f"Unit 7 is not done yet ({reason}): fill in its TODOs (pytest exercises/unit7), then run "
                     "`course capstone` again.")


# --- the run ----------------------------------------------------------------------------------------------------


def grammatical(sentence: list[str]) -> bool:
    """Whether the grammar can produce this sentence (from a sentence start, ending with ".")."""
    vocab = source.vocab()
    state = 0
    for word in sentence:
        w = vocab.get(word)
        if w is None or source.SOURCE.emit[state, w] == 0:
            return False
        state = int(source.SOURCE.next_state[state, w])
    return state == 0


def _ascii_curve(points: list[tuple[int, float]], limit: float, width: int = 50) -> list[str]:
    top = max(v for _, v in points)
    low = limit
    lines = []
    for step, value in points:
        bar = int(round((value - low) / max(top - low, 1e-9) * width))
        lines.append(f"  step {step:4d}  {value:6.3f}  |{'#' * max(bar, 0)}")
    lines.append(f"  limit      {limit:6.3f}  |  (the source's entropy rate)")
    return lines


def run(steps: int = 300, seed: int = 0, words: int = 200_000, vocab_size: int = 320, log=print) -> dict:
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    try:
        return _run(steps, seed, words, vocab_size, log, started)
    finally:
        torch.set_num_threads(threads)


def _run(steps, seed, words, vocab_size, log, started) -> dict:
    log("# The capstone: your tokenizer, your model, your loop, your cache\n")
    parts = unit7(log)
    make_cache = cache_factory(log)
    folder = tempfile.mkdtemp(prefix="capstone-")
    text = source.generate(words, seed, sentences_per_line=1)
    held_out = source.generate(20_000, seed + 1, sentences_per_line=1)
    with open(os.path.join(folder, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(text[: 300_000])
    tok = tokenizer(os.path.join(folder, "sample.txt"), vocab_size, log)
    t0 = time.perf_counter()
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    val_ids = np.asarray(tok.encode(held_out), dtype=np.int64)
    n_words = len(text.split())
    per_word = len(ids) / n_words
    log(f"\ncorpus: {n_words:,} words of the course's grammar, {len(text) / 1e6:.1f} MB; {len(ids):,} tokens with a "
        f"vocabulary of {tok.vocab_size} ({per_word:.2f} tokens per word; encoded in {time.perf_counter() - t0:.1f} s)")
    parts.train.write_tokens(ids, os.path.join(folder, "train.bin"))
    data = parts.train.load_tokens(os.path.join(folder, "train.bin"))

    cfg = parts.model.GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, d_mlp=172, max_seq_len=128)
    torch.manual_seed(seed)
    gpt = parts.model.GPT(cfg)
    tc = parts.train.TrainConfig(batch_size=16, block_size=64, total_steps=steps, warmup_steps=max(1, steps // 10),
                                 max_lr=3e-3, min_lr=3e-4, seed=seed)
    rate = source.entropy_rate()
    log(f"model: {parts.model.num_parameters(gpt):,} parameters; {steps} steps of {tc.batch_size} x {tc.block_size} tokens\n")
    t0 = time.perf_counter()
    losses, every = [], max(1, steps // 10)
    for start in range(0, steps, every):
        path = os.path.join(folder, "ckpt.pt")
        chunk = parts.train.train(gpt, data, tc, steps=min(every, steps - start), checkpoint_path=path,
                                  resume_from=path if start else None)
        losses += chunk
    seconds = time.perf_counter() - t0

    # held-out loss, in nats per token and per word (the source's entropy rate is per word)
    windows = source.random_windows(val_ids, 128, tc.block_size + 1, seed)
    with torch.no_grad():
        w = torch.as_tensor(windows)
        logits = gpt(w[:, :-1])
        val = float(parts.train.cross_entropy(logits, w[:, 1:]))
    val_words = val * len(val_ids) / len(held_out.split())
    curve = [(i + every, float(np.mean(losses[i : i + every])) * per_word) for i in range(0, steps, every)]
    log("training loss in nats per word (each row: the mean over its steps; the run is saved and resumed from a "
        "checkpoint between rows)")
    for line in _ascii_curve(curve, rate):
        log(line)
    log(f"\nheld-out: {val:.3f} nats per token = {val_words:.3f} nats per word; the source's entropy rate is {rate:.3f} "
        f"nats per word (gap {val_words - rate:+.3f}); trained in {seconds:.1f} s\n")

    prompts = ["the", "a big", "some small", "every", "two old"]
    encoded = [tok.encode(p) for p in prompts]
    samples, sentences = [], []
    gen = torch.Generator().manual_seed(seed)
    for prompt, prompt_ids in zip(prompts, encoded):
        new = 40
        cache = make_cache(gpt, 1, len(prompt_ids) + new)
        out = parts.sample.generate(gpt, torch.tensor([prompt_ids]), new, temperature=0.8, top_k=50, top_p=0.95,
                                    cache=cache, generator=gen)
        textual = tok.decode(out[0].tolist())
        samples.append(textual)
        for piece in textual.replace("\n", " ").split(" .")[:-1]:
            sentences.append(piece.split() + ["."])
    log("samples (temperature 0.8, top-k 50, top-p 0.95, with the cache):")
    for s in samples:
        log("  " + s.replace("\n", " / "))
    ok = sum(grammatical(s) for s in sentences)
    log(f"\n{ok} of {len(sentences)} complete sampled sentences are grammatical (number agreement included)")
    log(f"done in {time.perf_counter() - started:.0f} s")
    return dict(val_per_word=val_words, rate=rate, grammatical=ok / max(1, len(sentences)), samples=samples,
                losses=losses, per_word=per_word)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The course's capstone: tokenizer, model, loop and cache, end to end.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run(args.steps, args.seed)


if __name__ == "__main__":
    main()
