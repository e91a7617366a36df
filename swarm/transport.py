"""Tensor messages over hivemind P2P: packing, streaming, compression, and limits enforced while receiving.

A message is a small msgpack metadata dict plus a list of tensors. Tensors are serialized with hivemind's
codecs (optional FLOAT16 / 8-bit compression) and split into chunks, so a message of any size streams
without hitting libp2p's unary message cap. The receiver checks every tensor header (dtype, rank, element
count, declared vs. actual bytes) *before* reassembling it and stops reading as soon as a limit is crossed,
so an oversized or malformed message costs the receiver almost nothing and is answered with a reason.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

Message = Union[runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse]

COMPRESSION = {
    "none": runtime_pb2.CompressionType.NONE,
    "float16": runtime_pb2.CompressionType.FLOAT16,
    "meanstd16": runtime_pb2.CompressionType.MEANSTD_16BIT,
    "uniform8": runtime_pb2.CompressionType.UNIFORM_8BIT,
    "blockwise8": runtime_pb2.CompressionType.BLOCKWISE_8BIT,
}
# serialized bytes per element; hivemind sends bfloat16 as float32 by default (USE_LEGACY_BFLOAT16=1)
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 4, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


MIN_CHUNK_BYTES = (
    1024  # a sender may split a tensor into chunks no smaller than this on average (ours: 1 MiB)
)


class TransportError(ValueError):
    """A message that breaks the protocol or the receiver's limits; the text is sent back to the sender."""


@dataclass(kw_only=True)
class TensorLimits:
    """What a receiver accepts. Checked on headers before any buffer is assembled."""

    max_tensors: int = 4
    max_ndim: int = 4
    max_elements: int = 2**28  # per tensor
    max_total_bytes: int = 1 << 30  # per message, serialized
    max_metadata_bytes: int = 1 << 16
    # stream messages that carry nothing (each costs the receiver far more than its bytes on the wire): a stream of
    # them is refused after this many
    max_empty_messages: int = 16
    dtypes: Tuple[str, ...] = ("float32", "float16", "bfloat16", "int64")

    def __post_init__(self) -> None:
        if self.max_tensors < 1 or self.max_total_bytes < 1 or self.max_elements < 1:
            raise ValueError("tensor limits must be positive")


@dataclass
class Received:
    """A received message: metadata, tensors and how many serialized bytes arrived."""

    metadata: Dict[str, Any]
    tensors: List[torch.Tensor]
    num_bytes: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


def limits_for(microbatch_size: int, seq_len: int, hidden_size: int, slack: float = 1.25) -> TensorLimits:
    """What a stage peer of a swarm accepts: one micro-batch of float32 activations [microbatch, seq, hidden] (or
    int64 token ids), with ``slack`` for framing, and nothing larger."""
    elements = microbatch_size * seq_len * max(hidden_size, 2)
    return TensorLimits(max_elements=elements, max_total_bytes=int(elements * 4 * slack) + (1 << 20))


def pack(
    metadata: Dict[str, Any],
    tensors: Sequence[torch.Tensor] = (),
    *,
    compression: str = "none",
    chunk_bytes: int = 1 << 20,
    message_type: Type[Message] = runtime_pb2.ExpertRequest,
) -> List[Message]:
    """Serialize metadata and tensors into a list of stream messages (metadata rides on the first one)."""
    codec = COMPRESSION[compression]
    parts: List[runtime_pb2.Tensor] = []
    for tensor in tensors:
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        parts.extend(split_for_streaming(_serialize(tensor, codec), chunk_bytes))
    meta = msgpack.packb(metadata, use_bin_type=True)
    if not parts:
        return [message_type(metadata=meta)]
    messages = [message_type(tensors=[part]) for part in parts]
    messages[0].metadata = meta
    return messages


def _serialize(tensor: torch.Tensor, codec: int) -> runtime_pb2.Tensor:
    """One CPU tensor as hivemind's wire tensor. Integer tensors (token ids) are never lossy-compressed. bfloat16
    goes as its own 2 bytes, uncompressed, whatever the codec: hivemind's lossy codecs refuse it, and its default
    sends it as float32 (twice the bytes; USE_LEGACY_BFLOAT16). hivemind's decoder reads both forms."""
    if tensor.dtype == torch.bfloat16:
        return runtime_pb2.Tensor(
            compression=runtime_pb2.CompressionType.NONE,
            buffer=tensor.contiguous().view(torch.int16).numpy().tobytes(),
            size=tensor.shape,
            dtype="bfloat16",
            requires_grad=False,
        )
    return serialize_torch_tensor(
        tensor, codec if tensor.is_floating_point() else runtime_pb2.CompressionType.NONE
    )


def as_received(tensor: torch.Tensor, compression: str = "none") -> torch.Tensor:
    """What a receiver decodes from ``tensor`` sent with ``compression`` (the tensor itself without it, or for
    tensors that are never compressed): the bytes a digest of a sent tensor must be taken over."""
    codec = COMPRESSION[compression]
    if (
        codec == runtime_pb2.CompressionType.NONE
        or not tensor.is_floating_point()
        or tensor.dtype == torch.bfloat16
    ):
        return tensor
    return deserialize_torch_tensor(_serialize(tensor.detach().cpu(), codec))


