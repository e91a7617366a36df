"""Tests for swarm.transport: packing/receiving tensor messages and the limits enforced while receiving."""

from __future__ import annotations

import asyncio
import re

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm import transport
from swarm.transport import TensorLimits, TransportError, aiter_messages, pack, receive

MiB = 1 << 20


def roundtrip(messages, limits: TensorLimits = None):
    return asyncio.run(receive(transport.aiter_messages(messages), limits or TensorLimits(max_tensors=16)))


def rejects(messages, message: str, limits: TensorLimits = None):
    with pytest.raises(TransportError, match=message):
        roundtrip(messages, limits)


def header(size, dtype="float32", chunks=1, buffer=b"", compression=runtime_pb2.CompressionType.NONE):
    return runtime_pb2.Tensor(size=size, dtype=dtype, chunks=chunks, buffer=buffer, compression=compression)


def chunk(buffer: bytes):
    return runtime_pb2.Tensor(buffer=buffer)


META = {"mb": "12.0", "route": ["QmA", "QmB"], "stage": 1, "loss": 2.5, "ok": True, "raw": b"\x00\x01"}


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(3.5),
        torch.randn(7),
        torch.randn(2, 3, 4),
        torch.randn(1, 1, 1, 5),
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.randint(-(2**62), 2**62, (2, 16), dtype=torch.int64),
        torch.randn(4, 8).to(torch.bfloat16),
        torch.randn(64, 64).to(torch.bfloat16),  # larger than the header's few-KiB slack
        torch.randn(2, 128, 192).to(torch.bfloat16),
        torch.randn(3, 5).to(torch.float16),
    ],
    ids=lambda t: f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}",
)
def test_round_trip_exact(tensor):
    received = roundtrip(pack(META, [tensor]))
    assert received.metadata == META
    assert len(received.tensors) == 1
    out = received.tensors[0]
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_round_trip_several_tensors_and_big_one_in_chunks():
    big = torch.randn(1024, 1024)  # 4 MiB of float32
    tensors = [torch.randint(0, 4096, (8, 128)), big, torch.randn(3, 3).to(torch.bfloat16), torch.tensor(1.0)]
    messages = pack(META, tensors, chunk_bytes=MiB)
    big_parts = [p for m in messages for p in m.tensors][1:5]
    assert big_parts[0].chunks == 4 and big_parts[0].dtype == "float32"
    assert all(not p.dtype for p in big_parts[1:])
    assert len(messages) == 7  # ids, 4 chunks of the big tensor, bf16, scalar
    assert messages[0].metadata and not any(m.metadata for m in messages[1:])
    received = roundtrip(messages)
    assert received.metadata == META
    assert [t.dtype for t in received.tensors] == [t.dtype for t in tensors]
    for out, expected in zip(received.tensors, tensors, strict=True):
        assert torch.equal(out, expected)
    assert received.num_bytes == sum(len(p.buffer) for m in messages for p in m.tensors)
    assert received.num_bytes >= big.numel() * 4


def test_metadata_only_and_unary_messages():
    messages = pack({"ok": True, "error": None})
    assert len(messages) == 1
    assert roundtrip(messages).metadata == {"ok": True, "error": None}
    assert roundtrip(pack({})).metadata == {}
    reply = pack({"ok": True}, [torch.ones(2, 2)], message_type=runtime_pb2.ExpertResponse)[0]
    assert isinstance(reply, runtime_pb2.ExpertResponse)
    received = asyncio.run(receive(transport.single(reply), TensorLimits()))
    assert received.metadata == {"ok": True} and torch.equal(received.tensors[0], torch.ones(2, 2))


def test_message_without_metadata_bytes_reads_as_empty_dict():
    message = runtime_pb2.ExpertRequest(tensors=pack({}, [torch.ones(3)])[0].tensors)
    received = roundtrip([message])
    assert received.metadata == {} and torch.equal(received.tensors[0], torch.ones(3))


def test_float16_compression_is_approximate_and_smaller():
    x = torch.randn(256, 192)
    messages = pack({"m": 1}, [x], compression="float16")
    assert sum(len(p.buffer) for m in messages for p in m.tensors) == x.numel() * 2
    out = roundtrip(messages).tensors[0]
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert not torch.equal(out, x)
    torch.testing.assert_close(out, x, rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings(
    "ignore:The given NumPy array is not writable"
)  # inside hivemind's meanstd16 codec
def test_compression_never_touches_int64():
    ids = torch.tensor(
        [[0, 1, 2**24 + 1, 2**40 + 3, -(2**50) - 7]], dtype=torch.int64
    )  # float16 would ruin these
    for compression in ("float16", "meanstd16"):
        messages = pack({}, [ids, torch.randn(4)], compression=compression)
        parts = [p for m in messages for p in m.tensors]
        assert parts[0].compression == runtime_pb2.CompressionType.NONE
        assert parts[1].compression == transport.COMPRESSION[compression]
        out = roundtrip(messages).tensors
        assert out[0].dtype == torch.int64 and torch.equal(out[0], ids)


@pytest.mark.parametrize("compression", ["none", "float16", "meanstd16", "uniform8"])
def test_bfloat16_goes_as_its_own_two_bytes_under_any_codec(compression):
    """hivemind's lossy codecs refuse bfloat16 (a bf16 peer with --compression failed every send) and its default
    sends it as float32: it travels as its own 2 bytes, exactly, and decodes as bfloat16."""
    x = torch.randn(32, 64).to(torch.bfloat16)
    messages = pack({}, [x], compression=compression)
    assert sum(len(p.buffer) for m in messages for p in m.tensors) == 2 * x.numel()
    out = roundtrip(messages).tensors[0]
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)
    assert transport.as_received(x, compression) is x


