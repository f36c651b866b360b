"""Hidden tests, Parts B and C: encode against tiktoken built from the same merges (merges learned by
HF tokenizers on a secret corpus, so they are independent of yours), round trips of arbitrary Unicode,
decode of invalid UTF-8, save/load, and encode_iterable against encode of the whole text for chunks
cut anywhere, laziness, and peak memory over a large file.

Every corpus is generated here, by the course's own copy of corpus.py (``learner.course``); files
and streams are written here (``learner.put_file``, ``learner.put_stream``); the oracle (tiktoken)
runs here.  Laziness is seen from here (ids arrive while the input has not ended), and memory is
measured from outside the worker (``learner.measure_harness``, in a fresh worker)."""

import itertools
import json
import string

import numpy as np
import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autograder.checks import check
from autograder.testing import todo_first

EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
FEW = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

# Text drawn from this alphabet exercises every branch of the pattern and multi-byte UTF-8.
PIECES = ["the", " cat", "'s", "'ll", "'", " ", "  ", "\n", "\n\n", "\t", "1", "2024", " 3.5", "!", "?!", "...", "é",
          "café", " naïve", "日本", "語", "🙂", "👨‍👩‍👧", "🇫🇷", "Ωμέγα", "привет", "x", "aaaa", " ab", "<", "|", ">", "<|", EOT]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which HF's ByteLevel uses to spell merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def hf_merges(text: str, vocab_size: int) -> list[tuple[bytes, bytes]]:
    """Merges HF tokenizers learns on ``text`` (its tie-break differs from ours; any valid list will do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    back = {c: b for b, c in bytes_to_unicode().items()}
    merges, seen = [], set()
    for merge in json.loads(tok.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        pair = (bytes(back[c] for c in left), bytes(back[c] for c in right))
        if pair[0] + pair[1] in seen:
            break  # keep merged tokens unique, so that tiktoken (ranked by token bytes) is an exact oracle
        seen.add(pair[0] + pair[1])
        merges.append(pair)
    return merges


class Oracle:
    """Trusted encoder: special tokens longest first, then tiktoken on the text between them."""

    def __init__(self, merges, specials):
        self.merges, self.specials = merges, list(specials)
        self.vocab = {i: bytes([i]) for i in range(256)}
        for token in self.specials:
            self.vocab[len(self.vocab)] = token.encode()
        for left, right in merges:
            self.vocab[len(self.vocab)] = left + right
        self.special_ids = {token: 256 + k for k, token in enumerate(self.specials)}
        ranks = {t: i for i, t in self.vocab.items() if not 256 <= i < 256 + len(self.specials)}
        self.tiktoken = tiktoken.Encoding(name="unit3-oracle", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})

    def encode(self, text: str) -> list[int]:
        ids = []
        if not self.specials:
            return self.tiktoken.encode_ordinary(text)
        pattern = "(" + "|".join(regex.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")"
        for piece in regex.split(pattern, text):
            ids.extend([self.special_ids[piece]] if piece in self.special_ids else self.tiktoken.encode_ordinary(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def learner_tokenizer(self, learner):
        return learner.module("bpe").Tokenizer(self.vocab, self.merges, self.specials)


_ORACLES: dict = {}


def trained(learner, seed: int, specials=(EOT,)):
    """(oracle, your Tokenizer) for merges HF learned on a secret corpus (cached per seed)."""
    key = (seed, tuple(specials))
    if key not in _ORACLES:
        text = learner.course("corpus").generate(60_000, seed)
        _ORACLES[key] = Oracle(hf_merges(text, 800), specials)
    oracle = _ORACLES[key]
    return oracle, oracle.learner_tokenizer(learner)


def first_difference(got, want, tok_decode) -> str:
    """Where two id lists part: the first id that differs, what both mean, and the text around it."""
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return (f"id {k} is {a} ({tok_decode([a])!r}), expected {b} ({tok_decode([b])!r}), in the text "
                    f"{tok_decode(want[max(0, k - 4):k + 4])!r} (the {k} ids before agree)")
    if len(got) > len(want):
        return f"{len(got)} ids, expected {len(want)}: the extra ids from {len(want)} on decode to {tok_decode(got[len(want):][:8])!r}"
    return (f"{len(got)} ids, expected {len(want)}: the ids from {len(got)} on are missing (they decode to "
            f"{tok_decode(want[len(got):][:8])!r})")


def round_trip(tok, text: str):
    """decode(encode(text)) on the learner's side; an error stands for itself."""
    try:
        return tok.decode(tok.encode(text))
    except Exception as error:
        return f"<{type(error).__name__}>"


