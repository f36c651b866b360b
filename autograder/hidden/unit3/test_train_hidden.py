"""Hidden tests, Parts A and D: pre-token counts and special-token splits against the regex itself,
train_bpe against a plain (slow, obviously correct) trainer on secret corpora and on crafted corpora
where counts tie or pairs overlap, and the fast trainer's speed against that plain trainer."""

import time
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autograder.checks import check
from autograder.client import Proxy

EOT = "<|endoftext|>"
GPT2_RE = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
TIE_BREAK = "among pairs of equal count the lexicographically greatest pair wins: max by (count, (left, right))"


# --- the trusted reference: plain, slow, obviously correct ----------------------------------------

def ref_split(text: str, specials: list[str]) -> list[str]:
    if not specials:
        return [text] if text else []
    pattern = "(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [p for p in regex.split(pattern, text) if p]


def ref_counts(text: str, specials: list[str]) -> dict[bytes, int]:
    counts = Counter()
    for piece in ref_split(text, specials):
        if piece not in specials:
            counts.update(GPT2_RE.findall(piece))
    return {k.encode(): v for k, v in counts.items()}


def ref_merge(word: tuple, pair: tuple, new: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def naive_train(text: str, vocab_size: int, specials: list[str]) -> list[tuple[bytes, bytes]]:
    """Recount every pair of every pre-token at every merge: the baseline the fast trainer must beat."""
    words = {tuple(bytes([b]) for b in w): c for w, c in ref_counts(text, specials).items()}
    merges = []
    for _ in range(vocab_size - 256 - len(specials)):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        words = {ref_merge(w, best, best[0] + best[1]): c for w, c in words.items()}
    return merges


def plain_dict(learner, value):
    return learner.lib("builtins").dict(value) if isinstance(value, Proxy) else value


def train(learner, text: str, vocab_size: int, specials: list[str]):
    path = learner.module("corpus").write_temp(text)
    return learner.module("bpe").train_bpe(path, vocab_size, specials)


def first_difference(got: list, expected: list) -> str:
    for k, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return f"merge {k} is {a!r}, expected {b!r} (the {k} before agree)"
    return f"you returned {len(got)} merges, expected {len(expected)}"


def check_merges(got, expected, what: str, hint: str = "") -> None:
    check(list(got) == expected, f"train_bpe on {what}: {first_difference(list(got), expected)}" + (f"\nHint: {hint}" if hint else ""))


# --- A. pre-tokens and special tokens ---------------------------------------------------------------

@pytest.mark.group("pretokenize")
def test_count_pretokens_on_secret_corpus(learner, seed):
    text = learner.module("corpus").generate(20_000, seed)
    got = plain_dict(learner, learner.module("bpe").count_pretokens(text, [EOT]))
    want = ref_counts(text, [EOT])
    check(isinstance(got, dict), f"count_pretokens returned {type(got).__name__}; return a plain dict")
    wrong = [k for k in set(got) | set(want) if got.get(k) != want.get(k)][:5]
    check(not wrong, "count_pretokens differs from the GPT-2 regex counts on a generated corpus, e.g. "
          + ", ".join(f"{k!r}: got {got.get(k)}, expected {want.get(k)}" for k in wrong)
          + "\nHint: pre-tokens are regex.findall(GPT2_PATTERN, piece) for each piece between special tokens, as UTF-8 bytes")


SPECIAL_SETS = [[EOT], ["<|a|>", "<|a|><|a|>"], ["<s>", "</s>", "<pad>"], ["<|a|>", "<|a|><|a|>", "a|><"]]


@pytest.mark.group("pretokenize")
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_split_on_special_longest_first(learner, data):
    specials = data.draw(st.sampled_from(SPECIAL_SETS))
    parts = data.draw(st.lists(st.sampled_from(specials + ["<", "|", "a", "s>", " x", "\n", "é", "<|", "|>"]), max_size=14))
    text = "".join(parts)
    got = learner.module("bpe").split_on_special(text, specials)
    want = ref_split(text, specials)
    check(got == want, f"split_on_special({text!r}, {specials!r}) gave {got!r}, expected {want!r}"
          + ("\nHint: where special tokens overlap, the longest wins: try them longest first"
             if "<|a|><|a|>" in text and len(specials) > 1 else ""))


# --- A. training ----------------------------------------------------------------------------------

@pytest.mark.group("train")
@pytest.mark.parametrize("size,n_merges", [(6_000, 60), (12_000, 120)])
def test_merges_match_reference_on_secret_corpus(learner, seed, size, n_merges):
    text = learner.module("corpus").generate(size, seed)
    vocab_size = 256 + 1 + n_merges
    vocab, merges = train(learner, text, vocab_size, [EOT])
    check_merges(merges, naive_train(text, vocab_size, [EOT]), f"a generated {size // 1000} KB corpus",
                 hint="count pre-tokens between special tokens, never merge across them; " + TIE_BREAK)
    check(len(vocab) == vocab_size and vocab[256] == EOT.encode(), "vocab: 256 bytes, then <|endoftext|>, then merges")


@pytest.mark.group("train")
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(words=st.lists(st.text(alphabet="abc", min_size=1, max_size=7), min_size=1, max_size=25),
       seps=st.lists(st.sampled_from([" ", "  ", "\n", ", ", EOT]), min_size=1, max_size=5))
def test_ties_and_overlaps_match_reference(learner, words, seps):
    # Three letters: counts tie all the time and pairs overlap (aaa, abab).
    text = "".join(w + seps[k % len(seps)] for k, w in enumerate(words))
    _, merges = train(learner, text, 256 + 1 + 12, [EOT])
    check_merges(merges, naive_train(text, 256 + 1 + 12, [EOT]), f"the crafted corpus {text!r}", hint=TIE_BREAK)


@pytest.mark.group("train")
def test_overlapping_pairs_are_counted_and_updated(learner):
    # "aaaa" holds (a, a) three times; after merging it is (aa, aa): one (aa, aa) pair, no (a, a) left.
    text = "aaaa " * 7 + "aaa " * 5 + "abab " * 6 + "aab " * 3
    _, merges = train(learner, text, 256 + 8, [])
    check_merges(merges, naive_train(text, 256 + 8, []), repr(text),
                 hint="in a word like 'aaaa', every occurrence of a pair counts (3 x (a, a)); after a merge, subtract "
                      "all of the word's old pairs and add all of its new ones, and merge left to right (aaa -> aa, a)")


@pytest.mark.group("train")
def test_no_merge_across_pretokens(learner):
    text = "x.y x.y x.y\n" * 10 + " q!q!q!" * 5
    _, merges = train(learner, text, 256 + 10, [])
    check_merges(merges, naive_train(text, 256 + 10, []), repr(text),
                 hint="pre-tokenize with the GPT-2 regex first: 'x' and '.' are different pre-tokens and never merge")


@pytest.mark.group("train")
def test_several_special_tokens_in_vocab_and_text(learner):
    specials = ["<pad>", EOT, "<|a|><|a|>"]
    text = "".join(f"the cat{s}sat on the mat{s}" for s in specials * 8)
    vocab, merges = train(learner, text, 256 + 3 + 15, specials)
    check([vocab[256 + k] for k in range(3)] == [s.encode() for s in specials],
          "the special tokens take ids 256, 257, ... in the order given")
    check_merges(merges, naive_train(text, 256 + 3 + 15, specials), "text full of special tokens",
                 hint="special tokens are cut out before counting: no merge inside or across one")


@pytest.mark.group("train")
def test_stops_when_no_pair_is_left(learner):
    vocab, merges = train(learner, "ab ab", 300, [])
    check(merges == [(b"a", b"b"), (b" ", b"ab")] and len(vocab) == 258,
          f"on 'ab ab' with vocab_size 300 there are only two merges to make; got {list(merges)!r} and "
          f"{len(vocab)} vocab entries (stop when no pair is left)")


@pytest.mark.group("train")
def test_vocab_size_too_small_raises(learner):
    with pytest.raises(ValueError):
        train(learner, "abc", 256, [EOT])


# --- D. speed ---------------------------------------------------------------------------------------

@pytest.mark.group("speed")
def test_train_speed_against_naive_trainer(learner, seed):
    """The plain trainer (trusted side) and yours, on the same fresh corpus, timed in this run."""
    corpus = learner.module("corpus")
    text = corpus.generate(25_000, seed)
    path = corpus.write_temp(text)
    bpe = learner.module("bpe")
    start = time.perf_counter()
    expected = naive_train(text, 420, [EOT])
    naive = time.perf_counter() - start
    times = []
    with learner.time_limit(60):
        for _ in range(2):
            start = time.perf_counter()
            _, merges = bpe.train_bpe(path, 420, [EOT])
            times.append(time.perf_counter() - start)
    mine = min(times)
    check_merges(merges, expected, "the speed test's corpus")
    # The reference trainer is 10-20x faster than the plain one here; a trainer that recounts every
    # pair at every merge is about 1x. 4x sits far from both.
    check(mine * 4 <= naive, f"train_bpe took {mine:.3f} s; the plain trainer (recount every pair at every merge) "
          f"took {naive:.3f} s in the same run: only {naive / mine:.1f}x faster, 4x needed. Keep a pair-count table "
          "and a pair -> words index, and after each merge update only the words that contain the merged pair")
