"""The one border between protobuf messages and plain Python objects, plus the
header-then-chunks stream discipline shared by every weight-carrying RPC."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

from google.protobuf.message import DecodeError

from jetfed import compression, stream
from jetfed.codec import Manifest, TensorInfo
from jetfed.config import TrainConfig
from jetfed.errors import BadStream, JetfedError, StreamStalled
from jetfed.status import echo
from jetfed.v1 import training_pb2, weights_pb2, worker_pb2

M = TypeVar("M")

# Far above any model in the registry (resnet18 has 122 tensors, mobilenet_v3_small
# 244), far below what a 4 MiB header can list: the manifest's objects are built only
# under this bound, and codec.check_manifest then demands the served model's exact set.
MAX_MANIFEST_TENSORS = 4096

_OPTIMIZERS = {"sgd": training_pb2.OPTIMIZER_SGD, "adam": training_pb2.OPTIMIZER_ADAM}
_LOSSES = {"nll": training_pb2.LOSS_NLL}
_ENCODINGS = {
    compression.RAW: weights_pb2.ENCODING_RAW, compression.FP16: weights_pb2.ENCODING_FP16,
    compression.BF16: weights_pb2.ENCODING_BF16, compression.INT8: weights_pb2.ENCODING_INT8,
    compression.INT8_CHANNEL: weights_pb2.ENCODING_INT8_CHANNEL, compression.TOPK: weights_pb2.ENCODING_TOPK,
}
_ENCODING_NAMES = {value: name for name, value in _ENCODINGS.items()}
_ENCODING_NAMES[weights_pb2.ENCODING_UNSPECIFIED] = compression.RAW
_CONTENTS = {compression.FULL: weights_pb2.PAYLOAD_CONTENT_FULL, compression.DELTA: weights_pb2.PAYLOAD_CONTENT_DELTA}
_CONTENT_NAMES: Dict[int, str] = {value: name for name, value in _CONTENTS.items()}
_CONTENT_NAMES[weights_pb2.PAYLOAD_CONTENT_UNSPECIFIED] = compression.FULL


def encoding_to_proto(encoding: compression.Encoding) -> weights_pb2.WeightEncoding:
    return weights_pb2.WeightEncoding(kind=_ENCODINGS[encoding.kind], topk_fraction=encoding.fraction)


def encoding_from_proto(message: weights_pb2.WeightEncoding, field: str) -> compression.Encoding:
    """An encoding this peer knows, else UnknownEncoding (FAILED_PRECONDITION) naming
    the field and the value: a newer peer's encoding is refused, never misread."""
    kind = _ENCODING_NAMES.get(message.kind)
    if kind is None:
        raise compression.UnknownEncoding(
            f"{field}.kind: encoding {message.kind} is not one this peer knows ({', '.join(compression.KINDS)}); "
            "upgrade it, or ask for one of those"
        )
    return compression.Encoding(kind, message.topk_fraction).validated(field)


def manifest_to_proto(manifest: Manifest) -> weights_pb2.WeightManifest:
    return weights_pb2.WeightManifest(
        model=manifest.model,
        format=manifest.format,
        tensors=[
            weights_pb2.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape))
            for t in manifest.tensors
        ],
        total_bytes=manifest.total_bytes,
        sha256=manifest.sha256,
        content=_CONTENTS[manifest.content],
        encoding=weights_pb2.WeightEncoding(kind=_ENCODINGS[manifest.encoding], topk_fraction=manifest.topk_fraction),
        base_sha256=manifest.base_sha256,
        base_round=manifest.base_round,
    )


