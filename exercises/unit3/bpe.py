"""Byte-level BPE, GPT-2 style: train merges on a corpus, then encode and decode with them.

Text is UTF-8 bytes, so every string can be encoded and the base vocabulary is the 256 single
bytes.  Training repeatedly merges the most frequent adjacent pair of tokens into a new token.
Two rules keep tokens sensible: text is first cut into *pre-tokens* by the GPT-2 regex (words with
their leading space, numbers, punctuation runs, whitespace runs), and no merge crosses a pre-token
boundary or a special token such as ``<|endoftext|>``.

Vocabulary layout (ids): 0..255 the single bytes (id = byte value), then the special tokens in the
order given, then one token per merge in the order learned.  Ties between pairs of equal count go to
the lexicographically greatest pair of byte strings: ``max(count, (left, right))``.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter, defaultdict
from typing import Iterable, Iterator

import regex

# The GPT-2 pre-tokenizer: contractions, letters, numbers, other symbols (each with an optional
# leading space), whitespace not followed by a non-space (so " word" keeps its space), whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)
SPACE_RE = regex.compile(r"\s")  # the \s of the pattern (str.isspace() differs on 4 control characters)

Pair = tuple[bytes, bytes]


# --- pieces shared by training and encoding --------------------------------------------------------

def split_on_special(text: str, special_tokens: list[str]) -> list[str]:
    """Cut ``text`` into pieces: each occurrence of a special token is a piece of its own, the text
    between them the other pieces (empty pieces dropped).  Where special tokens overlap, the longest
    one wins: with ``<|a|>`` and ``<|a|><|a|>`` both special, ``<|a|><|a|>`` is one piece."""
    # TODO: no special tokens -> [text] (or [] for ""); else regex.split on "(tok1|tok2|...)" (a capturing group
    #       keeps the tokens), alternatives sorted longest first and regex.escape'd; drop empty pieces.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in split_on_special in exercises/unit3/bpe.py")


def count_pretokens(text: str, special_tokens: list[str]) -> dict[bytes, int]:
    """How often each pre-token occurs in ``text``, as UTF-8 bytes; special tokens are left out (they
    only separate text).  Returns a plain dict."""
    # TODO: for each piece of split_on_special that is not a special token: count PRETOKEN_RE.findall(piece);
    #       return {pretoken.encode("utf-8"): count}.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in count_pretokens in exercises/unit3/bpe.py")


def merge_word(word: tuple[bytes, ...], pair: Pair, new: bytes) -> tuple[bytes, ...]:
    """``word`` with every occurrence of ``pair`` replaced by ``new``, scanning left to right, so
    that overlapping occurrences merge once: (a, a, a) with pair (a, a) -> (aa, a)."""
    # TODO: walk i over word; where word[i], word[i + 1] == pair append new and skip 2, else append word[i].
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in merge_word in exercises/unit3/bpe.py")


# --- training ------------------------------------------------------------------------------------

class _Greatest:
    """Heap key that puts the lexicographically greatest pair first (heapq is a min-heap)."""

    __slots__ = ("pair",)

    def __init__(self, pair: Pair):
        self.pair = pair

    def __lt__(self, other: "_Greatest") -> bool:
        return self.pair > other.pair


def learn_merges(word_counts: dict[bytes, int], n_merges: int) -> list[Pair]:
    """Up to ``n_merges`` merges, most frequent pair first (ties: the greatest pair), learned from
    pre-token counts.  Stops early when no pair is left."""
    # TODO: the fast trainer. words[i] = tuple of single bytes, freqs[i] its count;
    #       pair_counts[p] = sum of freqs over occurrences of p; where[p] = {i: word i contains p}.
    #       Each step: best = the pair of largest (count, pair); for each word i in where[best]:
    #       subtract the counts of its old pairs, merge_word, add the counts (and where) of its new pairs.
    #       A heap of (-count, _Greatest(pair)) finds best fast; an entry whose count is out of date is pushed
    #       back with the true count.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in learn_merges in exercises/unit3/bpe.py")


def train_bpe(input_path: str, vocab_size: int, special_tokens: list[str]) -> tuple[dict[int, bytes], list[Pair]]:
    """Train a byte-level BPE tokenizer on the UTF-8 text file ``input_path``.

    Returns ``(vocab, merges)``: ``vocab`` maps id -> token bytes (256 bytes, then the special
    tokens, then one token per merge, ``vocab_size`` ids at most); ``merges`` lists the merged
    pairs in the order learned.  Raises ValueError if ``vocab_size`` cannot hold the 256 bytes and
    the special tokens.
    """
    # TODO: read the file; vocab = {i: bytes([i])} for i < 256, then the special tokens' UTF-8 bytes;
    #       n_merges = vocab_size - len(vocab) (ValueError if < 0); merges = learn_merges(count_pretokens(...));
    #       each merge (a, b) adds a + b to vocab under the next id.
    # YOUR CODE HERE
    raise NotImplementedError("TODO: fill in train_bpe in exercises/unit3/bpe.py")


# --- encoding and decoding -----------------------------------------------------------------------

class Tokenizer:
    """Encodes text to ids and back with a trained vocabulary and merges."""

    CACHE_LIMIT = 10_000  # pre-tokens remembered by encode(); bounded so that streaming stays flat

    def __init__(self, vocab: dict[int, bytes], merges: list[Pair], special_tokens: list[str] | None = None):
        self.vocab = dict(vocab)
        self.merges = [tuple(pair) for pair in merges]
        self.special_tokens = list(special_tokens or [])
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}  # lower rank: merged first
        self.id_of = {token: i for i, token in sorted(self.vocab.items(), reverse=True)}  # bytes -> lowest id
        self.special_ids = {}
        for token in self.special_tokens:
            encoded = token.encode("utf-8")
            ids = [i for i, t in self.vocab.items() if t == encoded]
            if not ids:  # a special token the vocabulary lacks gets the next free id
                ids = [max(self.vocab, default=-1) + 1]
                self.vocab[ids[0]] = encoded
            self.special_ids[token] = min(ids)
        self.cache: dict[str, list[int]] = {}

    def encode_pretoken(self, pretoken: bytes) -> list[int]:
        """Ids of one pre-token: start from single bytes and, while any adjacent pair is a merge,
        merge the pair of lowest rank (earliest learned) everywhere in the pre-token."""
        # TODO: parts = single bytes; loop: best = the adjacent pair of lowest rank in self.ranks (a pair not in
        #       it never merges); stop if there is none; parts = merge_word(parts, best, best[0] + best[1]).
        #       Return the ids of the parts (self.id_of).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Tokenizer.encode_pretoken in exercises/unit3/bpe.py")

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``: special tokens become their own id and are never split; the text
        between them is pre-tokenized with PRETOKEN_RE and each pre-token encoded on its own."""
        # TODO: for each piece of split_on_special(text, self.special_tokens): a special token -> its id;
        #       else for each pre-token in PRETOKEN_RE.findall(piece): extend by encode_pretoken(its UTF-8 bytes),
        #       remembered in self.cache (cleared when it holds CACHE_LIMIT pre-tokens).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Tokenizer.encode in exercises/unit3/bpe.py")

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``: their bytes joined, decoded as UTF-8; bytes that are not valid UTF-8
        become U+FFFD (the replacement character) instead of raising."""
        # TODO: b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace").
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Tokenizer.decode in exercises/unit3/bpe.py")

    def _stable_prefix(self, buffer: str) -> int:
        """Length of the longest prefix of ``buffer`` whose ids no text appended later can change."""
        # TODO: the handout's section 6, in order, from cut = len(buffer): (1) hold back the longest end of buffer
        #       that is a proper prefix of a special token (it may become one); (2) a cut strictly inside a whole
        #       special token of split_on_special(buffer) moves to that token's start; (3) unless buffer[:cut] is
        #       empty or ends with a special token, hold back the last two pre-tokens of its text after the last
        #       special token; (4) and the whitespace just before the cut. Return the cut.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Tokenizer._stable_prefix in exercises/unit3/bpe.py")

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Yield the ids of the concatenation of ``iterable``'s strings (lines of an open file, or any
        chunks, cut anywhere) in memory bounded by the longest pre-token, not by the text: the
        same ids as ``encode("".join(iterable))``."""
        # TODO: keep a buffer; after each chunk, encode and yield buffer[:cut] with cut = _stable_prefix(buffer),
        #       keep buffer[cut:]. At the end, encode and yield what is left.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Tokenizer.encode_iterable in exercises/unit3/bpe.py")

    def save(self, path: str) -> None:
        """Write vocab, merges and special tokens to ``path`` as JSON: bytes as hex strings,
        {"vocab": {"<id>": "<hex>"}, "merges": [["<hex>", "<hex>"], ...], "special_tokens": [...]}."""
        # TODO: json.dump the dict above (bytes.hex()) to path, UTF-8.
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Tokenizer.save in exercises/unit3/bpe.py")

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """The tokenizer ``save`` wrote to ``path``."""
        # TODO: json.load, undo the hex strings (bytes.fromhex, int ids), return cls(vocab, merges, special_tokens).
        # YOUR CODE HERE
        raise NotImplementedError("TODO: fill in Tokenizer.load in exercises/unit3/bpe.py")
