"""The one wire codec: message -> ZeroMQ frames -> message.  No pickle anywhere.

Frame layout of one message::

    frame 0   14-byte header  b"FP" | version u8 | flags u8 | kind u16 | corr u64   (little endian)
              followed by the msgpack body: [payload, side_tensors]
    frame 1.. raw tensor buffers, sent with copy=False, referenced by index from the body

`payload` is the list of a registered message's fields (kind > 0), or any plain value (kind 0).
A tensor (torch or numpy), wherever it appears, is an ext value ``[dtype, shape, data]`` where
`data` is the raw bytes inline when the tensor is at most `inline_max` bytes, else the index of
the frame that holds them. Nested messages are ext values ``[kind, fields]``. The header layout
is frozen across protocol versions so that a peer can always answer a newer version with an error.

Every decoding failure raises `ProtocolError` saying what was wrong.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import msgpack
import numpy as np

from flexpipe.errors import ProtocolError
from flexpipe.runtime.messages import _BY_KIND, _FIELDS_OF, _KIND_OF, _NFIELDS, _NREQUIRED

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROTOCOL_VERSION", "INLINE_MAX", "ASK", "REPLY", "ERROR", "Header", "Envelope",
    "encode", "decode", "decode_envelope", "read_header", "TensorSpec",
    "tensor_header", "parse_tensor_header", "byte_view",
]

PROTOCOL_VERSION = 1
INLINE_MAX = 1024          # tensors up to this many bytes travel inside the msgpack body

# header flags
ASK = 1                    # the sender waits for a reply carrying the same corr
REPLY = 2                  # this message answers the ask with id `corr`
ERROR = 4                  # the reply is an ErrorReply: the asker raises RemoteError

_MAGIC = b"FP"
_HEADER = struct.Struct("<2sBBHQ")
HEADER_SIZE = _HEADER.size
_EXT_MSG, _EXT_TORCH, _EXT_NUMPY = 1, 2, 3
_MAX_DIMS = 32
_MAX_DIM = 1 << 48

_TORCH_DTYPE_NAMES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16",
                      "float32", "float64", "complex64", "complex128")
_NUMPY_OF = {n: np.dtype(n) for n in _TORCH_DTYPE_NAMES if n != "bfloat16"}
_TORCH_DTYPES: dict[str, "torch.dtype"] = {}   # filled on first use: the runtime needs no torch
_TORCH_NAMES: dict["torch.dtype", str] = {}


def _torch() -> Any:
    import torch
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({n: getattr(torch, n) for n in _TORCH_DTYPE_NAMES})
        _TORCH_NAMES.update({v: k for k, v in _TORCH_DTYPES.items()})
    return torch


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")   # no torch imported: obj cannot be a tensor
    return torch is not None and isinstance(obj, torch.Tensor)
_NUMPY_DTYPES = {np.dtype(n).str: np.dtype(n) for n in (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64", "complex64", "complex128")}


def _valid_shape(shape: Any) -> bool:
    """A list of at most _MAX_DIMS ints, each below 2**48 (a 0 elsewhere must not let a dim of 2**63 by)."""
    return (isinstance(shape, list) and len(shape) <= _MAX_DIMS
            and all(type(d) is int and 0 <= d < _MAX_DIM for d in shape))


class Header(NamedTuple):
    """The fixed part of frame 0."""
    version: int
    flags: int
    kind: int
    corr: int


class Envelope(NamedTuple):
    """A decoded message with its header fields."""
    flags: int
    kind: int
    corr: int
    msg: Any
    tensors: list


# --- encoding ----------------------------------------------------------------------------------

class _Encoder:
    """msgpack `default` hook for one encode() call: collects the large tensor buffers as frames."""
    __slots__ = ("frames", "inline_max")

    def __init__(self, frames: list, inline_max: int):
        self.frames = frames
        self.inline_max = inline_max

    def __call__(self, obj: Any) -> Any:
        if _is_tensor(obj):
            return self._torch(obj)
        if isinstance(obj, np.ndarray):
            return self._numpy(obj)
        fields = _FIELDS_OF.get(type(obj))
        if fields is not None:
            body = msgpack.packb([_KIND_OF[type(obj)], fields(obj)], default=self)
            return msgpack.ExtType(_EXT_MSG, body)
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__qualname__}: register it with @message "
                        "or send it as a tensor field")

    def _data(self, flat: np.ndarray) -> bytes | int:
        # flat: [nbytes] uint8 view of the tensor's memory
        if flat.nbytes <= self.inline_max:
            return flat.tobytes()
        self.frames.append(flat)
        return len(self.frames) - 1

    def _torch(self, t: "torch.Tensor") -> msgpack.ExtType:
        # few torch calls: each costs microseconds on the hot path, numpy views cost less
        name = _TORCH_NAMES.get(t.dtype) or (_torch() and _TORCH_NAMES.get(t.dtype))
        if name is None:
            raise TypeError(f"tensor dtype {t.dtype} is not supported on the wire")
        if not t.is_cpu:
            raise TypeError(f"tensor on {t.device} cannot go in a frame; use a GPU transport")
        if t.requires_grad:
            t = t.detach()
        if name[0] == "c" and t.is_conj():
            t = t.resolve_conj()
        if not t.is_contiguous():
            t = t.contiguous()
        relay = getattr(t, "_fp_frame", None)
        if relay is not None and relay[1] == t.data_ptr():
            # received whole and sent on unchanged (or changed in place): the same frame again
            self.frames.append(relay[0])
            data: Any = len(self.frames) - 1
        else:
            arr = (t.view(_torch().int16) if name == "bfloat16" else t).numpy()
            data = self._data(arr.reshape(-1).view(np.uint8))
        return msgpack.ExtType(_EXT_TORCH, msgpack.packb([name, list(t.shape), data]))

    def _numpy(self, a: np.ndarray) -> msgpack.ExtType:
        dt = _NUMPY_DTYPES.get(a.dtype.str)
        if dt is None:
            raise TypeError(f"numpy dtype {a.dtype} is not supported on the wire")
        if not a.flags.c_contiguous:   # (np.ascontiguousarray would also make a 0-d array 1-d)
            a = np.ascontiguousarray(a)
        flat = a.reshape(-1).view(np.uint8)
        return msgpack.ExtType(_EXT_NUMPY, msgpack.packb([dt.str, list(a.shape), self._data(flat)]))


def encode(msg: Any, tensors: Sequence = (), *, flags: int = 0, corr: int = 0,
           inline_max: int = INLINE_MAX) -> list:
    """Encode a message (or plain value) and side tensors into frames ready for send_multipart.

    The large tensor frames share memory with the tensors: do not modify them until sent.
    Raises TypeError for a value the wire cannot carry.
    """
    frames: list = [b""]
    enc = _Encoder(frames, inline_max)
    cls = type(msg)
    kind = _KIND_OF.get(cls, 0)
    payload = _FIELDS_OF[cls](msg) if kind else msg
    body = msgpack.packb((payload, list(tensors)), default=enc)
    frames[0] = _HEADER.pack(_MAGIC, PROTOCOL_VERSION, flags, kind, corr) + body
    return frames


# --- decoding ----------------------------------------------------------------------------------

def read_header(frame0: Any) -> Header:
    """Parse the fixed header of frame 0 (raises ProtocolError when it is not a FlexPipe frame)."""
    buf = memoryview(frame0)
    if buf.nbytes < HEADER_SIZE:
        raise ProtocolError(f"frame 0 has {buf.nbytes} bytes, shorter than the "
                            f"{HEADER_SIZE}-byte header")
    magic, version, flags, kind, corr = _HEADER.unpack_from(buf)
    if magic != _MAGIC:
        raise ProtocolError(f"frame 0 does not start with {_MAGIC!r} (got {bytes(magic)!r})")
    return Header(version, flags, kind, corr)


class _Decoder:
    """msgpack `ext_hook` for one decode() call: rebuilds nested messages and tensors."""
    __slots__ = ("frames", "used")

    def __init__(self, frames: Sequence):
        self.frames = frames
        self.used: set[int] = set()

    def __call__(self, code: int, data: bytes) -> Any:
        if code == _EXT_TORCH:
            return self._tensor(data, torch_=True)
        if code == _EXT_NUMPY:
            return self._tensor(data, torch_=False)
        if code == _EXT_MSG:
            value = self.unpack(data)
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)):
                raise ProtocolError("nested message is not [kind, fields]")
            return build(value[0], value[1])
        raise ProtocolError(f"unknown ext type {code}")

    def unpack(self, data: Any) -> Any:
        return msgpack.unpackb(data, ext_hook=self, raw=False, strict_map_key=False)

    def _tensor(self, data: bytes, torch_: bool) -> Any:
        desc = self.unpack(data)
        if not (isinstance(desc, list) and len(desc) == 3):
            raise ProtocolError("tensor header is not [dtype, shape, data]")
        name, shape, ref = desc
        torch = _torch() if torch_ else None
        dtype = (_TORCH_DTYPES if torch_ else _NUMPY_DTYPES).get(name) if isinstance(name, str) \
            else None
        if dtype is None:
            raise ProtocolError(f"unsupported tensor dtype {name!r}")
        if not _valid_shape(shape):
            raise ProtocolError(f"bad tensor shape {shape!r}")
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if isinstance(ref, bytes):
            buf: Any = ref
        elif type(ref) is int:
            if not 1 <= ref < len(self.frames):
                raise ProtocolError(f"tensor refers to frame {ref} but the message has "
                                    f"{len(self.frames)} frames")
            if ref in self.used:
                raise ProtocolError(f"frame {ref} is referenced twice")
            self.used.add(ref)
            buf = self.frames[ref]
        else:
            raise ProtocolError(f"tensor data is neither bytes nor a frame index: {type(ref)}")
        view = memoryview(buf)
        if view.nbytes != nbytes:
            raise ProtocolError(f"tensor {name}{shape} needs {nbytes} bytes, got {view.nbytes}")
        shared = not view.readonly and buf is not ref   # the tensor will be the frame's memory
        if view.readonly:       # bytes: copy, so the tensor is writable like any other
            view = memoryview(bytearray(view))
        if torch_:   # via numpy (cheaper than torch.frombuffer); bf16 travels as int16
            if name == "bfloat16":
                t = torch.from_numpy(np.frombuffer(view, np.int16).reshape(shape)).view(dtype)
            else:
                t = torch.from_numpy(np.frombuffer(view, _NUMPY_OF[name]).reshape(shape))
            if shared and nbytes:   # remember the frame: a relay can send it again
                t._fp_frame = (buf, t.data_ptr())
            return t
        return np.frombuffer(view, dtype=dtype).reshape(shape)


def build(kind: Any, fields: Any) -> Any:
    """Instantiate the message registered under `kind` from its field values."""
    cls = _BY_KIND.get(kind) if type(kind) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    # Fewer fields than the class has: a peer built before trailing fields with defaults were added
    # (they take their defaults).  More: a peer built after fields were added, which this one does
    # not know and ignores, so that peers of two versions talk either way round (a worker upgraded
    # before its router); a field an older peer must not ignore comes with a new PROTOCOL_VERSION
    # instead.  Fewer than the required ones: not this message.
    if not isinstance(fields, list) or len(fields) < _NREQUIRED[cls]:
        got = len(fields) if isinstance(fields, list) else type(fields).__name__
        want = (f"{_NFIELDS[cls]}" if _NREQUIRED[cls] == _NFIELDS[cls]
                else f"{_NREQUIRED[cls]} to {_NFIELDS[cls]}")
        raise ProtocolError(f"{cls.__name__} (kind {kind}) has {want} fields, got {got}")
    return cls(*fields[:_NFIELDS[cls]])


def decode_envelope(frames: Sequence) -> Envelope:
    """Decode frames into an Envelope; raises ProtocolError saying what was wrong."""
    if not frames:
        raise ProtocolError("empty message (no frames)")
    head = read_header(frames[0])
    if head.version != PROTOCOL_VERSION:
        newer = "newer" if head.version > PROTOCOL_VERSION else "older"
        raise ProtocolError(f"protocol version {head.version} is {newer} than this runtime's "
                            f"{PROTOCOL_VERSION}")
    if head.kind and head.kind not in _BY_KIND:
        raise ProtocolError(f"unknown message kind {head.kind}")
    dec = _Decoder(frames)
    try:
        body = dec.unpack(memoryview(frames[0])[HEADER_SIZE:])
        if not (isinstance(body, list) and len(body) == 2 and isinstance(body[1], list)):
            raise ProtocolError("body is not [payload, tensors]")
        payload, tensors = body
        msg = build(head.kind, payload) if head.kind else payload
    except ProtocolError:
        raise
    except Exception as e:  # msgpack, unicode, constructor errors: all mean a bad frame
        raise ProtocolError(f"undecodable body of kind {head.kind}: {type(e).__name__}: {e}") \
            from e
    for t in tensors:
        if not (isinstance(t, np.ndarray) or _is_tensor(t)):
            raise ProtocolError(f"side tensor list holds a {type(t).__name__}")
    if len(dec.used) != len(frames) - 1:
        raise ProtocolError(f"{len(frames) - 1 - len(dec.used)} of {len(frames) - 1} tensor "
                            "frames are not referenced by the body")
    return Envelope(head.flags, head.kind, head.corr, msg, tensors)


def decode(frames: Sequence) -> tuple[Any, list]:
    """Decode frames into (message, side tensors); raises ProtocolError on any bad input."""
    env = decode_envelope(frames)
    return env.msg, env.tensors


# --- bare tensor headers (the transports: bytes travel outside the message) ---------------------

class TensorSpec(NamedTuple):
    """dtype, shape and byte count of one tensor whose bytes travel outside the header."""
    dtype: "torch.dtype"
    shape: list
    nbytes: int


def tensor_header(tensors: Sequence["torch.Tensor"]) -> bytes:
    """Encode the dtypes and shapes of CPU tensors (not their bytes) for a transport."""
    torch = _torch()
    specs = []
    for t in tensors:
        name = _TORCH_NAMES.get(t.dtype) if isinstance(t, torch.Tensor) else None
        if name is None:
            raise TypeError(f"a transport carries CPU torch tensors of a wire dtype, not {t!r:.60}")
        specs.append([name, list(t.shape)])
    return _HEADER.pack(_MAGIC, PROTOCOL_VERSION, 0, 0, 0) + msgpack.packb(specs)


def parse_tensor_header(data: Any) -> list[TensorSpec]:
    """Decode a tensor_header(); raises ProtocolError saying what was wrong."""
    head = read_header(data)
    if head.version != PROTOCOL_VERSION:
        raise ProtocolError(f"tensor header of protocol version {head.version}, expected "
                            f"{PROTOCOL_VERSION}")
    try:
        specs = msgpack.unpackb(memoryview(data)[HEADER_SIZE:], raw=False)
    except Exception as e:
        raise ProtocolError(f"undecodable tensor header: {type(e).__name__}: {e}") from e
    if not isinstance(specs, list):
        raise ProtocolError("tensor header is not a list")
    out = []
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 2):
            raise ProtocolError(f"bad tensor spec {spec!r:.80}")
        name, shape = spec
        _torch()
        dtype = _TORCH_DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise ProtocolError(f"unsupported tensor dtype {name!r}")
        if not _valid_shape(shape):
            raise ProtocolError(f"bad tensor shape {shape!r}")
        out.append(TensorSpec(dtype, shape, math.prod(shape) * dtype.itemsize))
    return out


def byte_view(t: "torch.Tensor") -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's memory (no copy)."""
    return t.detach().reshape(-1).view(_torch().uint8).numpy()