def manifest_from_proto(message: weights_pb2.WeightManifest) -> Manifest:
    if len(message.tensors) > MAX_MANIFEST_TENSORS:
        raise BadStream(
            f"manifest.tensors: {len(message.tensors)} listed, more than the {MAX_MANIFEST_TENSORS} a manifest may hold"
        )
    encoding = encoding_from_proto(message.encoding, "manifest.encoding")
    return Manifest(
        model=message.model,
        format=message.format,
        tensors=tuple(
            sorted(
                (TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in message.tensors),
                key=lambda t: t.name,
            )
        ),
        total_bytes=message.total_bytes,
        sha256=message.sha256,
        content=_content_from_proto(message.content),
        encoding=encoding.kind,
        topk_fraction=encoding.fraction,
        base_sha256=message.base_sha256,
        base_round=message.base_round,
    )


def _content_from_proto(value: int) -> str:
    content = _CONTENT_NAMES.get(value)
    if content is None:
        raise compression.UnknownEncoding(
            f"manifest.content: payload content {value} is not one this peer knows (full, delta); upgrade it"
        )
    return content


def config_to_proto(config: TrainConfig) -> training_pb2.TrainConfig:
    return training_pb2.TrainConfig(
        optimizer=_OPTIMIZERS[config.optimizer],
        loss=_LOSSES[config.loss],
        lr=config.lr,
        momentum=config.momentum,
        batch_size=config.batch_size,
        max_batches=config.max_batches,
        epochs=config.epochs,
        seed=config.seed,
        proximal_mu=config.proximal_mu,
        scaffold=config.scaffold,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        dp_delta=config.dp_delta,
        epsilon_budget=config.epsilon_budget,
        uplink_encoding=encoding_to_proto(compression.Encoding.parse(config.uplink_encoding)),
    )


def config_from_proto(message: training_pb2.TrainConfig) -> TrainConfig:
    """Decode and validate; unknown enum values fail with the field's name."""
    optimizer = {v: k for k, v in _OPTIMIZERS.items()}.get(message.optimizer)
    loss = {v: k for k, v in _LOSSES.items()}.get(message.loss)
    return TrainConfig(
        optimizer=optimizer if optimizer else f"<enum {message.optimizer}>",
        loss=loss if loss else f"<enum {message.loss}>",
        lr=message.lr,
        momentum=message.momentum,
        batch_size=message.batch_size,
        max_batches=message.max_batches,
        epochs=message.epochs,
        seed=message.seed,
        proximal_mu=message.proximal_mu,
        scaffold=message.scaffold,
        noise_multiplier=message.noise_multiplier,
        max_grad_norm=message.max_grad_norm,
        dp_delta=message.dp_delta,
        epsilon_budget=message.epsilon_budget,
        uplink_encoding=str(encoding_from_proto(message.uplink_encoding, "config.uplink_encoding")),
    ).validated()


