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
    ### BEGIN SOLUTION
    if not special_tokens:
        return [text] if text else []
    longest_first = sorted(special_tokens, key=len, reverse=True)
    pattern = "(" + "|".join(regex.escape(token) for token in longest_first) + ")"
    return [piece for piece in regex.split(pattern, text) if piece]
    ### END SOLUTION


def count_pretokens(text: str, special_tokens: list[str]) -> dict[bytes, int]:
    """How often each pre-token occurs in ``text``, as UTF-8 bytes; special tokens are left out (they
    only separate text).  Returns a plain dict."""
    # TODO: for each piece of split_on_special that is not a special token: count PRETOKEN_RE.findall(piece);
    #       return {pretoken.encode("utf-8"): count}.
    ### BEGIN SOLUTION
    specials = set(special_tokens)
    counts: Counter[str] = Counter()
    for piece in split_on_special(text, special_tokens):
        if piece in specials:
            continue
        counts.update(PRETOKEN_RE.findall(piece))
    return {pretoken.encode("utf-8"): n for pretoken, n in counts.items()}
    ### END SOLUTION


def merge_word(word: tuple[bytes, ...], pair: Pair, new: bytes) -> tuple[bytes, ...]:
    """``word`` with every occurrence of ``pair`` replaced by ``new``, scanning left to right, so
    that overlapping occurrences merge once: (a, a, a) with pair (a, a) -> (aa, a)."""
    # TODO: walk i over word; where word[i], word[i + 1] == pair append new and skip 2, else append word[i].
    ### BEGIN SOLUTION
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    words = [tuple(bytes([b]) for b in pretoken) for pretoken in word_counts]
    freqs = list(word_counts.values())
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, _Greatest(pair)) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    while len(merges) < n_merges and heap:
        neg_count, key = heapq.heappop(heap)
        best, count = key.pair, pair_counts.get(key.pair, 0)
        if count != -neg_count:
            # Out of date: counts only ever fall for pairs already in the heap, so push it back
            # with its true count and look again.
            if count > 0:
                heapq.heappush(heap, (-count, key))
            continue
        merges.append(best)
        new = best[0] + best[1]
        fresh = set()
        for i in where.pop(best):
            old = words[i]
            merged = merge_word(old, best, new)
            if len(merged) == len(old):
                continue  # the index may be stale: this word lost the pair to an earlier merge
            freq = freqs[i]
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= freq
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += freq
                if new in pair:  # only pairs with the new token are new to this word
                    where[pair].add(i)
                    fresh.add(pair)
            words[i] = merged
        for pair in fresh:
            heapq.heappush(heap, (-pair_counts[pair], _Greatest(pair)))
    return merges
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    with open(input_path, encoding="utf-8") as f:
        text = f.read()
    vocab = {i: bytes([i]) for i in range(256)}
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    n_merges = vocab_size - len(vocab)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    merges = learn_merges(count_pretokens(text, special_tokens), n_merges)
    for left, right in merges:
        vocab[len(vocab)] = left + right
    return vocab, merges
    ### END SOLUTION


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
        ### BEGIN SOLUTION
        parts = tuple(bytes([b]) for b in pretoken)
        while len(parts) > 1:
            # A plain loop rather than min(key=lambda): encoding spends most of its time here.
            best, best_rank = None, math.inf
            for pair in zip(parts, parts[1:]):
                rank = self.ranks.get(pair, math.inf)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            parts = merge_word(parts, best, best[0] + best[1])
        return [self.id_of[part] for part in parts]
        ### END SOLUTION

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``: special tokens become their own id and are never split; the text
        between them is pre-tokenized with PRETOKEN_RE and each pre-token encoded on its own."""
        # TODO: for each piece of split_on_special(text, self.special_tokens): a special token -> its id;
        #       else for each pre-token in PRETOKEN_RE.findall(piece): extend by encode_pretoken(its UTF-8 bytes),
        #       remembered in self.cache (cleared when it holds CACHE_LIMIT pre-tokens).
        ### BEGIN SOLUTION
        ids: list[int] = []
        for piece in split_on_special(text, self.special_tokens):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
                continue
            for pretoken in PRETOKEN_RE.findall(piece):
                cached = self.cache.get(pretoken)
                if cached is None:
                    if len(self.cache) >= self.CACHE_LIMIT:
                        self.cache.clear()
                    cached = self.cache[pretoken] = self.encode_pretoken(pretoken.encode("utf-8"))
                ids.extend(cached)
        return ids
        ### END SOLUTION

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``: their bytes joined, decoded as UTF-8; bytes that are not valid UTF-8
        become U+FFFD (the replacement character) instead of raising."""
        # TODO: b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace").
        ### BEGIN SOLUTION
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")
        ### END SOLUTION

    def _stable_prefix(self, buffer: str) -> int:
        """Length of the longest prefix of ``buffer`` whose ids no text appended later can change."""
        # TODO: the handout's section 6, in order, from cut = len(buffer): (1) hold back the longest end of buffer
        #       that is a proper prefix of a special token (it may become one); (2) a cut strictly inside a whole
        #       special token of split_on_special(buffer) moves to that token's start; (3) unless buffer[:cut] is
        #       empty or ends with a special token, hold back the last two pre-tokens of its text after the last
        #       special token; (4) and the whitespace just before the cut. Return the cut.
        ### BEGIN SOLUTION
        hold = len(buffer)
        longest = max((len(token) for token in self.special_tokens), default=0)
        for k in range(min(longest - 1, len(buffer)), 0, -1):
            tail = buffer[-k:]
            if any(token.startswith(tail) and token != tail for token in self.special_tokens):
                hold = len(buffer) - k
                break
        position = 0
        for piece in split_on_special(buffer, self.special_tokens):
            if piece in self.special_ids and position < hold < position + len(piece):
                hold = position  # never cut through a whole special token ("<|a|>" + "<|a|>" may be one)
                break
            position += len(piece)
        head = buffer[:hold]
        pieces = split_on_special(head, self.special_tokens)
        if not pieces or pieces[-1] in self.special_ids:
            return hold  # head ends on a whole special token (or is empty): nothing to hold back
        # Hold back the last two pre-tokens of the text after the last special token: whether a
        # pre-token is final can depend on the two characters after it ("'l" + "l" is "'ll").
        piece = pieces[-1]
        starts = [match.start() for match in PRETOKEN_RE.finditer(piece)]
        cut = starts[-2] if len(starts) >= 2 else 0
        # ...and the whitespace just before the cut: a whitespace run splits by what follows it
        # ("\n\nA" -> "\n", "\n", "A", but "\n\n" alone is one pre-token).
        while cut > 0 and SPACE_RE.match(piece, cut - 1):
            cut -= 1
        return hold - len(piece) + cut
        ### END SOLUTION

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Yield the ids of the concatenation of ``iterable``'s strings (lines of an open file, or any
        chunks, cut anywhere) in memory bounded by the longest pre-token, not by the text: the
        same ids as ``encode("".join(iterable))``."""
        # TODO: keep a buffer; after each chunk, encode and yield buffer[:cut] with cut = _stable_prefix(buffer),
        #       keep buffer[cut:]. At the end, encode and yield what is left.
        ### BEGIN SOLUTION
        buffer = ""
        for chunk in iterable:
            buffer += chunk
            cut = self._stable_prefix(buffer)
            if cut > 0:
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
        if buffer:
            yield from self.encode(buffer)
        ### END SOLUTION

    def save(self, path: str) -> None:
        """Write vocab, merges and special tokens to ``path`` as JSON: bytes as hex strings,
        {"vocab": {"<id>": "<hex>"}, "merges": [["<hex>", "<hex>"], ...], "special_tokens": [...]}."""
        # TODO: json.dump the dict above (bytes.hex()) to path, UTF-8.
        ### BEGIN SOLUTION
        data = {
            "vocab": {str(i): token.hex() for i, token in self.vocab.items()},
            "merges": [[left.hex(), right.hex()] for left, right in self.merges],
            "special_tokens": self.special_tokens,
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        ### END SOLUTION

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """The tokenizer ``save`` wrote to ``path``."""
        # TODO: json.load, undo the hex strings (bytes.fromhex, int ids), return cls(vocab, merges, special_tokens).
        ### BEGIN SOLUTION
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        vocab = {int(i): bytes.fromhex(token) for i, token in data["vocab"].items()}
        merges = [(bytes.fromhex(left), bytes.fromhex(right)) for left, right in data["merges"]]
        return cls(vocab, merges, data["special_tokens"])
        ### END SOLUTION