def shortest_failing(text: str, fails, budget: int = 300) -> str:
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


def first_position(got: str, want: str) -> str:
    """The first character where two strings differ, and both around it."""
    k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"they differ first at character {k}: got {got[max(0, k - 8):k + 8]!r}, expected "
            f"{want[max(0, k - 8):k + 8]!r} (lengths {len(got)} and {len(want)})")


def digest(ids) -> int:
    """The digest harness.drain computes on the learner's side, d = (d * 1_000_003 + id + 1) mod 2**61
    over the ids in order, here for the oracle's ids and all at once: the sum of
    (id_k + 1) * 1_000_003**(n - 1 - k), in uint64 arithmetic (it wraps mod 2**64, a multiple of 2**61)."""
    x = np.asarray(ids, dtype=np.uint64) + np.uint64(1)
    powers = np.full(len(x), 1_000_003, dtype=np.uint64)
    powers[:1] = 1
    powers = np.cumprod(powers)  # 1_000_003**k mod 2**64
    return int((x * powers[::-1]).sum(dtype=np.uint64)) & ((1 << 61) - 1)


def check_ids(got, want, oracle, call: str, hint: str = "") -> None:
    if isinstance(got, list) and got == want:
        return
    if not isinstance(got, list):
        check(False, f"{call} returned {type(got).__name__}; expected a list of ints")
    check(False, f"{call}: {first_difference(got, want, oracle.decode)}" + (f"\nHint: {hint}" if hint else ""))


# --- B. encode ----------------------------------------------------------------------------------

@pytest.mark.group("encode")
def test_encode_matches_tiktoken_on_secret_corpus(learner, seed):
    oracle, tok = trained(learner, seed)
    text = learner.course("corpus").generate(40_000, seed + 1)
    check_ids(tok.encode(text), oracle.encode(text), oracle, f"encode(corpus.generate(40_000, seed={seed + 1}))",
              hint="pre-tokenize with the GPT-2 regex; inside a pre-token merge the pair of lowest rank first")


@pytest.mark.group("encode")
@FEW
@given(parts=st.lists(st.sampled_from(PIECES), max_size=30))
def test_encode_matches_tiktoken_on_varied_text(learner, seed, parts):
    oracle, tok = trained(learner, seed)
    text = "".join(parts)
    check_ids(tok.encode(text), oracle.encode(text), oracle, f"encode({text!r})")


@pytest.mark.group("encode")
@pytest.mark.parametrize("merges,text", [
    ([(b"b", b"c"), (b"a", b"b")], "ababc"),
    ([(b"c", b"d"), (b"b", b"cd"), (b"a", b"b"), (b"a", b"bcd")], "abcdabababcd"),
    ([(b"3", b"4"), (b"1", b"2"), (b"2", b"3"), (b"12", b"34")], "1234121212 23232323"),
])
def test_merges_by_rank_not_frequency_or_position(learner, merges, text):
    oracle = Oracle(merges, [])
    got = oracle.learner_tokenizer(learner).encode(text)
    check_ids(got, oracle.encode(text), oracle, f"encode({text!r}) with merges {merges}",
              hint="the merge applied next is the one of lowest rank (learned earliest) among the pairs present, "
                   "whatever its count in the word and wherever it sits")


