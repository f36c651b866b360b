"""Visible tests for Part A (pre-tokens, train_bpe) and Part D (speed). Run: pytest exercises/unit3/test_train.py

The tests make their inputs on their own side (corpora from the course's copy of corpus.py, files
written with ``learner.put_file``), call your functions, and check the answers on their side."""

import pytest

from autograder.checks import check
from autograder.client import Proxy
from autograder.testing import baseline_cpu_seconds

EOT = "<|endoftext|>"


def kind(value) -> str:
    """The type of a value as the learner's side knows it (an object left there arrives as a Proxy)."""
    return value._handle.type_name if isinstance(value, Proxy) else type(value).__name__


def plain_dict(value):
    """A Counter or defaultdict stays on your side as an object; the tests want a plain dict (its
    items are copied over)."""
    return dict(list(value.items())) if isinstance(value, Proxy) else value


def train(learner, text: str, vocab_size: int, special_tokens: list[str]):
    """train_bpe on ``text``, written to a file your side can read."""
    return learner.module("bpe").train_bpe(learner.put_file(text), vocab_size, special_tokens)


@pytest.mark.group("pretokenize")
def test_split_on_special_keeps_each_token(learner):
    split = learner.module("bpe").split_on_special
    got = split(f"Hi{EOT}there{EOT}{EOT} x", [EOT])
    check(got == ["Hi", EOT, "there", EOT, EOT, " x"],
          f"split_on_special('Hi<|endoftext|>there<|endoftext|><|endoftext|> x') gave {got!r}; each special "
          "token is a piece of its own (keep them: regex.split with a capturing group), empty pieces dropped")
    check(split("no specials here", []) == ["no specials here"], "with no special tokens, the whole text is one piece")


@pytest.mark.group("pretokenize")
def test_count_pretokens_small_text(learner):
    counts = plain_dict(learner.module("bpe").count_pretokens(f"the cat's hat,  the cat{EOT}the", [EOT]))
    expected = {b"the": 2, b" cat": 2, b"'s": 1, b" hat": 1, b",": 1, b" ": 1, b" the": 1}
    check(counts == expected, f"count_pretokens gave {counts!r}; expected {expected!r}. Pre-tokens come from "
          "the GPT-2 regex (a word keeps its leading space; of two spaces the first stands alone), as UTF-8 "
          "bytes, and the special token only separates text: it is not counted")


@pytest.mark.group("train")
def test_vocab_layout(learner):
    vocab, merges = train(learner, "low lower lowest " * 20, 256 + 1 + 5, [EOT])
    check(isinstance(vocab, dict) and len(vocab) == 262, f"vocab should be a dict of 262 entries, got {len(vocab)}")
    check(all(vocab[i] == bytes([i]) for i in range(256)), "ids 0..255 are the single bytes: vocab[i] == bytes([i])")
    check(vocab[256] == EOT.encode(), f"id 256 is the special token, got {vocab[256]!r}")
    check(len(merges) == 5 and all(vocab[257 + k] == a + b for k, (a, b) in enumerate(merges)),
          "then one token per merge, in order: vocab[257 + k] == merges[k][0] + merges[k][1]")


@pytest.mark.group("train")
def test_known_merges_and_tie_break(learner):
    text = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    _, merges = train(learner, text, 256 + 6, [])
    # Pre-tokens: "low" x1, " low" x4, " lower" x2, " widest" x3, " newest" x6.
    # ("e","s") and ("s","t") both occur 9 times: the greater pair, ("s","t"), wins the tie.
    expected = [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e")]
    check(merges == expected, f"merges: got {merges!r}\nexpected {expected!r}\n(ties go to the lexicographically "
          "greatest pair: max by (count, pair))")


@pytest.mark.group("train")
def test_tie_break_picks_greatest_pair(learner):
    # "xy" x1, " xy" x1, " ab" x2: (x,y), (" ",a) and (a,b) all occur twice; (x,y) is the greatest.
    _, merges = train(learner, "xy xy ab ab", 256 + 1, [])
    check(merges == [(b"x", b"y")], f"first merge: got {merges!r}, expected [(b'x', b'y')]: among pairs of "
          "equal count, the lexicographically greatest (compare the left bytes, then the right) wins")


@pytest.mark.group("train")
def test_no_merge_across_a_special_token(learner):
    _, merges = train(learner, f"ab{EOT}" * 30 + "cd", 256 + 1 + 10, [EOT])
    joined = [a + b for a, b in merges]
    check(not any(b"<" in t or b"|" in t or b"end" in t for t in joined),
          f"merges {merges!r} include bytes of the special token: split the text on special tokens first and "
          "count only the text between them")
    check(merges == [(b"a", b"b"), (b"c", b"d")],
          f"merges: got {merges!r}; between the special tokens there are only the pre-tokens 'ab' (30 times) and "
          "'cd' (once), so there are exactly two merges, (a, b) then (c, d), and then no pair is left")


@pytest.mark.group("speed")
def test_train_speed_within_ratio_of_hf_tokenizers(learner, monkeypatch, record_property):
    """Your trainer against HF tokenizers (Rust, one thread) on the same 130 KB corpora, in CPU
    seconds: yours measured from outside your process (every process it starts counts; in your own
    pytest run, this process's CPU time), HF's by the test's process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # HF on one thread, as in grading (this test only)
    corpus, bpe = learner.course("corpus"), learner.module("bpe")

    def hf_train(text):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([text], trainer)

    # Two corpora: each of your calls trains on text it has not seen before.
    ratios, figures = [], []
    with learner.time_limit(120):
        for seed in (7, 8):
            text = corpus.generate(130_000, seed)
            path = learner.put_file(text)
            hf = min(baseline_cpu_seconds(lambda: hf_train(text))[1] for _ in range(2))
            result, cost = learner.measure(bpe.train_bpe, path, 500, [EOT])
            merges = result[1] if type(result) is tuple and len(result) == 2 else None
            check(type(merges) is list and len(merges) == 500 - 257,
                  "train_bpe(path, 500, ['<|endoftext|>']) on 130 KB should return (vocab, merges), merges a plain "
                  "list of 243 pairs; got " + (f"{len(merges)} merges" if type(merges) is list else kind(result)))
            ratios.append(cost.cpu_seconds / max(hf, 1e-3))
            figures.append(f"{cost.cpu_seconds:.2f} s vs HF {hf:.3f} s")
    summary = (f"train_bpe (vocab 500, 130 KB), CPU time: {'; '.join(figures)} ({min(ratios):.1f}x HF at best; "
            f"measured by {cost.source})")
    record_property("figures", summary)
    # CPU seconds (the course's machine): the reference takes 2.3-2.6x HF's time here, a trainer that
    # scans all pairs for the largest at every merge about 5x, one that recounts every pair at every
    # merge about 40x. 10x sits 4x from the reference and from the recount.
    check(min(ratios) <= 10, f"{summary}; allowed 10x. Count pre-tokens once, keep a pair-count table and a pair -> "
          "words index, and after each merge update only the words that contain the merged pair")