def weight_messages(
    head: M, payload: Union[bytes, bytearray], chunk_bytes: int, wrap_chunk: Optional[Callable[[weights_pb2.WeightChunk], M]] = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Iterator[M]:
    """The header message, then the payload as ordered chunks; `on_bytes` learns each
    chunk's size as gRPC takes it (so a call cut short counts only what left).

    Without `wrap_chunk`, each chunk is a message of the header's type whose `chunk`
    field is filled in place: the chunk's bytes are copied into it once, where
    wrapping a WeightChunk copies them twice."""
    yield head
    for offset, data in stream.split(payload, chunk_bytes):
        on_bytes(len(data))
        if wrap_chunk is None:
            message: Any = type(head)()  # the header's message type, which has a chunk field
            message.chunk.offset = offset
            message.chunk.data = data
            yield message
        else:
            yield wrap_chunk(weights_pb2.WeightChunk(offset=offset, data=data))


# Serialized chunk messages: (the chunk's data bytes, the message's wire bytes).
SerializedChunks = List[Tuple[int, bytes]]


def serialized_chunks(payload: Union[bytes, bytearray], chunk_bytes: int) -> SerializedChunks:
    """The payload's chunk messages, serialized once, to be written as they are to any
    number of calls (`pass_serialized`): every weight-carrying message (TrainRequest,
    EvaluateRequest, TrainResponse, InitialWeightsResponse) carries its WeightChunk as
    field 2 of its oneof, so one serialization is every stream's chunk."""
    return [
        (len(data), worker_pb2.TrainRequest(chunk=weights_pb2.WeightChunk(offset=offset, data=data)).SerializeToString())
        for offset, data in stream.split(payload, chunk_bytes)
    ]


def serialized_messages(head: Any, chunks: SerializedChunks, on_bytes: Callable[[int], None] = lambda n: None,
                        ) -> Iterator[Any]:
    """The header message, then the chunks already serialized, for a call whose
    request serializer is `pass_serialized`; `on_bytes` as in `weight_messages`."""
    yield head
    for size, message in chunks:
        on_bytes(size)
        yield message


def pass_serialized(message: Any) -> bytes:
    """A request serializer that writes bytes (a serialized chunk) as they are and
    serializes any other message."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


async def read_weight_stream(
    messages: AsyncIterator[Any], head_field: str, max_bytes: int, timeout: Optional[float] = None,
    check_head: Callable[[Any, Manifest], None] = lambda head, manifest: None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Tuple[Any, Manifest, stream.Received]:
    """Read a header-then-chunks stream; returns the header, its manifest and the
    assembled payload (a stream.Received, hashed as it arrived: pass its sha256 to
    codec.decode).

    `check_head(head, manifest)` (which may raise) and the size limit judge the header
    before any chunk is buffered, so a wrong model or an oversized stream costs the
    receiver nothing; a stream that takes longer than `timeout` seconds is abandoned.
    `on_bytes` learns each chunk's size as it arrives. A message that is not valid
    protobuf is a BadStream, like any other break of the protocol.
    """
    try:
        return await asyncio.wait_for(
            _read_weight_stream(_parsed(messages), head_field, max_bytes, check_head, on_bytes), timeout
        )
    except asyncio.TimeoutError:
        raise StreamStalled(f"{head_field}: the weight stream did not complete within {timeout:.0f}s") from None


async def _read_weight_stream(
    messages: AsyncIterator[Any], head_field: str, max_bytes: int, check_head: Callable[[Any, Manifest], None],
    on_bytes: Callable[[int], None],
) -> Tuple[Any, Manifest, stream.Received]:
    head = None
    manifest = None
    assembler = None
    async for message in messages:
        kind = message.WhichOneof("kind")
        if head is None:
            if kind != head_field:
                raise BadStream(f"{head_field}: the first message must carry the {head_field}, got {kind}")
            head = getattr(message, head_field)
            manifest = manifest_from_proto(head.manifest)
            assembler = stream.PayloadAssembler(manifest.total_bytes, max_bytes)
            try:
                check_head(head, manifest)
            except JetfedError:
                await _discard(messages)
                raise
        elif kind == "chunk":
            chunk = message.chunk
            data = chunk.data  # read once: each read of a bytes field copies it
            on_bytes(len(data))
            assert assembler is not None  # made with the head
            assembler.add(chunk.offset, data)
        else:
            raise BadStream(f"{kind}: only chunks may follow the {head_field}")
    if head is None or manifest is None or assembler is None:
        raise BadStream(f"{head_field}: the stream ended before the {head_field}")
    return head, manifest, assembler.finish()


async def _parsed(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`messages` with grpc's deserialization failure (raised by the request iterator,
    before any servicer code sees the message) turned into a BadStream."""
    count = 0
    try:
        async for message in messages:
            count += 1
            yield message
    except DecodeError as exc:
        raise BadStream(f"stream: message {count + 1} is not valid protobuf ({echo(str(exc))})") from None


async def _discard(messages: AsyncIterator[Any]) -> None:
    """Read the rest unbuffered once the stream is refused: a gRPC client still writing
    when the call ends sees INTERNAL instead of the refusal (grpc/grpc#36066). A garbage
    message ends the discarding; the refusal already found stands."""
    try:
        async for _ in messages:
            pass
    except BadStream:
        pass