@pytest.mark.group("encode")
def test_overlapping_special_tokens_longest_first(learner, seed):
    specials = ["<|a|>", "<|a|><|a|>", EOT]
    oracle, tok = trained(learner, seed, specials)
    text = f"x<|a|><|a|><|a|>y {EOT}{EOT}<|a|>z<|a|<|a|><|a|><|a|><|a|>"
    check_ids(tok.encode(text), oracle.encode(text), oracle, f"encode({text!r}) with special tokens {specials}",
              hint="match special tokens longest first: '<|a|><|a|>' is one token, never '<|a|>' twice")


# --- B. decode, round trips, save/load ------------------------------------------------------------

@pytest.mark.group("decode")
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=40))
@example(text="")  # empty input: no ids, and back to ""
@example(text="a\x1c\x1d \x85\xa0\u2028x")  # str.isspace() says \x1c is whitespace, the pattern's \s does not
@example(text="we'll  \r\n\r\n\tok 🙂👨\u200d👩\u200d👧")
def test_round_trip_arbitrary_unicode(learner, seed, text):
    _, tok = trained(learner, seed)
    back = tok.decode(tok.encode(text))
    if back == text:
        return
    # Hypothesis shrinks the texts it draws, not the @examples: shrink here too, by the learner's own round trip.
    short = shortest_failing(text, lambda piece: round_trip(tok, piece) != piece)
    check(False, f"decode(encode(text)) != text: the shortest failing text found is {short!r} (decode(encode(it)) "
          f"gave {round_trip(tok, short)!r}); in text = {text!r}, {first_position(back, text)}")


@pytest.mark.group("decode")
def test_decode_random_ids_with_invalid_utf8(learner, seed, rng):
    oracle, tok = trained(learner, seed)
    for _ in range(3):
        ids = [int(i) for i in rng.integers(0, len(oracle.vocab), size=200)]
        got, want = tok.decode(ids), oracle.decode(ids)
        check(got == want, f"decode(ids) of 200 random ids (ids = {ids[:12]}..., numpy seed {seed}) differs from "
              f"joining their bytes and decoding with errors='replace': {first_position(got, want)}")


@pytest.mark.group("decode")
def test_decode_split_multibyte_characters(learner, seed):
    _, tok = trained(learner, seed)
    ids = list("é🙂".encode())  # single-byte ids
    check(tok.decode(ids) == "é🙂", "decode joins the bytes of all ids before decoding UTF-8 (a character may span ids)")
    check(tok.decode(ids[:3]) == "é\ufffd", f"decode(bytes of 'é' + the first byte of '🙂') gave {tok.decode(ids[:3])!r}, "
          "expected 'é\\ufffd'")


@pytest.mark.group("decode")
def test_save_load_round_trip(learner, seed):
    oracle, tok = trained(learner, seed, ["<|a|>", EOT])
    path = learner.lib("tempfile").mkdtemp() + "/tokenizer.json"  # the learner's private, writable /tmp
    tok.save(path)
    loaded = learner.module("bpe").Tokenizer.load(path)
    text = learner.course("corpus").generate(5_000, seed + 2) + "<|a|>é"
    check_ids(loaded.encode(text), oracle.encode(text), oracle, "Tokenizer.load(path).encode(text) after save(path)")
    check(loaded.vocab == oracle.vocab and [tuple(m) for m in loaded.merges] == oracle.merges,
          "the loaded tokenizer's vocab or merges differ from the saved ones")


# --- C. streaming ---------------------------------------------------------------------------------

SPACE_RE = regex.compile(r"\s")
GPT2_RE = regex.compile(GPT2_PATTERN)


def split_specials(text: str, specials: list[str]) -> list[str]:
    if not specials:
        return [text] if text else []
    pattern = "(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [piece for piece in regex.split(pattern, text) if piece]


