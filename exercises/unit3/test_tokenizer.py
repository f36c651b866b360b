"""Visible tests for Parts B and C (encode, decode, save/load, encode_iterable).
Run: pytest exercises/unit3/test_tokenizer.py

The expected ids come from tiktoken built from the same merges, on the tests' side; texts come
from the course's copy of corpus.py; the laziness test feeds your encode_iterable a pipe that the
test writes and keeps open."""

import pytest
import regex
import tiktoken

from autograder.checks import check

EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Merges a trainer learned on a few sentences about cats and hats (each joins two tokens that exist by then).
MERGES = [(b"a", b"t"), (b"h", b"e"), (b"t", b"he"), (b" ", b"the"), (b"0", b"0"), (b" ", b"c"), (b"h", b"at"),
          (b" c", b"at"), (b" ", b"i"), (b" ", b"hat"), (b"s", b"at"), (b"o", b"n"), (b"T", b"he"), (b"00", b"0"),
          (b" i", b"n"), (b" ", b"sat"), (b" ", b"on"), (b" ", b"The"), (b"\xc3", b"\xa9"), (b"f", b"\xc3\xa9"),
          (b"a", b"f\xc3\xa9"), (b"\n", b"\n"), (b"m", b"at"), (b" i", b"s"), (b"l", b"l"), (b"'", b"ll")]


def make_vocab(merges, specials):
    vocab = {i: bytes([i]) for i in range(256)}
    for token in specials:
        vocab[len(vocab)] = token.encode()
    for left, right in merges:
        vocab[len(vocab)] = left + right
    return vocab


def oracle(merges, specials):
    """tiktoken built from the same merges: rank = id, so merge order decides."""
    vocab = make_vocab(merges, specials)
    special_ids = {token: 256 + k for k, token in enumerate(specials)}
    ranks = {token: i for i, token in vocab.items() if i not in special_ids.values()}
    return tiktoken.Encoding(name="unit3-oracle", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)


def tokenizer(learner, merges=MERGES, specials=(EOT,)):
    return learner.module("bpe").Tokenizer(make_vocab(merges, list(specials)), merges, list(specials))


def expected_ids(text, merges=MERGES, specials=(EOT,)):
    """The oracle's ids with special tokens matched longest first (tiktoken's own special-token match
    has no defined order where one special token begins another)."""
    encoding, ids = oracle(merges, list(specials)), []
    special_ids = {token: 256 + k for k, token in enumerate(specials)}
    pieces = regex.split("(" + "|".join(map(regex.escape, sorted(specials, key=len, reverse=True))) + ")", text) if specials else [text]
    for piece in pieces:
        ids += [special_ids[piece]] if piece in special_ids else encoding.encode_ordinary(piece)
    return ids


