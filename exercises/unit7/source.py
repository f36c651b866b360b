"""Course code (read it, do not edit it): the source of Unit 7's corpus, and the loss it allows.

A tiny probabilistic grammar of English-like sentences ("the big dogs see a small cat .") written as
a *unifilar* hidden Markov source: a hidden state (where in the sentence we are, and whether the
noun phrase under way is singular or plural), a word drawn from the state's distribution, and a
next state that the state and the word decide together.  Determiners, adjectives and nouns must
agree in number (``a big dog``, ``two big dogs``; ``the`` takes either), and so must the verb with
its subject (``the dog sees``, ``the dogs see``): after ``a big old`` the next noun is singular,
which no model that looks only at the previous word can know.

Because every word sequence has exactly one state path, two numbers are exact:

* ``entropy_rate()``: the entropy of the source per word, in nats: sum over states of
  (the stationary probability of the state) x (the entropy of its word distribution).  No model can
  do better than this on average over long text.
* ``optimal_loss(windows)``: the loss of the best possible predictor on exactly these windows, which
  sees only the window (as a model does): the forward algorithm over the hidden states, started
  from their stationary distribution at the window's first word.  It is a little above the entropy
  rate, because the first words of a window leave the state unsure.

``vocab()`` numbers the words (one token per word) and ``generate(n_words, seed)`` writes text: lines
of a few sentences each, words separated by single spaces.  The same (n_words, seed) always gives
the same text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DETERMINERS = {"sg": ["a", "one", "every"], "pl": ["some", "two", "many"], "any": ["the"]}
ADJECTIVES = ["big", "small", "red", "old", "young", "happy", "quiet", "green"]
NOUNS = {"sg": ["dog", "cat", "bird", "child", "farmer", "teacher"],
         "pl": ["dogs", "cats", "birds", "children", "farmers", "teachers"]}
VERBS = {"sg": ["sees", "likes", "follows", "finds", "helps", "watches"],
         "pl": ["see", "like", "follow", "find", "help", "watch"]}
ENDINGS = [".", "with", "and"]

# Determiner probabilities (summing to 1): "the" is the most common and leaves the number open.
_DET_P = {"the": 0.34, "a": 0.14, "one": 0.08, "every": 0.08, "some": 0.14, "two": 0.11, "many": 0.11}
_ADJ_P = 0.45  # chance of one more adjective before the noun
_END_P = {".": 0.6, "with": 0.25, "and": 0.15}


@dataclass(frozen=True)
class Source:
    """The grammar as arrays: ``emit[s, w]`` = P(word w | state s); ``next_state[s, w]`` is the
    state after state s emits w (-1 where w cannot be emitted)."""

    words: tuple[str, ...]
    states: tuple[str, ...]
    emit: np.ndarray
    next_state: np.ndarray


def _build() -> Source:
    words = [*DETERMINERS["sg"], *DETERMINERS["pl"], *DETERMINERS["any"], *ADJECTIVES, *NOUNS["sg"], *NOUNS["pl"],
             *VERBS["sg"], *VERBS["pl"], *ENDINGS]
    states = ["start", "subj_sg", "subj_pl", "subj_any", "verb_sg", "verb_pl", "obj", "obj_sg", "obj_pl", "obj_any",
              "end"]
    w, s = {x: i for i, x in enumerate(words)}, {x: i for i, x in enumerate(states)}
    emit = np.zeros((len(states), len(words)))
    nxt = np.full((len(states), len(words)), -1, dtype=np.int64)

    def rule(state, word, p, to):
        emit[s[state], w[word]] += p
        nxt[s[state], w[word]] = s[to]

    for phrase, first in (("subj", "start"), ("obj", "obj")):
        for number, dets in DETERMINERS.items():
            for det in dets:
                rule(first, det, _DET_P[det], f"{phrase}_{number}")
        for number in ("sg", "pl", "any"):
            state = f"{phrase}_{number}"
            for adj in ADJECTIVES:
                rule(state, adj, _ADJ_P / len(ADJECTIVES), state)
            nouns = [(n, noun) for n in ("sg", "pl") if number in (n, "any") for noun in NOUNS[n]]
            for n, noun in nouns:
                rule(state, noun, (1 - _ADJ_P) / len(nouns), f"verb_{n}" if phrase == "subj" else "end")
    for number in ("sg", "pl"):
        for verb in VERBS[number]:
            rule(f"verb_{number}", verb, 1 / len(VERBS[number]), "obj")
    rule("end", ".", _END_P["."], "start")
    rule("end", "with", _END_P["with"], "obj")
    rule("end", "and", _END_P["and"], "start")
    assert np.allclose(emit.sum(1), 1.0)
    return Source(tuple(words), tuple(states), emit, nxt)


SOURCE = _build()


def vocab() -> dict[str, int]:
    """Word -> token id (0 .. 41): one token per word of the grammar."""
    return {word: i for i, word in enumerate(SOURCE.words)}


def transition_matrix(source: Source = SOURCE) -> np.ndarray:
    """P(next state | state), [states, states]."""
    n = len(source.states)
    t = np.zeros((n, n))
    for state in range(n):
        for word in np.flatnonzero(source.emit[state]):
            t[state, source.next_state[state, word]] += source.emit[state, word]
    return t


def stationary(source: Source = SOURCE) -> np.ndarray:
    """The stationary distribution of the hidden states (float64, sums to 1)."""
    t = transition_matrix(source)
    n = t.shape[0]
    a = np.vstack([t.T - np.eye(n), np.ones((1, n))])
    b = np.zeros(n + 1)
    b[-1] = 1.0
    pi, *_ = np.linalg.lstsq(a, b, rcond=None)
    return pi


def entropy_rate(source: Source = SOURCE) -> float:
    """Nats per word: sum_s pi(s) * H(words | s).  The state is a function of the past words, so this
    is the source's exact entropy rate: the lowest loss per token any model can reach on average."""
    pi = stationary(source)
    p = source.emit
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return float(pi @ h)