def replay_stream(oracle: Oracle, chunks: list[str], *, two_pretokens=True, whitespace=True, partial_special=True,
                  whole_special=True, yielded: list[int] | None = None) -> list[int]:
    """The ids the recipe of the handout's section 6 gives (its steps 1-4), here, each step on or off:
    with every step on it is right; with one off it is that step's known mistake, whose ids name it.
    ``yielded``, when given, gets how many ids the recipe has given after each chunk."""
    specials = oracle.specials
    longest = max(map(len, specials), default=0)

    def stable_prefix(buffer: str) -> int:
        hold = len(buffer)
        if partial_special:  # 1. an end of the buffer that may become a special token
            for k in range(min(longest - 1, len(buffer)), 0, -1):
                if any(s.startswith(buffer[-k:]) and s != buffer[-k:] for s in specials):
                    hold = len(buffer) - k
                    break
        if whole_special:  # 2. never inside a whole special token ("<|a|>" may end "<|a|><|a|>")
            position = 0
            for piece in split_specials(buffer, specials):
                if piece in specials and position < hold < position + len(piece):
                    hold = position
                    break
                position += len(piece)
        pieces = split_specials(buffer[:hold], specials)
        if not pieces or pieces[-1] in specials:
            return hold
        piece = pieces[-1]
        starts = [m.start() for m in GPT2_RE.finditer(piece)]
        kept = 2 if two_pretokens else 1  # 3. the last two pre-tokens
        cut = starts[-kept] if len(starts) >= kept else 0
        while whitespace and cut > 0 and SPACE_RE.match(piece, cut - 1):  # 4. and the whitespace before them
            cut -= 1
        return hold - len(piece) + cut

    ids, buffer = [], ""
    for chunk in chunks:
        buffer += chunk
        cut = stable_prefix(buffer)
        ids += oracle.encode(buffer[:cut])
        buffer = buffer[cut:]
        if yielded is not None:
            yielded.append(len(ids))
    return ids + oracle.encode(buffer)


# The known mistakes of section 6, each as the step it leaves out and the hint it earns.
STREAM_MISTAKES = [
    (dict(two_pretokens=False), "hold back the last two pre-tokens, not one: whether a pre-token is final can depend "
                                "on the two characters after it (\"'l\" + \"l\" is the contraction \"'ll\")"),
    (dict(whitespace=False), "move the cut left past the whitespace before the pre-tokens you hold back: "
                             "\"\\n\\n\" alone is one pre-token, but \"\\n\\nA\" gives \"\\n\", \"\\n\", \"A\""),
    (dict(partial_special=False), "hold back an end of the buffer that may still become a special token "
                                  "(\"...<|endof\" + \"text|>\")"),
    (dict(whole_special=False), "never cut inside a whole special token of the buffer: the end \"<|a|>\" of "
                                "\"<|a|><|a|>\" is also the beginning of the longer token; move the cut to the "
                                "start of the whole token"),
]
STREAM_HINT = ("a chunk may end inside a word, a whitespace run or a special token: hold back the end of the buffer "
               "(a possible start of a special token, the last two pre-tokens, the whitespace before them)")


def stream_hint(oracle: Oracle, chunks: list[str], got, want: list[int]) -> str:
    """The hint for encode_iterable's ids: the mistakes whose ids they are (computed here; where two
    mistakes give the same ids, both are named), else the general one."""
    if got == want or not isinstance(got, list):
        return STREAM_HINT
    hints = []
    if got == [i for chunk in chunks for i in oracle.encode(chunk)]:
        hints.append("you encoded each chunk on its own: a chunk boundary is not a pre-token boundary; keep a buffer")
    hints += [hint for steps, hint in STREAM_MISTAKES if got == replay_stream(oracle, chunks, **steps)]
    if "" in chunks and got == oracle.encode("".join(chunks[:chunks.index("")])):
        hints.append("an empty chunk is not the end of the input: read until the iterable is exhausted")
    broken = [token for token, i in oracle.special_ids.items() if got.count(i) < want.count(i)]
    if broken and oracle.decode(got) == oracle.decode(want):
        hints.append(f"the special token {broken[0]!r} came out as ordinary bytes, so a cut fell inside it: the cut "
                     "moves left only within the text after the last whole special token, never below that text's start")
    return "\nHint: ".join(hints) or STREAM_HINT


