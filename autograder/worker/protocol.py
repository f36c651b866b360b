"""The wire format between the trusted test process and the learner's worker.

A message is a JSON document plus one binary blob.  Only plain data crosses: None, bool, int,
float, str, bytes, list, tuple, dict, numpy arrays and torch tensors (their raw bytes, rebuilt by
the receiver), torch dtypes and devices, slices, and *handles*: references to objects that stay on
the side that made them.  Decoding builds only those types, so no object the learner made, and
none of its methods, ever runs in the process that decides scores (no pickle).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

try:  # the protocol is also used by NumPy-only units and tools
    import torch
except ImportError:  # pragma: no cover - torch is a course dependency
    torch = None

MAX_MESSAGE_BYTES = 1 << 31
# What the trusted side accepts as one reply: decoding needs about twice this, so the trusted
# process's memory stays bounded whatever the learner's side sends.
MAX_REPLY_BYTES = 1 << 30
# The JSON part of a message: a decoded JSON node costs up to ~20x its text, so this bounds what a
# forged header can make the receiver allocate (ids, vocabularies and merges fit easily).
MAX_HEADER_BYTES = 32 << 20
MAX_DEPTH = 64
_HEADER = struct.Struct("<QQ")

NUMPY_DTYPES = {
    name: np.dtype(name)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128")
}
TORCH_DTYPES = {} if torch is None else {
    "bool": torch.bool, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float64": torch.float64, "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_TORCH_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


class ProtocolError(Exception):
    """A message that is not of the agreed form (possibly forged by learner code)."""


class Handle:
    """A reference to an object that lives on the other side."""

    __slots__ = ("id", "type_name", "text")

    def __init__(self, id: int, type_name: str, text: str):
        self.id, self.type_name, self.text = id, type_name, text

    def __repr__(self) -> str:
        return f"<handle #{self.id} to a {self.type_name}: {self.text}>"


def _is_plain_tensor(value: Any) -> bool:
    return torch is not None and type(value) in (torch.Tensor, torch.nn.Parameter)


class Encoder:
    """Turns a value into (JSON-able tree, blob).  ``to_handle`` gets every object that is not
    plain data and returns the Handle (or handle id) to send instead."""

    def __init__(self, to_handle: Callable[[Any], Handle]):
        self.to_handle = to_handle
        self.chunks: list[bytes] = []
        self.size = 0

    def _buffer(self, data: bytes) -> dict:
        node = {"o": self.size, "n": len(data)}
        self.chunks.append(data)
        self.size += len(data)
        return node

    def encode(self, value: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ProtocolError("value nested too deeply to send")
        kind = type(value)
        if value is None or kind in (bool, str):
            return value
        if kind is int:
            return value if abs(value) < 2**53 else {"T": "int", "v": str(value)}
        if kind is float:
            return value if math.isfinite(value) else {"T": "float", "v": repr(value)}
        if kind is list:
            return [self.encode(v, depth + 1) for v in value]
        if kind is tuple or (torch is not None and kind is torch.Size):
            return {"T": "tuple", "v": [self.encode(v, depth + 1) for v in value]}
        if kind in (dict, OrderedDict):
            return {"T": "dict", "v": [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in value.items()]}
        if kind in (bytes, bytearray):
            return {"T": "bytes", **self._buffer(bytes(value))}
        if kind is slice:
            return {"T": "slice", "v": [self.encode(value.start), self.encode(value.stop), self.encode(value.step)]}
        if value is Ellipsis:
            return {"T": "ellipsis"}
        if kind is np.ndarray or isinstance(value, np.generic) and type(value).__module__ == "numpy":
            array = np.ascontiguousarray(value)
            if array.dtype.name not in NUMPY_DTYPES:
                raise ProtocolError(f"numpy arrays of dtype {array.dtype} cannot be sent")
            return {"T": "nd", "dtype": array.dtype.name, "shape": list(array.shape), **self._buffer(array.tobytes())}
        if _is_plain_tensor(value):
            tensor = value.detach()
            if tensor.dtype not in _TORCH_DTYPE_NAMES:
                raise ProtocolError(f"tensors of dtype {tensor.dtype} cannot be sent")
            device = str(tensor.device)
            flat = tensor.cpu().contiguous().reshape(-1)
            data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
            return {"T": "pt", "dtype": _TORCH_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                    "device": device, **self._buffer(data)}
        if torch is not None and kind is torch.dtype:
            return {"T": "dtype", "v": _TORCH_DTYPE_NAMES.get(value, str(value))}
        if torch is not None and kind is torch.device:
            return {"T": "device", "v": str(value)}
        handle = self.to_handle(value)
        return {"T": "h", "id": handle.id, "type": handle.type_name, "text": handle.text}


class Decoder:
    """Rebuilds plain data from (tree, blob); ``from_handle`` turns a handle node into an object."""

    def __init__(self, blob: bytes, from_handle: Callable[[Handle], Any], device_ok: Callable[[str], str] | None = None):
        self.blob = memoryview(blob)
        self.from_handle = from_handle
        self.device_ok = device_ok or (lambda device: "cpu")
        self.decoded = 0  # bytes of the blob handed out so far

    def _view(self, node: dict) -> memoryview:
        offset, length = node.get("o"), node.get("n")
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 or offset + length > len(self.blob):
            raise ProtocolError("buffer reference out of range")
        # No amplification: the values rebuilt from a message never hold more bytes than it carried
        # (an honest encoder writes each buffer once; a forged message may point many nodes at one).
        self.decoded += length
        if self.decoded > len(self.blob):
            raise ProtocolError(f"the message's buffers decode to more than the {len(self.blob)} bytes it carries "
                                "(buffers referenced more than once); refused")
        return self.blob[offset : offset + length]

    def _bytes(self, node: dict) -> bytes:
        return bytes(self._view(node))

    @staticmethod
    def _shape(node: dict) -> tuple[int, ...]:
        shape = node.get("shape")
        if type(shape) is not list or len(shape) > 32 or any(type(d) is not int or d < 0 for d in shape):
            raise ProtocolError("bad array shape")
        return tuple(shape)

    def decode(self, node: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ProtocolError("message nested too deeply")
        kind = type(node)
        if node is None or kind in (bool, int, float, str):
            return node
        if kind is list:
            return [self.decode(v, depth + 1) for v in node]
        if kind is not dict:
            raise ProtocolError(f"unexpected JSON value of type {kind.__name__}")
        tag = node.get("T")
        if tag == "tuple":
            return tuple(self.decode(v, depth + 1) for v in self._list(node))
        if tag == "dict":
            out = {}
            for pair in self._list(node):
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolError("bad dict entry")
                key = self.decode(pair[0], depth + 1)
                try:
                    out[key] = self.decode(pair[1], depth + 1)
                except TypeError:
                    raise ProtocolError("unhashable dict key") from None
            return out
        if tag == "int" and type(node.get("v")) is str and len(node["v"]) < 5000:
            return int(node["v"])
        if tag == "float" and node.get("v") in ("nan", "inf", "-inf"):
            return float(node["v"])
        if tag == "bytes":
            return self._bytes(node)
        if tag == "slice":
            start, stop, step = (self.decode(v, depth + 1) for v in self._list(node, 3))
            return slice(start, stop, step)
        if tag == "ellipsis":
            return Ellipsis
        if tag == "nd":
            dtype = NUMPY_DTYPES.get(node.get("dtype"))
            shape = self._shape(node)
            data = self._view(node)
            if dtype is None or len(data) != math.prod(shape) * dtype.itemsize:
                raise ProtocolError("bad numpy array")
            return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        if tag == "pt":
            if torch is None:
                raise ProtocolError("torch is not available to rebuild a tensor")
            dtype = TORCH_DTYPES.get(node.get("dtype"))
            shape = self._shape(node)
            data = self._view(node)
            if dtype is None or len(data) != math.prod(shape) * dtype.itemsize:
                raise ProtocolError("bad tensor")
            tensor = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
            device = node.get("device")
            if type(device) is not str:
                raise ProtocolError("bad tensor device")
            return tensor.to(self.device_ok(device))
        if tag == "dtype":
            dtype = TORCH_DTYPES.get(node.get("v"))
            if dtype is None:
                raise ProtocolError("unknown dtype")
            return dtype
        if tag == "device":
            if type(node.get("v")) is not str or torch is None:
                raise ProtocolError("bad device")
            return torch.device(node["v"])
        if tag == "h":
            hid, type_name, text = node.get("id"), node.get("type"), node.get("text")
            if type(hid) is not int or type(type_name) is not str or type(text) is not str:
                raise ProtocolError("bad handle")
            return self.from_handle(Handle(hid, type_name[:200], text[:500]))
        raise ProtocolError(f"unknown node tag {tag!r}")

    @staticmethod
    def _list(node: dict, length: int | None = None) -> list:
        values = node.get("v")
        if type(values) is not list or (length is not None and len(values) != length):
            raise ProtocolError("bad container")
        return values


def pack(message: Any, to_handle: Callable[[Any], Handle]) -> bytes:
    encoder = Encoder(to_handle)
    tree = encoder.encode(message)
    header = json.dumps(tree, separators=(",", ":")).encode("utf-8")
    blob = b"".join(encoder.chunks)
    return _HEADER.pack(len(header), len(blob)) + header + blob


def unpack(header: bytes, blob: bytes, from_handle: Callable[[Handle], Any], device_ok=None) -> Any:
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"a message header of {len(header) >> 20} MiB is over the {MAX_HEADER_BYTES >> 20} MiB limit")
    try:
        tree = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    return Decoder(blob, from_handle, device_ok).decode(tree)


def write_message(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(fd: int, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        chunk = os.readv(fd, [view[got:]])
        if chunk == 0:
            raise EOFError("the other side closed the channel")
        got += chunk
    return buffer


def read_message(fd: int) -> tuple[bytes, bytes]:
    header_len, blob_len = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if header_len > MAX_HEADER_BYTES or header_len + blob_len > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {header_len + blob_len} bytes is over the limit")
    return _read_exact(fd, header_len), _read_exact(fd, blob_len)
