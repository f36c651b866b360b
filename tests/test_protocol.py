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