def check_stream(tok, oracle: Oracle, chunks: list[str], call: str) -> None:
    """encode_iterable(chunks) against the oracle's ids of the whole text; on a failure, the hint of the
    mistake the ids show, or, where the learner's own encode of the whole text is wrong too, that."""
    got, want = list(tok.encode_iterable(chunks)), oracle.encode("".join(chunks))
    if got == want:
        return
    whole = tok.encode("".join(chunks))
    hint = (f"encode(the whole text) is wrong too ({first_difference(whole, want, oracle.decode)}): fix encode first"
            if whole != want else stream_hint(oracle, chunks, got, want))
    check_ids(got, want, oracle, call, hint=hint)


@pytest.mark.group("stream")
@FEW
@given(parts=st.lists(st.sampled_from(PIECES + ["<|a|>", "<|a|><|a|>"]), max_size=30), data=st.data())
def test_encode_iterable_any_chunking(learner, seed, parts, data):
    specials = ["<|a|>", "<|a|><|a|>", EOT]
    oracle, tok = trained(learner, seed, specials)
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))  # repeated cuts: empty chunks
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    check_stream(tok, oracle, chunks, f"encode_iterable({chunks!r})")


# Merges that make each step of section 6 show in the ids: two whitespace characters, the
# contractions, "the".  Each case below is one that a recipe without its step gets wrong.
STEP_MERGES = [(b"\n", b"\n"), (b"\t", b"\t"), (b" ", b"\n"), (b"l", b"l"), (b"'", b"ll"), (b"v", b"e"), (b"'", b"ve"),
               (b"r", b"e"), (b"'", b"re"), (b"t", b"h"), (b"th", b"e"), (b" ", b"the")]
STEP_CASES = {
    # 4. the whitespace before the held-back pre-tokens ("\n\nA" -> "\n", "\n", "A"; "\n\n" alone is one)
    "whitespace": ([["x\n\n", "A"], ["x\n\n\n", "A"], ["a \n\n", "b"], ["word\t\t", "\tX"], ["x\n\nA b", "c"],
                    ["a \n\nb c", "d"], ["word\t\tX y", "z"], [" \n\nA b", "c"],
                    ["x\n\nAb cd", "e"]], []),
    # 3. two pre-tokens ("'l" + "l" is "'ll")
    "contraction": ([["we'l", "l go"], ["you'v", "e been"], ["they'r", "e here"]], []),
    # 1. a possible start of a special token
    "special_token_cut": ([["the end.<|endof", "text|> the"], ["a<", "|endoftext|>b"], ["the end.<|endoftext|", "> the"]],
                          [EOT]),
    # 2. a special token that begins a longer one (and a cut into three pre-tokens: "<|", "a", "|")
    "special_token_inside_a_longer_one": ([["<|a|><|a|>"], ["x<|a|>", "<|a|>y"], ["x<|a|><|a|><|a|", ">"], ["x<|a|><|a|", ">"],
                                           ["x<|a|", ">y"]],
                                          ["<|a|>", "<|a|><|a|>"]),
    # 3-4. at the start of the text after a special token: a cut held back to 0 there stops at 0
    "whitespace_after_a_special_token": ([["the end.<|endoftext|>\n", "Next"], ["<|endoftext|> ", "x"],
                                          ["a", "<|endoftext|> hi ", "there"], ["x<|endoftext|>\n\n", "\n"]], [EOT]),
    # empty input: no chunks, empty chunks
    "empty_chunks": ([[], [""], ["", "the", "", " cat", ""], ["the", ""]], [EOT]),
}


