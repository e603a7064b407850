"""Compressed weights (issue 12): how a model's F32 tensors are encoded to travel, and
deltas from a base both sides hold.

Pure functions over state dicts, float32 in and float32 out, deterministic (nearest
rounding, no randomness), so a simulation and a real run give the same bits. The
payload tensors each encoding makes are listed in protos/jetfed/v1/weights.proto
(`payload_spec` derives them from the model's tensors, so a receiver checks a
manifest before reading its bytes); every tensor that is not F32 travels raw and
whole, in a delta too.

Decoding trusts nothing: shapes, scales (finite, not negative) and top-k indices (in
range, strictly increasing: no duplicate, no out-of-bounds write) are checked and a
break is a BadEncoding naming the tensor. The bytes themselves were checked by
jetfed.codec's safetensors reader before any of this runs.

Top-k keeps what it did not send as an error-feedback residual (Seide et al. 2014,
Stich et al. 2018): the next round's delta adds it back, so no update is lost, only
delayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from jetfed.codec import StateDict, TensorInfo
from jetfed.errors import BadStream, InvalidConfig, ManifestMismatch

RAW = "raw"
FP16 = "fp16"
BF16 = "bf16"
INT8 = "int8"
INT8_CHANNEL = "int8-channel"
TOPK = "topk"
KINDS = (RAW, FP16, BF16, INT8, INT8_CHANNEL, TOPK)
SCALE_PREFIX = "scale/"
INDEX_PREFIX = "index/"
MASK_PREFIX = "mask/"
FULL = "full"
DELTA = "delta"
INT8_MAX = 127
SETTING = "uplink_encoding"
_SYNTAX = "raw, fp16, bf16, int8, int8-channel or topk:<fraction in (0, 1]> (e.g. topk:0.01)"


class BadEncoding(BadStream):
    """Encoded tensors that break their encoding's rules (INVALID_ARGUMENT)."""


class UnknownEncoding(ManifestMismatch):
    """An encoding or payload content this peer does not know (FAILED_PRECONDITION):
    refused, never read as another."""


@dataclass(frozen=True)
class Encoding:
    """One of KINDS; `fraction` is top-k's share of each tensor's elements."""

    kind: str = RAW
    fraction: float = 0.0

    @classmethod
    def parse(cls, text: str, setting: str = SETTING) -> "Encoding":
        """'raw', 'fp16', 'bf16', 'int8', 'int8-channel' or 'topk:<fraction>'."""
        kind, _, rest = str(text).strip().partition(":")
        if kind == TOPK:
            try:
                fraction = float(rest)
            except ValueError:
                raise InvalidConfig(f"{setting}: {text!r} is not one of {_SYNTAX}") from None
            return cls(TOPK, fraction).validated(setting)
        if kind in KINDS and not rest:
            return cls(kind)
        raise InvalidConfig(f"{setting}: {text!r} is not one of {_SYNTAX}")

    def validated(self, setting: str = SETTING) -> "Encoding":
        if self.kind not in KINDS:
            raise UnknownEncoding(f"{setting}: encoding {self.kind!r} is not one this peer knows ({', '.join(KINDS)})")
        if self.kind == TOPK and not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise InvalidConfig(f"{setting}: top-k fraction {self.fraction} must be in (0, 1] (e.g. topk:0.01)")
        if self.kind != TOPK and self.fraction != 0:
            raise InvalidConfig(f"{setting}: a fraction ({self.fraction}) comes only with topk")
        return self

    def __str__(self) -> str:
        return f"{TOPK}:{self.fraction!r}" if self.kind == TOPK else self.kind

    @property
    def is_raw(self) -> bool:
        return self.kind == RAW


RAW_ENCODING = Encoding()


def encodes(info: TensorInfo) -> bool:
    """Whether an encoding applies to this tensor (F32); every other travels raw."""
    return info.dtype == "F32"


def topk_count(numel: int, fraction: float) -> int:
    """k for a tensor of `numel` elements: ceil(fraction x numel), at least 1 (0 for an
    empty tensor), at most numel."""
    if numel == 0:
        return 0
    return max(1, min(numel, math.ceil(fraction * numel)))