def test_big_compressed_tensor_in_chunks():
    x = torch.randn(2, 1024, 1024)  # 8 MiB float32 -> 4 MiB float16
    messages = pack({}, [x], compression="float16", chunk_bytes=MiB)
    assert len(messages) == 4
    out = roundtrip(messages).tensors[0]
    torch.testing.assert_close(out, x, rtol=1e-3, atol=1e-3)


def test_requires_grad_tensor_is_detached():
    x = torch.randn(3, requires_grad=True)
    out = roundtrip(pack({}, [x * 2])).tensors[0]
    assert torch.equal(out, (x * 2).detach())


# ------------------------------------------------------------------------------------------------ limits


def test_dtype_not_allowed():
    limits = TensorLimits(dtypes=("float32",))
    rejects(pack({}, [torch.arange(3)]), re.escape("dtype 'int64' not accepted (allowed: float32)"), limits)
    rejects(pack({}, [torch.zeros(3, dtype=torch.int32)]), "dtype 'int32' not accepted")
    rejects(pack({}, [torch.zeros(3, dtype=torch.bool)]), "dtype 'bool' not accepted")


def test_rank_too_large():
    rejects(pack({}, [torch.zeros(1, 1, 1, 1, 2)]), "tensor rank 5 exceeds 4")
    rejects(pack({}, [torch.zeros(2, 2)]), "tensor rank 2 exceeds 1", TensorLimits(max_ndim=1))


def test_too_many_elements():
    rejects(
        pack({}, [torch.zeros(101)]),
        "tensor of 101 elements exceeds the limit of 100",
        TensorLimits(max_elements=100),
    )
    assert (
        roundtrip(pack({}, [torch.zeros(10, 10)]), TensorLimits(max_elements=100)).tensors[0].numel() == 100
    )


def test_too_many_tensors():
    rejects(pack({}, [torch.zeros(1)] * 5), "more than 4 tensors in one message", TensorLimits())
    assert len(roundtrip(pack({}, [torch.zeros(1)] * 4), TensorLimits()).tensors) == 4


def test_total_bytes_exceeded():
    limits = TensorLimits(max_total_bytes=1000)
    rejects(pack({}, [torch.zeros(251)]), "message exceeds 1000 bytes", limits)
    rejects(pack({}, [torch.zeros(200), torch.zeros(200)]), "message exceeds 1000 bytes", limits)
    assert roundtrip(pack({}, [torch.zeros(250)]), limits).num_bytes == 1000


def test_chunk_without_header():
    rejects(
        [runtime_pb2.ExpertRequest(metadata=msgpack.packb({}), tensors=[chunk(b"\x00" * 8)])],
        "tensor chunk without a header",
    )


def test_header_declaring_too_many_elements():
    huge = header([1 << 20, 1 << 20], buffer=b"\x00" * 16, chunks=1)
    rejects([runtime_pb2.ExpertRequest(tensors=[huge])], "tensor of 1099511627776 elements exceeds the limit")


def test_header_declaring_no_chunks():
    rejects(
        [runtime_pb2.ExpertRequest(tensors=[header([2], buffer=b"\x00" * 8, chunks=0)])],
        "tensor header declares no chunks",
    )


def test_buffer_larger_than_declared_shape():
    # two float32 elements may not bring kilobytes of buffer: stopped at the chunk that crosses the budget
    lie = [header([2], buffer=b"\x00" * 8, chunks=3), chunk(b"\x00" * 8192), chunk(b"\x00" * 8192)]
    rejects(
        [runtime_pb2.ExpertRequest(tensors=lie)], "tensor buffer is larger than its declared shape allows"
    )
    rejects(
        [runtime_pb2.ExpertRequest(tensors=[header([2], buffer=b"\x00" * 10_000)])],
        "larger than its declared shape allows",
    )
    rejects(
        [runtime_pb2.ExpertRequest(tensors=[header([2], dtype="bfloat16", buffer=b"\x00" * 10_000)])],
        "larger than its declared shape allows",
    )
    # int64 ids: 8 bytes each, so a [4096]-token header may carry 32 KiB but not 64 KiB
    assert roundtrip(pack({}, [torch.zeros(4096, dtype=torch.int64)])).tensors[0].numel() == 4096
    rejects(
        [runtime_pb2.ExpertRequest(tensors=[header([4096], dtype="int64", buffer=b"\x00" * 65536)])],
        "larger than its declared shape allows",
    )