@pytest.mark.group("stream")
@pytest.mark.parametrize("step", list(STEP_CASES))
def test_encode_iterable_each_step_of_the_recipe(learner, step):
    """Chunks cut where one step of section 6 matters (a whitespace run, a contraction, a special token
    cut in two, one that begins a longer one, empty chunks): the ids of the whole text."""
    cases, specials = STEP_CASES[step]
    oracle = Oracle(STEP_MERGES, specials)
    tok = oracle.learner_tokenizer(learner)
    for chunks in cases:
        check_stream(tok, oracle, chunks, f"encode_iterable({chunks!r}) with special tokens {specials}")


# Chunks after which section 6's recipe yields ids at once: a generator that holds back more than its
# four steps say gives the right ids, but only later (at the end of a file, all of them at once).
EARLY_CASES = {  # special tokens: the chunks
    (EOT,): [["the cat sat on", " the mat and", " more"], ["x<|endoftext|>the", " end. <|endof", "text|> tail"],
             ["we'l", "l go home now", "", " then"], ["a\n\n", "b c d e", "f"], ["the end<|endoftext|>", "next one", " two"],
             ["a bc de", " f", "g"]],  # a stable prefix of one character
    # a whole shorter token at the end of the buffer is final: only a PROPER prefix of a token is held back
    ("<|a|>", EOT): [["x<|a|>", "y z w", "q"], ["the<|a|><|a|>", " end of it", "."]],
    # a token inside a longer one, not at its start: step 2 looks only at tokens that begin before the cut
    ("<|a|>", "one two <|a|>!"): [["zero one two <|a|>", "!", " end"]],
}


@pytest.mark.group("stream")
def test_encode_iterable_yields_each_stable_prefix_before_reading_on(learner):
    """When each id comes out: the chunks are a list iterator on your side, and after every id the
    test asks it (operator.length_hint) how many chunks encode_iterable has read so far."""
    builtins, operator = learner.lib("builtins"), learner.lib("operator")
    for specials, chunks in ((specials, chunks) for specials, cases in EARLY_CASES.items() for chunks in cases):
        oracle = Oracle(STEP_MERGES, list(specials))
        tok = oracle.learner_tokenizer(learner)
        yielded = []
        want = replay_stream(oracle, chunks, yielded=yielded)
        # id k is due once the recipe has yielded more than k ids: after chunk j (1-based), else at the end
        due = [next((j + 1 for j, n in enumerate(yielded) if n > k), len(chunks)) for k in range(len(want))]
        chunk_iter = builtins.iter(chunks)
        gen = tok.encode_iterable(chunk_iter)
        got, read = [], []
        for _ in range(len(want) + 1):
            try:
                got.append(gen.send(None))  # send(None) is next() for a generator
            except StopIteration:
                break
            read.append(len(chunks) - operator.length_hint(chunk_iter))
        call = f"encode_iterable(iter({chunks!r})) with special tokens {list(specials)}"
        check_ids(got, want, oracle, call)
        late = next((k for k in range(len(want)) if read[k] != due[k]), None)
        check(late is None, "" if late is None else
              f"{call}: id {late} ({oracle.decode(want[late:late + 1])!r}) came after reading {read[late]} chunk(s); the recipe yields it after {due[late]}: the ids after each chunk were {yielded}\n"
              "Hint: after each chunk, yield the ids of buffer[:_stable_prefix(buffer)] before reading the next, "
              "and hold back only what the four steps of section 6 say (a possible start of a special token, the "
              "last two pre-tokens, the whitespace before them)")