def first_position(got: str, want: str) -> int:
    """The first character where two strings differ."""
    return next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def shortest_failing(text: str, fails, budget: int = 400) -> str:
    """A short piece of ``text`` on which ``fails`` still holds: drop ever smaller slices while it
    keeps failing (delta debugging), at most ``budget`` tries."""
    parts = 2
    while len(text) > 1 and budget > 0:
        size = max(1, len(text) // parts)
        for start in range(0, len(text), size):
            budget -= 1
            smaller = text[:start] + text[start + size:]
            if smaller and fails(smaller):
                text, parts = smaller, max(parts - 1, 2)
                break
            if budget <= 0:
                break
        else:
            if size == 1:
                break
            parts = min(2 * parts, len(text))
    return text


TEXT = f"The cat in the hat sat on the mat.\n\nThe café at 1000 Main St  is open!{EOT}the end  \n"


@pytest.mark.group("encode")
def test_encode_matches_tiktoken(learner):
    ids = tokenizer(learner).encode(TEXT)
    expected = oracle(MERGES, [EOT]).encode(TEXT, allowed_special="all")
    check(ids == expected, f"encode({TEXT!r}):\n got      {ids}\n expected {expected}")


@pytest.mark.group("encode")
def test_merges_apply_by_rank_not_position(learner):
    merges = [(b"b", b"c"), (b"a", b"b")]
    ids = tokenizer(learner, merges, []).encode("ababc")
    expected = oracle(merges, []).encode("ababc")  # a, b, a, bc -> ab, a, bc
    check(ids == expected, f"encode('ababc') with merges [(b, c), (a, b)] gave {ids}, expected {expected}: apply the "
          "merge of lowest rank (learned first) wherever it occurs, then the next; not left to right, not by count")


@pytest.mark.group("encode")
def test_special_tokens_are_never_split(learner):
    tok = tokenizer(learner)
    ids = tok.encode(f"{EOT}{EOT}x{EOT}")
    check(ids == [256, 256, ord("x"), 256], f"encode('<|endoftext|><|endoftext|>x<|endoftext|>') gave {ids}; "
          "each special token is one id (256), never split or merged with its neighbours")


@pytest.mark.group("encode")
def test_overlapping_special_tokens_by_hand(learner):
    specials = [EOT, "<|a|>", "<|a|><|a|>"]
    text = "x<|a|><|a|><|a|>y"
    ids = tokenizer(learner, specials=specials).encode(text)
    expected = expected_ids(text, specials=specials)  # x, <|a|><|a|>, <|a|>, y
    check(ids == expected, f"encode({text!r}) with special tokens {specials} gave {ids}, expected {expected}"
          "\nHint: match special tokens longest first: '<|a|><|a|>' is one token, never '<|a|>' twice")


@pytest.mark.group("decode")
def test_decode_round_trip(learner):
    tok = tokenizer(learner)
    text = learner.course("corpus").generate(3000, 1)
    back = tok.decode(tok.encode(text))
    if back == text:
        return

    def fails(piece):
        try:
            return tok.decode(tok.encode(piece)) != piece
        except Exception:
            return True

    k, short = first_position(back, text), shortest_failing(text, fails)
    try:
        short_back = repr(tok.decode(tok.encode(short)))
    except Exception as error:
        short_back = f"an error ({type(error).__name__})"
    check(False, f"decode(encode(text)) != text for text = corpus.generate(3000, 1): they differ first at character "
          f"{k}: got {back[max(0, k - 10):k + 10]!r}, expected {text[max(0, k - 10):k + 10]!r}. The shortest failing "
          f"piece of that text found: {short!r} (decode(encode(it)) gave {short_back})")


@pytest.mark.group("decode")
def test_decode_invalid_utf8_gives_replacement_character(learner):
    tok = tokenizer(learner)
    got = tok.decode([0xC3, ord("x"), 0xFF])
    check(got == "\ufffdx\ufffd", f"decode([0xC3, 'x', 0xFF]) gave {got!r}; bytes that are not valid UTF-8 "
          "decode to U+FFFD: .decode('utf-8', errors='replace')")


@pytest.mark.group("decode")
def test_save_and_load(learner):
    tok = tokenizer(learner)
    path = learner.lib("tempfile").mkdtemp() + "/tokenizer.json"  # a folder your code may write to
    tok.save(path)
    loaded = learner.module("bpe").Tokenizer.load(path)
    expected = oracle(MERGES, [EOT]).encode(TEXT, allowed_special="all")
    check(loaded.encode(TEXT) == expected, "Tokenizer.load(path) after save(path) encodes differently from the "
          "saved tokenizer's merges")
    check(loaded.vocab == make_vocab(MERGES, [EOT]), "the loaded vocab differs from the saved one")


# Chunks cut where each step of the handout's section 6 matters, each with the hint of its step.
STREAM_CASES = {
    "3_character_chunks": ([TEXT[i : i + 3] for i in range(0, len(TEXT), 3)], [EOT],  # through words, spaces, <|endoftext|>
                           "a chunk boundary is not a pre-token boundary; hold back the end of the buffer until more "
                           "text comes"),
    "contraction": (["we'l", "l go"], [EOT],
                    "hold back the last two pre-tokens, not one: whether a pre-token is final can depend on the two "
                    "characters after it (\"'l\" + \"l\" is the contraction \"'ll\")"),
    "whitespace_run": (["x\n\nA b", "c"], [EOT],
                       "move the cut left past the whitespace before the pre-tokens you hold back: \"\\n\\n\" alone is "
                       "one pre-token, but \"\\n\\nA\" gives \"\\n\", \"\\n\", \"A\""),
    "special_token_cut": (["the end.<|endoftext|", "> the"], [EOT],
                          "hold back an end of the buffer that may still become a special token (\"...<|endof\" + "
                          "\"text|>\")"),
    "special_token_inside_a_longer_one": (["<|a|><|a|>"], [EOT, "<|a|>", "<|a|><|a|>"],
                                          "never cut inside a whole special token of the buffer: the end \"<|a|>\" of "
                                          "\"<|a|><|a|>\" is also the beginning of the longer token; move the cut to "
                                          "the start of the whole token"),
    "whitespace_after_a_special_token": (["the end.<|endoftext|>\n", "Next"], [EOT],
                                         "moving the cut left past whitespace stops at the start of the text after the "
                                         "last special token; never move it into that token"),
    "empty_chunks": (["", "the", "", " cat", ""], [EOT],
                     "an empty chunk is not the end of the input: read until the iterable is exhausted"),
}


@pytest.mark.group("stream")
@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_encode_iterable_equals_encode(learner, case):
    chunks, specials, hint = STREAM_CASES[case]
    tok = tokenizer(learner, specials=specials)
    got = list(tok.encode_iterable(chunks))
    expected = expected_ids("".join(chunks), specials=specials)
    if got != expected and tok.encode("".join(chunks)) != expected:
        hint = "encode(the whole text) is wrong too: fix encode first (test_encode_* tell how)"
    shown = f"{len(chunks)} chunks of 3 characters of TEXT" if case == "3_character_chunks" else repr(chunks)
    check(got == expected, f"encode_iterable({shown}) with special tokens {specials}:\n got      {got}\n expected "
          f"{expected}\n(the ids of the whole text)\nHint: {hint}")


@pytest.mark.group("stream")
def test_encode_iterable_is_lazy(learner):
    """The text arrives through a pipe that stays open for 5 s: a lazy encode_iterable gives its
    first ids long before the input ends."""
    tok = tokenizer(learner)
    text = "".join(f"the cat number {i} sat on the hat\n" for i in range(200))
    expected = oracle(MERGES, [EOT]).encode(text, allowed_special="all")
    with learner.put_stream(text, hold_seconds=5) as stream:
        f = learner.lib("builtins").open(stream.path, encoding="utf-8")
        gen = tok.encode_iterable(f)
        returned_early = not stream.ended
        ids = [gen.send(None) for _ in range(5)] if returned_early else []  # send(None) is next() for a generator
        ended = stream.ended
    check(returned_early and not ended, "encode_iterable(an open file) gave its first ids only once the input had "
          "ended: it must be a generator that yields ids as it reads (bounded memory), not one that reads "
          "everything first")
    check(ids == expected[:5], f"the first 5 ids of encode_iterable(an open file) are {ids}, expected {expected[:5]}")
