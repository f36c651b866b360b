"""The wire format: plain data round-trips exactly; anything else stays behind as a handle; a
forged or malformed message is refused."""

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autograder.client import InProcessBackend, Learner, Proxy
from autograder.worker.objects import ObjectTable
from autograder.worker.protocol import Handle, ProtocolError, pack, unpack


def round_trip(value):
    table = ObjectTable()
    data = pack(value, table.to_handle)
    header_len, blob_len = struct.unpack_from("<QQ", data)
    return unpack(data[16:16 + header_len], data[16 + header_len:], lambda h: ("handle", h.type_name)), table


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_plain_values_round_trip_exactly(value):
    back, _ = round_trip(value)
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_tensors_round_trip_bitwise(dtype):
    t = (torch.randn(3, 4, 5) * 100).to(dtype)
    back, _ = round_trip({"t": t, "empty": torch.empty(0, 3, dtype=dtype)})
    assert back["t"].dtype == dtype and torch.equal(back["t"], t)
    assert back["empty"].shape == (0, 3)


def test_arrays_scalars_and_special_floats():
    value = [np.arange(6, dtype=np.int32).reshape(2, 3), np.float32(1.5), float("nan"), float("-inf"), 2**80]
    back, _ = round_trip(value)
    assert np.array_equal(back[0], value[0]) and back[0].dtype == np.int32
    assert back[1].dtype == np.float32 and back[1] == 1.5
    assert np.isnan(back[2]) and back[3] == float("-inf") and back[4] == 2**80


def test_lying_subclasses_stay_behind_as_handles():
    class AlwaysEqual(float):
        def __eq__(self, other):
            return True

    class LyingTensor(torch.Tensor):
        pass

    back, table = round_trip([AlwaysEqual(1.0), torch.zeros(2).as_subclass(LyingTensor), object()])
    assert back == [("handle", "AlwaysEqual"), ("handle", "LyingTensor"), ("handle", "object")]
    assert len(table.objects) == 3


@pytest.mark.parametrize("header", [
    {"T": "pt", "dtype": "float32", "shape": [4], "device": "cpu", "o": 0, "n": 8},  # too few bytes
    {"T": "pt", "dtype": "object", "shape": [1], "device": "cpu", "o": 0, "n": 8},
    {"T": "nd", "dtype": "float64", "shape": [1], "o": 100, "n": 8},  # out of range
    {"T": "pickle", "v": "gASV"},
    {"T": "h", "id": "1", "type": "x", "text": ""},
    {"T": "dict", "v": [[[1], 2]]},  # unhashable key
])
def test_malformed_messages_are_refused(header):
    with pytest.raises(ProtocolError):
        unpack(json.dumps(header).encode(), b"\0" * 8, lambda h: h)


def test_deep_nesting_is_refused():
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(ProtocolError):
        unpack(deep.encode(), b"", lambda h: h)


def test_proxies_never_decide_comparisons(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "class Liar:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
        "def make():\n    return Liar()\n")
    learner = Learner(InProcessBackend(tmp_path), "pkg")
    liar = learner.module("m").make()
    assert isinstance(liar, Proxy)
    assert liar != 1.0 and not (liar == liar._handle)


def _forged_amplifying_message(buffer_bytes: int, references: int) -> tuple[bytes, bytes]:
    """One buffer, many tensor nodes pointing at it: each would decode to its own copy."""
    node = {"T": "pt", "dtype": "uint8", "shape": [buffer_bytes], "device": "cpu", "o": 0, "n": buffer_bytes}
    return json.dumps([node] * references).encode(), bytes(buffer_bytes)


def test_buffers_referenced_twice_are_refused():
    header, blob = _forged_amplifying_message(1 << 10, 2)
    with pytest.raises(ProtocolError, match="decode to more than"):
        unpack(header, blob, lambda h: None)
    header, blob = _forged_amplifying_message(1 << 10, 1)
    assert unpack(header, blob, lambda h: None)[0].numel() == 1 << 10


def test_decoding_a_hostile_reply_stays_within_twice_its_size():
    """The trusted side's peak while refusing 120 references to one 32 MB buffer (which took it
    to 4.9 GB before): measured in a fresh process, against the same process reading the message."""
    import subprocess
    import sys

    script = """
import json, resource, sys
from autograder.worker.protocol import ProtocolError, unpack
node = {"T": "pt", "dtype": "uint8", "shape": [32 << 20], "device": "cpu", "o": 0, "n": 32 << 20}
header, blob = json.dumps([node] * 120).encode(), bytearray(32 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    unpack(header, blob, lambda h: None)
    outcome = "decoded"
except ProtocolError as exc:
    outcome = str(exc)
print(json.dumps([outcome, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    outcome, before_kib, after_kib = json.loads(done.stdout.strip().splitlines()[-1])
    assert "decode to more than" in outcome
    grown = (after_kib - before_kib) << 10
    print(f"trusted peak while refusing the hostile reply: {grown / 2**20:.1f} MiB above the message itself")
    assert grown <= 2 * (32 << 20), f"decoding grew the trusted process by {grown >> 20} MiB"


def test_an_oversized_header_is_refused():
    from autograder.worker.protocol import MAX_HEADER_BYTES

    with pytest.raises(ProtocolError, match="header"):
        unpack(b" " * (MAX_HEADER_BYTES + 1), b"", lambda h: None)