@pytest.mark.group("encode")
def test_encode_remembers_pretokens_in_a_bounded_cache(learner):
    """The handout's cache: every pre-token encoded is remembered in tok.cache with its ids, and the
    cache never holds more than CACHE_LIMIT of them (cleared when full)."""
    oracle = Oracle(STEP_MERGES, [EOT])
    tok = oracle.learner_tokenizer(learner)
    text = "the cat sat on the mat, then the cat ran"
    pretokens = GPT2_RE.findall(text)
    check_ids(tok.encode(text), oracle.encode(text), oracle, f"encode({text!r})")
    cache = dict(tok.cache)
    want = {p: oracle.encode(p) for p in pretokens}
    check(cache == want, f"after encode({text!r}) on a fresh tokenizer, tok.cache is {cache!r:.300}; expected every "
          f"pre-token with its ids: {want!r:.300}\nHint: look each pre-token up in self.cache; on a miss, encode it "
          "and store it there (clear the cache only once it holds CACHE_LIMIT pre-tokens)")
    tok.cache = {}
    tok.CACHE_LIMIT = 3
    for k in range(1, len(pretokens) + 1):
        tok.encode("".join(pretokens[:k]))
        size = len(tok.cache)
        check(1 <= size <= 3, f"with CACHE_LIMIT = 3, after encode({''.join(pretokens[:k])!r}) tok.cache holds {size} "
              "pre-tokens; it must hold between 1 and CACHE_LIMIT (clear it when it is full, then store the new one)")
    # The same with a limit past 256, where ints are not shared objects (`len(cache) is CACHE_LIMIT` never holds):
    # 700 distinct words, 100 per call.
    tok.cache = {}
    tok.CACHE_LIMIT = 300
    words = [" " + "".join(letters) for letters in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), 700)]
    for start in range(0, len(words), 100):
        tok.encode("".join(words[start:start + 100]))
        size = len(tok.cache)
        check(1 <= size <= 300, f"with CACHE_LIMIT = 300, after encoding {start + 100} distinct words, tok.cache holds "
              f"{size} pre-tokens; it must hold between 1 and CACHE_LIMIT\nHint: clear the cache once "
              "len(self.cache) >= self.CACHE_LIMIT; compare numbers with == or >=, never `is`")


@pytest.mark.group("encode")
def test_empty_text(learner, seed):
    """encode("") and decode([]), then a short text each way: an answer right only on empty input earns nothing."""
    oracle, tok = trained(learner, seed)
    got = tok.encode("")
    check(got == [], f"encode('') gave {got!r}; expected [] (no text, no ids)")
    back = tok.decode([])
    check(back == "", f"decode([]) gave {back!r}; expected ''")
    text = f"the cat{EOT}"
    check_ids(tok.encode(text), oracle.encode(text), oracle, f"encode({text!r})")
    back = tok.decode(oracle.encode(text))
    check(back == text, f"decode(the ids of {text!r}) gave {back!r}")


@pytest.mark.group("stream")
def test_encode_iterable_special_token_cut_everywhere(learner, seed):
    oracle, tok = trained(learner, seed)
    text = f"the end.{EOT}{EOT} Next doc"
    start = text.index(EOT)
    for cut in range(start, start + 2 * len(EOT) + 1):
        chunks = [text[:cut], text[cut:]]
        got = list(tok.encode_iterable(chunks))
        check_ids(got, oracle.encode(text), oracle, f"encode_iterable({chunks!r})")


def first_ids_before_the_end(learner, tok, text: str, n_ids: int, hold_seconds: float = 5.0):
    """Feed ``text`` to ``tok.encode_iterable(an open pipe)`` and take its first ``n_ids`` ids:
    (those ids, whether the input had ended by then, the generator).  The pipe is written here and
    ends (EOF) only after ``hold_seconds``: a generator that reads everything before it yields
    cannot answer before then."""
    with learner.put_stream(text, hold_seconds=hold_seconds) as stream:
        f = learner.lib("builtins").open(stream.path, encoding="utf-8")
        gen = tok.encode_iterable(f)
        check(not stream.ended, "encode_iterable(file) read the whole input before it returned: make it a "
              "generator (yield ids as you read)")
        ids = [gen.send(None) for _ in range(n_ids)]  # send(None) is next() for a generator
        ended = stream.ended
    return ids, ended, gen


