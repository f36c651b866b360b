"""Unit 3 figures: BPE training, encoding and streaming, each beside a baseline timed in the same run.

    python -m benchmarks.unit3                  # reference solution: vocab 500 on 130 KB, encode 2 MB, stream 1 vs 4 MB
    python -m benchmarks.unit3 --big            # also vocab 10,000 on 5 MB, stream 1 vs 20 MB
    python -m benchmarks.unit3 --impl exercises # your code instead of the reference

Baselines: the naive trainer (recount every pair at every merge), HF tokenizers (Rust) trained on the
same corpus, tiktoken (Rust) built from the same merges.  Figures are medians; ratios compare numbers
measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import tempfile
import time
from collections import Counter

import regex

EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def naive_train(path: str, vocab_size: int, specials: list[str]):
    text = open(path, encoding="utf-8").read()
    pattern = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    counts = Counter()
    for piece in regex.split(pattern, text):
        counts.update(regex.findall(GPT2_PATTERN, piece))
    words = {tuple(bytes([b]) for b in w.encode()): c for w, c in counts.items()}
    merges = []
    for _ in range(vocab_size - 256 - len(specials)):
        pairs = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new, out = best[0] + best[1], {}
        for word, c in words.items():
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            out[tuple(merged)] = c
        words = out
    return merges


def hf_tokenizer(path: str, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([path], trainer)
    return tok


def tiktoken_for(vocab: dict[int, bytes], specials: list[str]):
    import tiktoken

    special_ids = {s: i for i, t in vocab.items() for s in specials if t == s.encode()}
    ranks = {}
    for i, token in sorted(vocab.items()):
        if i not in special_ids.values():
            ranks.setdefault(token, i)
    return tiktoken.Encoding(name="bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)


def row(*cells) -> None:
    print("  ".join(f"{c:<26}" if k == 0 else f"{c:>14}" for k, c in enumerate(cells)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="solutions", choices=("solutions", "exercises"))
    parser.add_argument("--big", action="store_true", help="vocab 10,000 on 5 MB; stream 1 MB vs 20 MB")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive trainer (about 10 s)")
    args = parser.parse_args()
    bpe = importlib.import_module(f"{args.impl}.unit3.bpe")
    corpus = importlib.import_module(f"{args.impl}.unit3.corpus")
    tmp = tempfile.mkdtemp(prefix="bench-unit3-")

    def corpus_file(n_bytes: int, seed: int) -> str:
        path = os.path.join(tmp, f"corpus-{n_bytes}-{seed}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(corpus.generate(n_bytes, seed))
        return path

    print(f"Unit 3 benchmark ({args.impl}); one thread unless stated; {os.cpu_count()} CPUs visible\n")
    print("Training (median of 3; naive: 1 run)")
    row("corpus, vocab", "yours s", "HF tokenizers s", "naive s", "naive/yours")
    configs = [(130_000, 500)] + ([(5_000_000, 10_000)] if args.big else [])
    trained = {}
    for n_bytes, vocab_size in configs:
        path = corpus_file(n_bytes, 1)
        repeats = 3 if n_bytes < 1_000_000 else 1
        mine, (vocab, merges) = median_time(lambda: bpe.train_bpe(path, vocab_size, [EOT]), repeats)
        hf_s, hf = median_time(lambda: hf_tokenizer(path, vocab_size), repeats)
        naive = "-"
        if n_bytes < 1_000_000 and not args.no_naive:
            naive_s, naive_merges = median_time(lambda: naive_train(path, vocab_size, [EOT]), 1)
            assert naive_merges == merges, "the implementation's merges differ from the naive trainer's"
            naive = f"{naive_s:.2f}"
        ratio = f"{float(naive) / mine:.1f}x" if naive != "-" else "-"
        row(f"{n_bytes / 1e6:.2f} MB, {vocab_size}", f"{mine:.3f}", f"{hf_s:.3f}", naive, ratio)
        trained[vocab_size] = (vocab, merges, hf)

    vocab_size = max(trained)
    vocab, merges, hf = trained[vocab_size]
    tok = bpe.Tokenizer(vocab, merges, [EOT])
    oracle = tiktoken_for(vocab, [EOT])
    text = corpus.generate(2_000_000, 2)
    mb = len(text.encode()) / 1e6
    print(f"\nEncoding {mb:.1f} MB of held-out text, vocab {vocab_size} (median of 3, cache cleared each run)")
    row("encoder", "MB/s", "bytes/token")

    def mine_encode():
        tok.cache.clear()
        return tok.encode(text)

    s, ids = median_time(mine_encode, 3)
    row("yours", f"{mb / s:.2f}", f"{mb * 1e6 / len(ids):.2f}")
    s, ids_tt = median_time(lambda: oracle.encode(text, allowed_special="all"), 3)
    row("tiktoken, same merges", f"{mb / s:.2f}", f"{mb * 1e6 / len(ids_tt):.2f}")
    print(f"{'':26}  identical ids: {ids == ids_tt}")
    s, enc = median_time(lambda: hf.encode(text), 3)
    row("HF tokenizers, own merges", f"{mb / s:.2f}", f"{mb * 1e6 / len(enc.ids):.2f}")

    sizes = (1_000_000, 20_000_000 if args.big else 4_000_000)
    print("\nencode_iterable over a file, peak Python memory (tracemalloc)")
    row("file", "peak MB", "ids", "seconds")
    for n_bytes in sizes:
        path = corpus_file(n_bytes, 3)
        start = time.perf_counter()
        count, peak = corpus.stream_file(tok.encode_iterable, path)
        row(f"{n_bytes / 1e6:.0f} MB", f"{peak / 1e6:.2f}", f"{count}", f"{time.perf_counter() - start:.1f}")
        os.remove(path)
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