def test_chunk_count_mismatch():
    fewer = [header([4], buffer=b"\x00" * 8, chunks=2)]
    rejects([runtime_pb2.ExpertRequest(tensors=fewer)], "tensor declared 2 chunks but 1 arrived")
    followed = fewer + [header([1], buffer=b"\x00" * 4)]
    rejects([runtime_pb2.ExpertRequest(tensors=followed)], "tensor declared 2 chunks but 1 arrived")
    more = [header([4], buffer=b"\x00" * 8, chunks=1), chunk(b"\x00" * 8)]
    rejects([runtime_pb2.ExpertRequest(tensors=more)], "tensor declared 1 chunks but more arrived")


def test_corrupt_tensor_buffer():
    short = header([4], buffer=b"\x00" * 12)  # 3 floats for a shape of 4
    rejects([runtime_pb2.ExpertRequest(tensors=[short])], "cannot decode tensor")


def test_corrupt_metadata():
    rejects([runtime_pb2.ExpertRequest(metadata=b"\xc1")], "undecodable metadata")
    rejects([runtime_pb2.ExpertRequest(metadata=b"\x92\x01")], "undecodable metadata")  # truncated array
    rejects([runtime_pb2.ExpertRequest(metadata=msgpack.packb([1, 2]))], "metadata must be a map")
    rejects([runtime_pb2.ExpertRequest(metadata=msgpack.packb("text"))], "metadata must be a map")
    big = msgpack.packb({"pad": "x" * 100})
    rejects(
        [runtime_pb2.ExpertRequest(metadata=big)],
        f"metadata of {len(big)} bytes exceeds the limit",
        TensorLimits(max_metadata_bytes=64),
    )


def test_metadata_only_on_first_message():
    messages = pack({"a": 1}, [torch.randn(1024)], chunk_bytes=1024)
    messages[1].metadata = msgpack.packb({"b": 2})
    rejects(messages, "metadata may only ride on the first message")


def test_empty_stream():
    rejects([], "empty message")


def test_stops_reading_at_first_violation():
    consumed = []

    async def stream():
        for i, message in enumerate(pack({}, [torch.zeros(1, 1, 1, 1, 1, 1024)], chunk_bytes=64)):
            consumed.append(i)
            yield message

    with pytest.raises(TransportError, match="tensor rank 6 exceeds 4"):
        asyncio.run(receive(stream(), TensorLimits()))
    assert consumed == [0]


def test_limits_must_be_positive():
    for kwargs in (dict(max_tensors=0), dict(max_total_bytes=0), dict(max_elements=0)):
        with pytest.raises(ValueError, match="positive"):
            TensorLimits(**kwargs)


def test_transport_error_is_a_value_error():
    assert issubclass(TransportError, ValueError)


def test_zero_element_tensor_round_trip():
    """hivemind declares 0 chunks for an empty buffer: accepted for a tensor of no elements, and only for one."""
    out = roundtrip(pack({}, [torch.zeros(0, 4), torch.ones(2)])).tensors
    assert out[0].shape == (0, 4) and torch.equal(out[1], torch.ones(2))
    lie = pack({}, [torch.ones(3)])
    lie[0].tensors[0].chunks = 0
    rejects(lie, "declares no chunks")


def test_a_flood_of_empty_messages_or_chunks_is_refused():
    """Measured from outside before: a stream of empty chunks grew a stage peer's RSS by 478 MiB for 3.8 MiB on the
    wire. Empty stream messages are refused after a few, and a tensor may not be split into more chunks than its
    size allows at MIN_CHUNK_BYTES each."""
    from swarm.transport import MIN_CHUNK_BYTES

    first = pack({"a": 1}, [torch.zeros(4)])
    rejects(
        first + [runtime_pb2.ExpertRequest() for _ in range(TensorLimits().max_empty_messages + 1)],
        "empty stream messages",
    )
    budget = 16 * 4 + 4096
    rejects(
        [runtime_pb2.ExpertRequest(tensors=[header([16], chunks=2 + budget // MIN_CHUNK_BYTES)])],
        "declared in",
    )


@pytest.mark.parametrize("compression", ["none", "float16", "meanstd16"])
def test_a_sender_knows_what_its_receiver_decodes(compression):
    """Digests in signed hop reports are taken over what the receiver decodes (``as_received``); codecs in
    ``IDEMPOTENT`` give the same values when a decoded tensor is sent on again (a relay keeps its digest)."""
    from swarm.protocol import tensor_digest
    from swarm.transport import IDEMPOTENT, as_received

    t = torch.randn(2, 8, 16)
    (received,) = asyncio.run(
        receive(aiter_messages(pack({}, [t], compression=compression)), TensorLimits())
    ).tensors
    assert tensor_digest(received) == tensor_digest(as_received(t, compression))
    again = as_received(received, compression)
    assert (tensor_digest(again) == tensor_digest(received)) == (compression in IDEMPOTENT)
    ids = torch.randint(0, 9, (2, 8))
    assert as_received(ids, compression) is ids