@pytest.mark.group("stream")
def test_encode_iterable_file_lines(learner, seed):
    oracle, tok = trained(learner, seed)
    text = learner.course("corpus").generate(20_000, seed + 3)
    lines = text.splitlines(keepends=True)
    want = oracle.encode(text)
    check_stream(tok, oracle, lines, f"encode_iterable(the lines of corpus.generate(20_000, seed={seed + 3}))")
    # The same text through a pipe that stays open: the first ids must come before it ends.
    ids, ended, gen = first_ids_before_the_end(learner, tok, text, 20)
    check(ids == want[:20] and not ended,
          f"encode_iterable(an open 20 KB file) gave its first 20 ids only once the input had ended; yield as "
          f"you read" if ids == want[:20] else f"encode_iterable(an open 20 KB file): the first 20 ids are {ids}, "
          f"expected {want[:20]}")
    count, rest = learner.harness("drain", gen)
    check((count, rest) == (len(want) - 20, digest(want[20:])),
          f"encode_iterable(an open 20 KB file) read through to the end gave {20 + count} ids, expected {len(want)}"
          + ("" if count != len(want) - 20 else " (the same number, but not the same ids)"))


# Memory budget of test_encode_iterable_memory_is_bounded, above the fresh worker's start-up memory
# (the course's machine, cgroup and /proc alike): the reference streams a 1.5 MB file byte by byte
# (no merges: one id per byte) in 4.0 MiB, its import, the tokenizer and its bounded cache included
# (4.4-5.1 MiB for 2 MB).  Keeping all the ids and yielding them at the end takes 15.4 MiB (8 bytes
# an id), reading the whole file and encoding it in one go 31 MiB.  8 MiB is twice the first and
# half the second.
STREAM_BYTES = 1_500_000
STREAM_BUDGET = 8 << 20


@pytest.mark.fresh_worker
@pytest.mark.group("stream")
def test_encode_iterable_memory_is_bounded(learner, seed, record_property):
    """encode_iterable over an open 1.5 MB file in a fresh worker, the ids consumed on the learner's side
    (harness.drain, checked against the oracle here): peak memory from import to the last id,
    measured from outside the worker (its cgroup, else /proc)."""
    text = learner.course("corpus").generate(STREAM_BYTES, seed + 4)
    oracle = Oracle([], [EOT])  # bytes only: one id per byte, so keeping the ids shows
    want = oracle.encode(text)
    path = learner.put_file(text)
    small = oracle.learner_tokenizer(learner)
    todo_first(lambda: learner.harness("drain", small.encode_iterable(["a b", "c"])))  # a stub stops here
    learner.restart()  # the measurement covers your import, the tokenizer, the call: nothing earlier
    tok = oracle.learner_tokenizer(learner)
    gen = tok.encode_iterable(learner.lib("builtins").open(path, encoding="utf-8"))
    with learner.time_limit(90):
        (count, got), cost = learner.measure_harness("drain", gen)
    check((count, got) == (len(want), digest(want)),
          f"encode_iterable(an open {STREAM_BYTES / 1e6:g} MB file) gave {count} ids, expected {len(want)}"
          + ("" if count != len(want) else " (the same number, but not the same ids)"))
    peak = cost.peak_since_ready
    record_property("figures", f"encode_iterable over a {STREAM_BYTES / 1e6:g} MB file: peak {peak / 2**20:.1f} MiB above the fresh "
                               f"worker's start-up memory, {cost.cpu_seconds:.2f} s CPU (measured by {cost.source})")
    check(peak <= STREAM_BUDGET,
          f"encode_iterable over a {STREAM_BYTES / 1e6:g} MB file ({len(want):,} ids) took {peak / 2**20:.1f} MiB at its peak (from "
          f"your import to the last id, measured outside your process); allowed {STREAM_BUDGET >> 20} MiB. Keep a "
          "small buffer and yield ids as you go: neither the whole text nor all the ids may be held at once")