def sample_ids(n_words: int, seed: int, source: Source = SOURCE) -> np.ndarray:
    """``n_words`` token ids from the source, starting at a sentence start (int64)."""
    rng = np.random.default_rng(seed)
    # One pool of draws per state, made at once; the walk takes the next unused draw of its state.
    pools = [rng.choice(len(source.words), size=n_words, p=source.emit[state]).tolist()
             for state in range(len(source.states))]
    used = [0] * len(source.states)
    nxt = source.next_state.tolist()
    out = [0] * n_words
    state = 0
    for i in range(n_words):
        word = pools[state][used[state]]
        used[state] += 1
        out[i] = word
        state = nxt[state][word]
    return np.asarray(out, dtype=np.int64)


def generate(n_words: int, seed: int, sentences_per_line: int = 4) -> str:
    """Text of ``n_words`` words from the source: words separated by one space, a line break after
    every ``sentences_per_line`` sentences (after a "."), and a final line break."""
    words = [SOURCE.words[i] for i in sample_ids(n_words, seed)]
    lines, line, sentences = [], [], 0
    for word in words:
        line.append(word)
        if word == ".":
            sentences += 1
            if sentences % sentences_per_line == 0:
                lines.append(" ".join(line))
                line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def optimal_loss(windows: np.ndarray, source: Source = SOURCE) -> float:
    """The best possible mean next-token loss (nats) on ``windows`` ([n, T + 1] token ids; inputs
    ``windows[:, :-1]``, targets ``windows[:, 1:]``), for a predictor that sees only the window: the
    forward algorithm over the hidden states, from their stationary distribution at position 0."""
    windows = np.asarray(windows, dtype=np.int64)
    n, length = windows.shape
    pi = stationary(source)
    n_states = len(source.states)
    belief = np.tile(pi, (n, 1))  # P(state before word t | words < t)
    total = 0.0
    rows = np.arange(n)
    for t in range(length):
        word = windows[:, t]
        p_word = belief * source.emit[:, word].T  # [n, states]: P(state, word)
        likelihood = p_word.sum(1)
        if t > 0:
            total -= np.log(likelihood).sum()
        post = p_word / likelihood[:, None]
        belief = np.zeros((n, n_states))
        nxt = source.next_state[:, word].T  # [n, states]
        for state in range(n_states):
            ok = nxt[:, state] >= 0
            np.add.at(belief, (rows[ok], nxt[ok, state]), post[ok, state])
    return total / (n * (length - 1))


def bigram_loss(windows: np.ndarray, source: Source = SOURCE) -> float:
    """The best loss of a predictor that sees only the previous word (the stationary bigram
    distribution): what a model that cannot look further back is limited to."""
    pi = stationary(source)
    joint = np.zeros((len(source.words), len(source.words)))
    t = source.emit
    for state in range(len(source.states)):
        for word in np.flatnonzero(t[state]):
            nxt = source.next_state[state, word]
            joint[word] += pi[state] * t[state, word] * t[nxt]
    cond = joint / np.maximum(joint.sum(1, keepdims=True), 1e-300)
    windows = np.asarray(windows, dtype=np.int64)
    probs = cond[windows[:, :-1], windows[:, 1:]]
    return float(-np.log(probs).mean())


def random_windows(ids: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """``n`` windows of ``length`` consecutive ids from random places of ``ids`` ([n, length])."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length + 1, size=n)
    return np.stack([ids[s : s + length] for s in starts])


def nats_to_bits(x: float) -> float:
    return x / math.log(2)
