"""Hostile submissions for Unit 3 (byte-level BPE).

Unit 3's tests once generated their "secret" corpora, wrote their files, counted how far
encode_iterable read and measured its memory on the learner's side (corpus.generate, write_temp,
first_ids_pulled, stream_file), and timed the trainers by the wall clock.  A bpe.py could replace
all of that at import.  Now every input is made on the trusted side, laziness is seen there and
memory and CPU time are measured outside the worker: the attacks below, on top of the untouched
stub, must earn exactly what the stub earns (nothing), and a naive trainer stays slow whatever
runs beside it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autograder.manifest import REPO_ROOT, Limits, load_course
from autograder.runner import grade
from tests.course_checks import apply_mutant

COURSE = load_course()
# As in test_adversarial.py: short limits, so that hangs and bombs cost seconds, not minutes.
FAST = COURSE.model_copy(update={"limits": Limits(unit_timeout=240, call_timeout=4, memory_mb=1024,
                                                  max_processes=64, max_file_kb=512)})
UNIT3_STUB = (REPO_ROOT / "exercises" / "unit3" / "bpe.py").read_text()

# Everything the unit's tests used to compute on the learner's side, replaced at import: corpora
# become empty, files empty, the laziness and memory probes report success, the clocks stop, and the
# harness helpers lie.  (builtins.list and dict, which the tests once called on this side, cannot be
# replaced without breaking the worker's own isinstance checks; the tests no longer call them.)
PATCH_WORKER_SIDE = '''
import importlib, itertools, os, tempfile, time, tracemalloc

_corpus = importlib.import_module("unit3.corpus")


def _empty_file(*args, **kwargs):
    fd, path = tempfile.mkstemp(suffix=".txt")
    os.close(fd)
    return path


_corpus.generate = lambda *args, **kwargs: ""
_corpus.write_temp = _empty_file
_corpus.write_corpus = _empty_file
_corpus.stream_file = lambda *args, **kwargs: (0, 0)
_corpus.first_ids_pulled = lambda encode_iterable, chunks, n_ids=1: ([0] * n_ids, 0)
tracemalloc.get_traced_memory = lambda: (0, 0)
time.perf_counter = lambda: 0.0
time.process_time = lambda: 0.0
_real_islice = itertools.islice  # the traceback module needs the real one for the worker's error replies
itertools.islice = lambda iterable, *args: (iter([0] * (args[-1] or 1)) if "bpe" in getattr(getattr(iterable, "gi_code", None), "co_filename", "")
                                            else _real_islice(iterable, *args))
tempfile.mkdtemp = lambda *args, **kwargs: "/tmp"
try:
    import autograder.worker.harness as _harness
    _harness.drain = lambda *args, **kwargs: (0, 0)
except ImportError:
    pass
'''

# ...and functions that are right only on those empty corpora (no honest work): with the old tests,
# an empty "secret" corpus made {} the right pre-token counts, [] the right ids and "" the right text,
# and a visible test compared encode_iterable with the learner's own encode.
ANSWERS_FOR_EMPTY_CORPORA = PATCH_WORKER_SIDE + '''

def count_pretokens(text, special_tokens):
    return {}


def split_on_special(text, special_tokens):
    return [text] if text else []


def train_bpe(input_path, vocab_size, special_tokens):
    vocab = {i: bytes([i]) for i in range(256)}
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    return vocab, []


_SAVED = {}
Tokenizer.encode = lambda self, text: []
Tokenizer.encode_iterable = lambda self, iterable: iter(())
Tokenizer.decode = lambda self, ids: ""
Tokenizer.save = lambda self, path: _SAVED.__setitem__(path, self)
Tokenizer.load = classmethod(lambda cls, path: _SAVED[path])
'''

ATTACKS = {"patch_worker_side": PATCH_WORKER_SIDE, "answers_for_empty_corpora": ANSWERS_FOR_EMPTY_CORPORA}


def _submission(tmp_path: Path, bpe_source: str) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "unit3" / "bpe.py").write_text(bpe_source)
    return root


# Every test but the Hypothesis properties (their inputs never came from the learner's side, and
# failing examples are slow to shrink).
NOT_PROPERTIES = "not (varied_text or any_chunking or arbitrary_unicode or split_on_special_longest_first or ties_and_overlaps)"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_unit3_attack_on_worker_side_helpers_earns_nothing(tmp_path, name):
    unit = grade(FAST, _submission(tmp_path, UNIT3_STUB + "\n" + ATTACKS[name]), ["unit3"],
                 extra_args=["-k", NOT_PROPERTIES]).units[0]
    assert unit.error is None, unit.error
    passed = [t.name for t in unit.tests if t.status == "passed"]
    assert unit.score == 0 and not passed, passed  # what the untouched stub earns
    # The attack is live: the worker imported it and kept answering (the tests failed on their own checks).
    died = [t.name for t in unit.tests if "died" in t.output or "not called again" in t.output]
    assert not died, died


# A correct but naive trainer (the course's mutant: recount every pair at every merge), which forks
# CPU burners in sessions of their own that run only while its train_bpe is not running (a flag
# file in the sandbox's /tmp), two burning CPU and one memory bandwidth: under the old wall-clock
# timing they slowed the trusted baseline, never the learner's own call.
BURNERS = '''
import os as _os
import time as _time

_BUSY = "/tmp/.train-bpe-running"


def _burn(kind):
    _os.setsid()
    if kind == "memory":
        import numpy
        block = numpy.ones(1 << 23)
    while True:
        if _os.path.exists(_BUSY):
            _time.sleep(0.001)
        elif kind == "memory":
            block += 1.0
        else:
            for _ in range(100_000):
                pass


for _kind in ("cpu", "cpu", "memory"):
    if _os.fork() == 0:
        try:
            _burn(_kind)
        finally:
            _os._exit(0)

_naive_train_bpe = train_bpe


def train_bpe(input_path, vocab_size, special_tokens):
    open(_BUSY, "w").close()
    try:
        return _naive_train_bpe(input_path, vocab_size, special_tokens)
    finally:
        _os.remove(_BUSY)
'''


def _naive_submission(tmp_path: Path, extra: str = "") -> Path:
    root = tmp_path / "submission"
    shutil.copytree(REPO_ROOT / "solutions", root, ignore=shutil.ignore_patterns("__pycache__"))
    mutants = yaml.safe_load((REPO_ROOT / "tests" / "mutants" / "unit3.yml").read_text())
    apply_mutant(root, "unit3", next(m for m in mutants if m["name"] == "naive_recount_trainer"))
    bpe = root / "unit3" / "bpe.py"
    bpe.write_text(bpe.read_text() + extra)
    return root


def _speed(unit):
    group = next(g for g in unit.groups if g.id == "speed")
    return group.score, group.max_score, [(t.name, t.status, t.output[:300]) for t in unit.tests]


def test_unit3_naive_trainer_with_cpu_burners_fails_the_speed_tests(tmp_path):
    unit = grade(FAST, _naive_submission(tmp_path, BURNERS), ["unit3"], extra_args=["-k", "speed"]).units[0]
    assert unit.error is None, unit.error
    score, max_score, tests = _speed(unit)
    print(*tests, sep="\n")
    assert max_score > 0 and score == 0, tests
    assert tests and all(status == "failed" and ("needed" in output or "allowed" in output) for _, status, output in tests), tests


def test_unit3_speed_verdicts_hold_under_external_load(tmp_path):
    """Two CPU burners outside the grader, for the whole run: the solutions keep every speed point,
    the naive trainer still earns none."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        good = grade(FAST, REPO_ROOT / "solutions", ["unit3"], extra_args=["-k", "speed"]).units[0]
        slow = grade(FAST, _naive_submission(tmp_path), ["unit3"], extra_args=["-k", "speed"]).units[0]
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert good.error is None and slow.error is None, (good.error, slow.error)
    for label, unit in (("solutions", good), ("naive", slow)):
        for test in unit.tests:
            print(f"{label}: {test.name}: {test.status}: {test.output[:300]}")
    score, max_score, tests = _speed(good)
    assert max_score > 0 and score == pytest.approx(max_score), tests
    score, max_score, tests = _speed(slow)
    assert max_score > 0 and score == 0, tests
