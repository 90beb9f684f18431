"""The wire codec: exact round trips with asserted frame counts, and a ProtocolError for every bad
input (saying what was wrong)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from flexpipe.errors import ConfigError, ProtocolError
from flexpipe.runtime import codec
from flexpipe.runtime.codec import ASK, INLINE_MAX, PROTOCOL_VERSION, decode, encode
from flexpipe.runtime.messages import ActorRef, ErrorReply, Terminated, kind_of, message

pytestmark = pytest.mark.timeout(30)


@message(60000)
class Inner:
    """A nested message."""
    name: str
    weights: list


@message(60001)
class Outer:
    """A message with every kind of field."""
    i: int
    f: float
    s: str
    b: bytes
    flag: bool
    nothing: None
    items: list
    table: dict
    inner: Inner
    tensor: object = None


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def roundtrip(msg, tensors=(), *, as_zmq_frames=False):
    frames = encode(msg, tensors)
    if as_zmq_frames:  # what a socket hands the receiver
        frames = [zmq.Frame(bytes(memoryview(f))) for f in frames]
    else:
        frames = [bytes(memoryview(f)) for f in frames]
    return decode(frames)


def test_nested_message_roundtrip_in_one_frame():
    ref = ActorRef("stage0", "ipc:///tmp/x")
    msg = Outer(7, 2.5, "héllo", b"\x00\xff", True, None, [1, [2, None], b"x", Terminated(ref, "bye")],
                {"a": 1, 2: "two", "nested": {"k": [True, False]}}, Inner("w", [0.5, -1]))
    frames = encode(msg)
    assert len(frames) == 1
    out, tensors = decode(frames)
    assert out == msg and tensors == []
    assert isinstance(out.items[3], Terminated) and out.items[3].ref == ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool])
@pytest.mark.parametrize("as_zmq_frames", [False, True])
def test_tensor_dtypes_roundtrip_exactly(dtype, as_zmq_frames):
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(64, 33, generator=g) * 100).to(dtype)     # > INLINE_MAX: its own frame
    small = (torch.randn(3, 2, generator=g) * 100).to(dtype)    # inline
    assert big.numel() * big.element_size() > INLINE_MAX >= small.numel() * small.element_size()
    frames = encode(Inner("t", []), [big, small])
    assert len(frames) == 2
    out, (b2, s2) = roundtrip(Inner("t", []), [big, small], as_zmq_frames=as_zmq_frames)
    assert same(b2, big) and same(s2, small)


def test_bf16_bits_survive_including_nan_and_inf():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3.14159] * 100,
                     dtype=torch.bfloat16)
    _, (y,) = roundtrip(None, [x])
    assert same(x, y)


def test_non_contiguous_empty_and_scalar_tensors():
    base = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    cases = [base.t(), base[::2, 1::3], torch.empty(0, 5, dtype=torch.bfloat16),
             torch.zeros(0), torch.tensor(3.5), torch.tensor(True), base.to(torch.float16).t()]
    assert not cases[0].is_contiguous() and not cases[1].is_contiguous()
    frames = encode(None, cases)
    # base.t() (16 KiB), base[::2, 1::3] (~2.7 KiB), the fp16 transpose (8 KiB) take frames
    assert len(frames) == 4
    _, out = roundtrip(None, cases)
    for a, b in zip(cases, out):
        assert same(a, b), a
        assert b.is_contiguous()


def test_large_frames_share_memory_with_the_tensor():
    x = torch.randn(1024, 256)
    frames = encode(None, [x])
    assert len(frames) == 2
    assert np.shares_memory(frames[1], x.numpy())   # no copy on the send side
    buf = zmq.Frame(bytes(memoryview(frames[1])))
    _, (y,) = decode([frames[0], buf])
    assert y.data_ptr() == np.frombuffer(buf.buffer, np.uint8).ctypes.data  # nor on receipt


def test_tensors_as_fields_lists_and_dicts_and_side_list():
    t1, t2, t3 = torch.randn(40, 40), torch.randn(2), torch.randint(0, 9, (30, 30))
    msg = Outer(1, 0.0, "", b"", False, None, [t1, {"k": t2}], {"x": t3}, Inner("", [t2]), t1[:5])
    side = [torch.randn(100, 10)]
    frames = encode(msg, side)
    # t1 (6400 B), t3 (7200 B), t1[:5] (800 B: inline), side (4000 B); t2 inline everywhere
    assert len(frames) == 4
    out, (s,) = roundtrip(msg, side)
    assert same(out.items[0], t1) and same(out.items[1]["k"], t2) and same(out.table["x"], t3)
    assert same(out.inner.weights[0], t2) and same(out.tensor, t1[:5]) and same(s, side[0])


def test_numpy_arrays_roundtrip():
    arrays = [np.arange(1000, dtype=np.int64), np.ones((3, 3), np.float16), np.zeros(0, np.float32),
              np.arange(24.0).reshape(4, 6).T, np.array([True, False])]
    frames = encode({"a": arrays[0]}, arrays[1:])
    assert len(frames) == 2
    out, rest = roundtrip({"a": arrays[0]}, arrays[1:])
    for a, b in zip(arrays, [out["a"], *rest]):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_plain_values_are_kind_zero():
    for value in (None, True, 3, "x", [1, "a", None], {"k": [1.5, b"b"]}):
        frames = encode(value)
        assert codec.read_header(frames[0]).kind == 0
        assert decode(frames) == (value, [])


def test_header_carries_flags_kind_and_corr():
    frames = encode(ErrorReply("E", "m"), flags=ASK, corr=2**40 + 5)
    head = codec.read_header(frames[0])
    assert head == (PROTOCOL_VERSION, ASK, kind_of(ErrorReply), 2**40 + 5)
    env = codec.decode_envelope(frames)
    assert env.msg == ErrorReply("E", "m") and env.corr == 2**40 + 5 and env.flags == ASK


def test_registry_rejects_duplicates_and_bad_kinds():
    with pytest.raises(ConfigError, match="already taken"):
        @message(60000)
        class Clash:
            x: int
    for bad in (0, -1, 65536, "5"):
        with pytest.raises(ConfigError):
            message(bad)


def test_unencodable_values_raise_type_error():
    class NotAMessage:
        pass
    with pytest.raises(TypeError, match="NotAMessage"):
        encode([NotAMessage()])
    with pytest.raises(TypeError, match="dtype"):
        encode(None, [torch.zeros(2, dtype=torch.uint16)])
    with pytest.raises(TypeError, match="dtype"):
        encode(np.array([object()]))


def _frames_with_body(body, kind=0, version=PROTOCOL_VERSION, extra=()):
    return [struct.pack("<2sBBHQ", b"FP", version, 0, kind, 0) + body, *extra]


def _tensor_ext(name, shape, data):
    return msgpack.ExtType(2, msgpack.packb([name, shape, data]))


@pytest.mark.parametrize("frames, says", [
    ([], "no frames"),
    ([b"FP\x01"], "shorter than"),
    ([b"XX" + bytes(12) + msgpack.packb([None, []])], "does not start with"),
    (_frames_with_body(msgpack.packb([None, []]), version=PROTOCOL_VERSION + 1), "newer"),
    (_frames_with_body(msgpack.packb([None, []]), version=0), "older"),
    (_frames_with_body(msgpack.packb([[], []]), kind=59999), "unknown message kind 59999"),
    (_frames_with_body(b"\xc1\xc1"), "undecodable"),
    (_frames_with_body(msgpack.packb([None, []]) + b"junk"), "undecodable"),
    (_frames_with_body(msgpack.packb({"not": "a list"})), "not [payload, tensors]"),
    (_frames_with_body(msgpack.packb([["only one"], []]), kind=60000), "has 2 fields, got 1"),
    (_frames_with_body(msgpack.packb([None, [1]])), "side tensor list holds a int"),
    (_frames_with_body(msgpack.packb([None, [_tensor_ext("float32", [4], b"\x00" * 15)]])),
     "needs 16 bytes, got 15"),
    (_frames_with_body(msgpack.packb([None, [_tensor_ext("float32", [4], 1)]])),
     "refers to frame 1 but the message has 1 frames"),
    (_frames_with_body(msgpack.packb([None, []]), extra=[b"x"]), "not referenced"),
    (_frames_with_body(msgpack.packb([None, [_tensor_ext("float32", [1], 1),
                                             _tensor_ext("float32", [1], 1)]]), extra=[b"abcd"]),
     "referenced twice"),
    (_frames_with_body(msgpack.packb([None, [_tensor_ext("float99", [1], b"x")]])), "dtype"),
    (_frames_with_body(msgpack.packb([None, [_tensor_ext("float32", [-1], b"")]])), "shape"),
    (_frames_with_body(msgpack.packb([None, [_tensor_ext("float32", [1] * 40, b"")]])), "shape"),
    (_frames_with_body(msgpack.packb([None, [msgpack.ExtType(77, b"")]])), "unknown ext type 77"),
    (_frames_with_body(msgpack.packb([None, [msgpack.ExtType(2, b"\x93")]])), "undecodable"),
    (_frames_with_body(b"\x92\xa2\xff\xfe\x90"), "UnicodeDecodeError"),
    (_frames_with_body(msgpack.packb([msgpack.ExtType(1, msgpack.packb([60000, [1]])), []])),
     "has 2 fields, got 1"),
])
def test_bad_frames_raise_protocol_error_saying_what(frames, says):
    with pytest.raises(ProtocolError, match=says.replace("[", r"\[").replace("]", r"\]")):
        decode(frames)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=5), kids, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_any_msgpack_value_roundtrips(value):
    assert decode(encode(Inner("v", [value])))[0] == Inner("v", [value])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data, nframes):
    frames = [struct.pack("<2sBBHQ", b"FP", PROTOCOL_VERSION, 0, 0, 0) + data] + [data] * nframes
    try:
        decode(frames)
    except ProtocolError:
        pass


def test_a_received_tensor_sent_on_unchanged_reuses_its_frame():
    x = torch.randn(64, 64)
    frames = [zmq.Frame(bytes(memoryview(f))) for f in encode(None, [x])]
    _, (y,) = decode(frames)
    again = encode(Inner("relay", []), [y])
    assert again[1] is frames[1]                      # the same frame: no copy
    y.mul_(2)                                         # changed in place: still that memory
    assert torch.equal(decode([bytes(memoryview(f)) for f in encode(None, [y])])[1][0], x * 2)
    z = y[1:]                                         # a view is another tensor: copied as usual
    assert encode(None, [z])[1] is not frames[1]
    _, (w,) = decode([bytes(memoryview(f)) for f in encode(None, [x])])   # bytes were copied
    assert encode(None, [w])[1] is not frames[1] and not hasattr(w, "_fp_frame")


def test_zero_d_arrays_keep_their_shape_and_huge_dims_are_refused():
    from flexpipe.runtime.codec import parse_tensor_header, tensor_header

    msg, tensors = decode(encode(None, [np.array(3.5, dtype=np.float32), torch.tensor(2.0)]))
    assert tensors[0].shape == () and float(tensors[0]) == 3.5 and tensors[1].shape == ()
    head = bytearray(tensor_header([torch.zeros(0, 2)]))
    forged = bytes(head).replace(msgpack.packb([["float32", [0, 2]]])[1:], msgpack.packb([["float32", [0, 1 << 63]]])[1:])
    with pytest.raises(ProtocolError, match="bad tensor shape"):
        parse_tensor_header(forged)


def test_a_message_from_a_peer_built_before_trailing_fields_were_added_takes_their_defaults():
    # JoinCluster gained `stages` (a worker's running stages, default none): a worker built before
    # sends 7 fields, which a newer router takes (stages empty) rather than refusing every join
    import dataclasses

    from flexpipe.runtime.codec import build
    from flexpipe.runtime.daemon.messages import JoinCluster
    from flexpipe.runtime.messages import ActorRef, kind_of

    new = JoinCluster("w", ActorRef("w", "tcp://h:1"), "h", 7, {}, {}, ["w-stage-0"])
    old_fields = [getattr(new, f.name) for f in dataclasses.fields(JoinCluster)][:-1]
    got = build(kind_of(JoinCluster), old_fields)
    assert got == dataclasses.replace(new, stages=[])
    with pytest.raises(ProtocolError, match="has 6 to 7 fields, got 5"):
        build(kind_of(JoinCluster), old_fields[:5])


def test_a_message_from_a_peer_built_after_fields_were_added_is_taken_without_them():
    # DeviceUsage gained `stages` last; a router built before it refused every report of an upgraded
    # worker (ProtocolError: 3 to 4 fields, got 5). Fields this peer does not know are ignored now:
    # the message is taken as the fields it knows
    import dataclasses

    from flexpipe.runtime.daemon.messages import DeviceUsage

    msg = DeviceUsage("w", {"w/0": 5}, {"w/0": 2}, {"w/0": 0}, {"w/0": {"s": 2}})
    fields = [getattr(msg, f.name) for f in dataclasses.fields(DeviceUsage)]
    assert decode(encode(msg))[0] == msg
    for later in (["a later field"], [{"x": [1, 2]}, 7]):
        got, _ = decode(_frames_with_body(msgpack.packb([fields + later, []]), kind=kind_of(DeviceUsage)))
        assert got == msg