def _numel(shape: Tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def uses_mask(numel: int, k: int) -> bool:
    """Whether top-k's positions travel as a bitmask (numel bits) rather than as k
    int32 indices: whichever is smaller, the indices on a tie."""
    return (numel + 7) // 8 < 4 * k


def _channels(shape: Tuple[int, ...]) -> int:
    """Scales of an int8-channel tensor: one per slice of the first dimension for two
    dimensions or more, else one."""
    return shape[0] if len(shape) >= 2 else 1


def payload_spec(spec: Tuple[TensorInfo, ...], encoding: Encoding) -> Tuple[TensorInfo, ...]:
    """The payload tensors `encoding` makes of a model with tensors `spec`, sorted by
    name as a manifest lists them."""
    out = []
    for info in spec:
        if not encodes(info) or encoding.kind == RAW:
            out.append(info)
        elif encoding.kind == FP16:
            out.append(TensorInfo(info.name, "F16", info.shape))
        elif encoding.kind == BF16:
            out.append(TensorInfo(info.name, "BF16", info.shape))
        elif encoding.kind in (INT8, INT8_CHANNEL):
            out.append(TensorInfo(info.name, "I8", info.shape))
            scales = _channels(info.shape) if encoding.kind == INT8_CHANNEL else 1
            out.append(TensorInfo(SCALE_PREFIX + info.name, "F32", (scales,)))
        elif encoding.kind == TOPK:
            k = topk_count(_numel(info.shape), encoding.fraction)
            out.append(TensorInfo(info.name, "I8", (k,)))
            numel = _numel(info.shape)
            if uses_mask(numel, k):
                out.append(TensorInfo(MASK_PREFIX + info.name, "U8", ((numel + 7) // 8,)))
            else:
                out.append(TensorInfo(INDEX_PREFIX + info.name, "I32", (k,)))
            out.append(TensorInfo(SCALE_PREFIX + info.name, "F32", (1,)))
        else:
            raise UnknownEncoding(f"encoding: {encoding.kind!r} is not one this peer knows ({', '.join(KINDS)})")
    return tuple(sorted(out, key=lambda t: t.name))


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round x / scale to the nearest int8 in -127..127; a zero scale gives zeros."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / safe), -INT8_MAX, INT8_MAX).to(torch.int8)


def encode(state: Mapping[str, torch.Tensor], encoding: Encoding) -> StateDict:
    """The payload tensors of `state` under `encoding` (CPU, contiguous)."""
    out: StateDict = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if tensor.dtype != torch.float32 or encoding.kind == RAW:
            out[name] = tensor.contiguous()
        elif encoding.kind in (FP16, BF16):
            half = tensor.to(torch.float16 if encoding.kind == FP16 else torch.bfloat16)
            if not bool(torch.isfinite(half).all()) and bool(torch.isfinite(tensor).all()):
                raise BadEncoding(f"encode: tensor {name!r} holds values beyond {encoding.kind}'s range "
                                  f"(max |x| {float(tensor.abs().max()):g}); use another encoding")
            out[name] = half.contiguous()
        elif encoding.kind in (INT8, INT8_CHANNEL):
            if encoding.kind == INT8_CHANNEL and tensor.dim() >= 2:
                rows = tensor.reshape(tensor.shape[0], -1)
                scale = rows.abs().amax(dim=1) / INT8_MAX if rows.shape[1] else torch.zeros(rows.shape[0])
                q = _quantize(rows, scale.unsqueeze(1)).reshape(tensor.shape)
            else:
                scale = (tensor.abs().max() / INT8_MAX).reshape(1) if tensor.numel() else torch.zeros(1)
                q = _quantize(tensor, scale)
            out[name] = q.contiguous()
            out[SCALE_PREFIX + name] = scale.to(torch.float32).contiguous()
        elif encoding.kind == TOPK:
            flat = tensor.reshape(-1)
            k = topk_count(flat.numel(), encoding.fraction)
            if k:
                index = torch.topk(flat.abs(), k, sorted=False).indices
                index = torch.sort(index).values
            else:
                index = torch.zeros(0, dtype=torch.int64)
            values = flat[index]
            scale = (values.abs().max() / INT8_MAX).reshape(1) if k else torch.zeros(1)
            out[name] = _quantize(values, scale).contiguous()
            if uses_mask(flat.numel(), k):
                out[MASK_PREFIX + name] = _pack_mask(index, flat.numel())
            else:
                out[INDEX_PREFIX + name] = index.to(torch.int32).contiguous()
            out[SCALE_PREFIX + name] = scale.to(torch.float32).contiguous()
        else:
            raise UnknownEncoding(f"encoding: {encoding.kind!r} is not one this peer knows ({', '.join(KINDS)})")
    return out


def _take(payload: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: Tuple[int, ...]) -> torch.Tensor:
    tensor = payload.get(name)
    if tensor is None:
        raise BadEncoding(f"payload: tensor {name!r} is missing")
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise BadEncoding(f"payload: tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, "
                          f"expected {dtype}{list(shape)}")
    return tensor


def _scales(payload: Mapping[str, torch.Tensor], name: str, count: int) -> torch.Tensor:
    scale = _take(payload, SCALE_PREFIX + name, torch.float32, (count,))
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise BadEncoding(f"payload: {SCALE_PREFIX}{name} holds a scale that is NaN, infinite or negative")
    return scale


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def decode(payload: Mapping[str, torch.Tensor], spec: Tuple[TensorInfo, ...], encoding: Encoding) -> StateDict:
    """The model tensors (`spec`) a payload encoded with `encoding` holds, F32 ones as
    fresh float32 tensors; refuses a payload that breaks the encoding (BadEncoding)."""
    expected = {t.name for t in payload_spec(spec, encoding)}
    extra = sorted(set(payload) - expected)
    if extra:
        raise BadEncoding(f"payload: unexpected tensors {extra[:5]} for encoding {encoding}")
    out: StateDict = {}
    for info in spec:
        name, shape = info.name, tuple(info.shape)
        if not encodes(info) or encoding.kind == RAW:
            out[name] = _take(payload, name, _DTYPES[info.dtype], shape)
        elif encoding.kind in (FP16, BF16):
            half = torch.float16 if encoding.kind == FP16 else torch.bfloat16
            out[name] = _take(payload, name, half, shape).to(torch.float32)
        elif encoding.kind in (INT8, INT8_CHANNEL):
            q = _take(payload, name, torch.int8, shape)
            channels = _channels(shape) if encoding.kind == INT8_CHANNEL else 1
            scale = _scales(payload, name, channels)
            if channels > 1 or (encoding.kind == INT8_CHANNEL and len(shape) >= 2):
                out[name] = (q.reshape(shape[0], -1).to(torch.float32) * scale.unsqueeze(1)).reshape(shape)
            else:
                out[name] = q.to(torch.float32) * scale
        elif encoding.kind == TOPK:
            numel = _numel(shape)
            k = topk_count(numel, encoding.fraction)
            q = _take(payload, name, torch.int8, (k,))
            scale = _scales(payload, name, 1)
            if uses_mask(numel, k):
                index = _unpack_mask(_take(payload, MASK_PREFIX + name, torch.uint8, ((numel + 7) // 8,)), numel, k,
                                     MASK_PREFIX + name)
            else:
                index = _take(payload, INDEX_PREFIX + name, torch.int32, (k,)).to(torch.int64)
            if k and (int(index.min()) < 0 or int(index.max()) >= numel):
                raise BadEncoding(f"payload: {INDEX_PREFIX}{name} holds an index outside 0..{numel - 1}")
            if k > 1 and not bool((index[1:] > index[:-1]).all()):
                raise BadEncoding(f"payload: {INDEX_PREFIX}{name} is not strictly increasing "
                                  "(a repeated or unordered index)")
            flat = torch.zeros(numel, dtype=torch.float32)
            flat[index] = q.to(torch.float32) * scale
            out[name] = flat.reshape(shape)
        else:
            raise UnknownEncoding(f"encoding: {encoding.kind!r} is not one this peer knows ({', '.join(KINDS)})")
    return out


_BITS = torch.arange(8, dtype=torch.uint8)


def _pack_mask(index: torch.Tensor, numel: int) -> torch.Tensor:
    """Positions as a bitmask: bit i (least significant first) of byte j is element 8j+i."""
    bits = torch.zeros(((numel + 7) // 8) * 8, dtype=torch.uint8)
    bits[index] = 1
    return (bits.reshape(-1, 8) << _BITS).sum(dim=1).to(torch.uint8).contiguous()


def _unpack_mask(mask: torch.Tensor, numel: int, k: int, name: str) -> torch.Tensor:
    """The increasing positions a bitmask marks; refused unless exactly k are marked,
    none past the tensor's end."""
    bits = ((mask.unsqueeze(1) >> _BITS) & 1).reshape(-1)
    if bool(bits[numel:].any()):
        raise BadEncoding(f"payload: {name} marks positions past the tensor's {numel} elements")
    index = torch.nonzero(bits[:numel]).reshape(-1)
    if index.numel() != k:
        raise BadEncoding(f"payload: {name} marks {index.numel()} positions, not the {k} top-k sends")
    return index


def delta(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> StateDict:
    """trained - base for every F32 tensor (float32, on the CPU); every other tensor as
    trained holds it."""
    out: StateDict = {}
    for name, tensor in trained.items():
        tensor = tensor.detach().to("cpu")
        if tensor.dtype == torch.float32:
            out[name] = tensor - base[name].to("cpu", torch.float32)
        else:
            out[name] = tensor
    return out


def apply_delta(base: Mapping[str, torch.Tensor], difference: Mapping[str, torch.Tensor]) -> StateDict:
    """base + difference for every F32 tensor; every other tensor as the difference
    carries it (its full value)."""
    out: StateDict = {}
    for name, tensor in difference.items():
        if tensor.dtype == torch.float32:
            out[name] = base[name].to("cpu", torch.float32) + tensor
        else:
            out[name] = tensor.clone()
    return out


@dataclass(frozen=True)
class Encoded:
    """A delta encoded to travel, and what its sender keeps: the residual (top-k's
    error feedback, None for other encodings) and what the receiver will decode."""

    payload: StateDict
    residual: Optional[StateDict]
    sent: StateDict


def encode_delta(
    trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], encoding: Encoding,
    residual: Optional[Mapping[str, torch.Tensor]] = None,
) -> Encoded:
    """Encode trained - base. With top-k, the residual of earlier rounds is added first
    and what is not sent this time (the delta less what the receiver decodes, top-k's
    dropped elements and its int8 rounding) becomes the new residual."""
    difference = delta(trained, base)
    if encoding.kind == TOPK and residual is not None:
        for name, carried in residual.items():
            if name in difference and difference[name].dtype == torch.float32:
                difference[name] = difference[name] + carried.to("cpu", torch.float32)
    payload = encode(difference, encoding)
    spec = tuple(TensorInfo(n, _name_of(t.dtype), tuple(t.shape)) for n, t in sorted(difference.items()))
    sent = decode(payload, spec, encoding)
    kept = None
    if encoding.kind == TOPK:
        kept = {name: difference[name] - sent[name] for name in difference if difference[name].dtype == torch.float32}
    return Encoded(payload, kept, sent)


def _name_of(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise BadEncoding(f"dtype {dtype} cannot travel as safetensors")


def payload_bytes(spec: Tuple[TensorInfo, ...]) -> int:
    """The tensors' data bytes (without the safetensors header): for ratios."""
    sizes: Dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                             "BOOL": 1}
    return sum(sizes[t.dtype] * _numel(t.shape) for t in spec)


def chain_id(base_id: str, delta_sha256: str) -> str:
    """The id of the weights a delta payload (SHA-256 `delta_sha256`) rebuilds from the
    weights `base_id` names: both sides compute it from what crossed, no re-encoding."""
    import hashlib

    return hashlib.sha256(f"{base_id}+{delta_sha256}".encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Held:
    """Weights a peer holds, by id: a full payload's SHA-256, or `chain_id` of the
    weights a delta was applied to and the delta's payload. A delta names its base by
    this id (WeightManifest.base_sha256)."""

    id: str
    state: StateDict


def received_weights(held: Optional[Held], content: str, encoding: Encoding, base_sha256: str, payload_sha256: str,
                     received: Mapping[str, torch.Tensor], spec: Tuple[TensorInfo, ...]) -> Held:
    """The whole weights a checked payload carries, and their id: as received when full
    and raw; else decoded and, for a delta, added to `held` (which must be the base it
    names: UnknownBase otherwise)."""
    if content == FULL and encoding.is_raw:
        return Held(payload_sha256, dict(received))
    tensors = decode(received, spec, encoding)
    if content == FULL:
        return Held(payload_sha256, tensors)
    if held is None or held.id != base_sha256:
        raise UnknownBase(f"manifest.base_sha256: a delta from weights '{base_sha256[:16]}', which this peer does "
                          "not hold; send full weights")
    return Held(chain_id(held.id, payload_sha256), apply_delta(held.state, tensors))


class UnknownBase(ManifestMismatch):
    """A delta from weights the receiver does not hold (FAILED_PRECONDITION): the
    sender falls back to full weights."""