# codecs whose decoding, encoded again, gives the same values back (a relayed tensor keeps its digest)
IDEMPOTENT = frozenset({"none", "float16"})


async def aiter_messages(messages: Iterable[Message]) -> AsyncIterator[Message]:
    for message in messages:
        yield message


async def single(message: Message) -> AsyncIterator[Message]:
    """A unary message as a one-item stream, so unary and streamed messages go through :func:`receive`."""
    yield message


def _check_header(part: runtime_pb2.Tensor, limits: TensorLimits) -> int:
    """Validate a tensor's first chunk (its header) and return the number of bytes its buffer may hold."""
    if part.dtype not in limits.dtypes:
        raise TransportError(f"dtype {part.dtype!r} not accepted (allowed: {', '.join(limits.dtypes)})")
    if len(part.size) > limits.max_ndim:
        raise TransportError(f"tensor rank {len(part.size)} exceeds {limits.max_ndim}")
    numel = math.prod(part.size) if len(part.size) else 1
    if numel > limits.max_elements:
        raise TransportError(f"tensor of {numel} elements exceeds the limit of {limits.max_elements}")
    if part.chunks < 1 and not (part.chunks == 0 and numel == 0):  # hivemind declares 0 for an empty buffer
        raise TransportError("tensor header declares no chunks")
    budget = numel * _ITEMSIZE.get(part.dtype, 8) + 4096 + 8 * numel // 256
    if part.chunks > 1 + budget // MIN_CHUNK_BYTES:  # a tensor in a flood of tiny (or empty) chunks
        raise TransportError(
            f"tensor of {budget} bytes declared in {part.chunks} chunks (at least "
            f"{MIN_CHUNK_BYTES} bytes each, please)"
        )
    # the serialized buffer of an uncompressed tensor is exactly numel * itemsize; codecs only shrink it
    # (plus a few bytes of statistics), so anything beyond that is a lie about the shape
    return budget


async def receive(stream: AsyncIterator[Message], limits: TensorLimits) -> Received:
    """Read a whole message from a stream, enforcing ``limits`` as the chunks arrive."""
    metadata: Optional[Dict[str, Any]] = None
    tensors: List[torch.Tensor] = []
    current: List[runtime_pb2.Tensor] = []
    expected_chunks, byte_budget, current_bytes, total_bytes = 0, 0, 0, 0

    def finish_current() -> None:
        nonlocal current
        if not current:
            return
        if len(current) != expected_chunks:
            raise TransportError(f"tensor declared {expected_chunks} chunks but {len(current)} arrived")
        try:
            tensor = deserialize_torch_tensor(combine_from_streaming(current))
        except Exception as e:  # corrupt buffers raise various errors inside codecs
            raise TransportError(f"cannot decode tensor: {type(e).__name__}: {e}") from e
        if tuple(tensor.shape) != tuple(current[0].size):
            raise TransportError(f"decoded shape {tuple(tensor.shape)} != declared {tuple(current[0].size)}")
        tensors.append(tensor)
        current = []

    empty = 0
    async for message in stream:
        if metadata is not None and not message.tensors and not message.metadata:
            empty += 1
            if empty > limits.max_empty_messages:
                raise TransportError(f"more than {limits.max_empty_messages} empty stream messages")
        if metadata is None:
            if len(message.metadata) > limits.max_metadata_bytes:
                raise TransportError(f"metadata of {len(message.metadata)} bytes exceeds the limit")
            try:
                metadata = msgpack.unpackb(message.metadata, raw=False) if message.metadata else {}
            except Exception as e:
                raise TransportError(f"undecodable metadata: {type(e).__name__}") from e
            if not isinstance(metadata, dict):
                raise TransportError("metadata must be a map")
        elif message.metadata:
            raise TransportError("metadata may only ride on the first message")
        for part in message.tensors:
            total_bytes += len(part.buffer)
            if total_bytes > limits.max_total_bytes:
                raise TransportError(f"message exceeds {limits.max_total_bytes} bytes")
            if part.dtype:  # a header: a new tensor begins
                finish_current()
                if len(tensors) >= limits.max_tensors:
                    raise TransportError(f"more than {limits.max_tensors} tensors in one message")
                byte_budget = _check_header(part, limits)
                expected_chunks, current_bytes = max(part.chunks, 1), 0
            elif not current:
                raise TransportError("tensor chunk without a header")
            current_bytes += len(part.buffer)
            if current_bytes > byte_budget:
                raise TransportError("tensor buffer is larger than its declared shape allows")
            current.append(part)
            if len(current) > expected_chunks:
                raise TransportError(f"tensor declared {expected_chunks} chunks but more arrived")
    finish_current()
    if metadata is None:
        raise TransportError("empty message")
    return Received(metadata=metadata, tensors=tensors, num_bytes=total_bytes)


async def call(method, messages: List[Message], limits: TensorLimits, timeout: Optional[float]) -> Received:
    """Call a stream->stream RPC with a deadline covering sending, remote work and receiving the reply."""

    async def _call() -> Received:
        return await receive(await method(aiter_messages(messages)), limits)

    return await asyncio.wait_for(_call(), timeout=timeout)
