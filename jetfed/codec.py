"""The weight codec: state_dicts travel and rest as safetensors, described by a
manifest that is checked before a single tensor is handed to a model.

Nothing here unpickles: safetensors holds raw tensor bytes with explicit names, dtypes
and shapes, so a hostile payload can be wrong but never executes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from jetfed.errors import BadStream, CorruptPayload, ManifestMismatch, NonFiniteWeights
from jetfed.status import echo

FORMAT = "safetensors"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# safetensors: an 8-byte little-endian length, a JSON header padded with spaces to a
# multiple of 8 bytes, then the tensors' raw bytes.
_LENGTH_BYTES = 8
_ALIGNMENT = 8
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

_DTYPE_NAMES: Dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """What a payload holds; `tensors` is sorted by name so manifests compare equal."""

    model: str
    tensors: Tuple[TensorInfo, ...]
    total_bytes: int
    sha256: str
    format: str = FORMAT


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ManifestMismatch(f"dtype {dtype} cannot travel as safetensors") from None


def spec_of(state: Mapping[str, torch.Tensor]) -> Tuple[TensorInfo, ...]:
    """The names, dtypes and shapes of a state_dict, sorted by name."""
    return tuple(
        TensorInfo(name, dtype_name(t.dtype), tuple(t.shape))
        for name, t in sorted(state.items())
    )


def spec_digest(spec: Tuple[TensorInfo, ...]) -> str:
    """SHA-256 of a spec: equal digests, weights that load into each other's model. It
    travels in GetInfo so a fleet's architectures are compared before any weights."""
    text = "\n".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in spec)
    return hashlib.sha256(text.encode()).hexdigest()


def encode(state: Mapping[str, torch.Tensor], model: str) -> Tuple[Manifest, bytes]:
    """Serialize a state_dict; tensors are moved to the CPU and made contiguous."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    payload = st_save(tensors)
    manifest = Manifest(
        model=model,
        tensors=spec_of(tensors),
        total_bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    return manifest, payload


def payload_size_range(spec: Tuple[TensorInfo, ...]) -> Tuple[int, int]:
    """The smallest and largest size `encode` can give a state with this spec: its
    tensors' bytes are fixed, only the JSON header varies (the digits of the data
    offsets, which depend on the writer's tensor order, and the padding)."""
    data = sum(_ITEM_BYTES[t.dtype] * _numel(t.shape) for t in spec)
    shortest = _LENGTH_BYTES + data + _header_json_bytes(spec, offset_digits=1)
    longest = _LENGTH_BYTES + data + _header_json_bytes(spec, offset_digits=len(str(data))) + _ALIGNMENT - 1
    return shortest, longest


def check_manifest(manifest: Manifest, model: str, expected: Tuple[TensorInfo, ...]) -> None:
    """Refuse weights meant for another model, or a manifest that cannot describe its
    payload, before reading their bytes. Every check is one pass over the tensors, whose
    count wire.manifest_from_proto has already bounded."""
    if manifest.format != FORMAT:
        raise ManifestMismatch(f"manifest.format: '{echo(manifest.format)}' is not {FORMAT!r}")
    if manifest.model != model:
        raise ManifestMismatch(f"manifest.model: got '{echo(manifest.model)}', this service runs {model!r}")
    if not SHA256_HEX.fullmatch(manifest.sha256):
        raise BadStream(
            f"manifest.sha256: expected 64 lower-case hex digits, got {len(manifest.sha256)} characters "
            f"'{echo(manifest.sha256)}'"
        )
    _check_tensors(manifest, expected)
    _check_total(manifest, expected)


def _check_tensors(manifest: Manifest, expected: Tuple[TensorInfo, ...]) -> None:
    got = {t.name: t for t in manifest.tensors}
    if len(got) != len(manifest.tensors):
        repeated, times = Counter(t.name for t in manifest.tensors).most_common(1)[0]
        raise BadStream(
            f"manifest.tensors: {len(manifest.tensors)} listed but {len(got)} distinct names "
            f"('{echo(repeated)}' {times} times)"
        )
    want = {t.name: t for t in expected}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ManifestMismatch(
            f"manifest.tensors: missing {_few(missing)}, unexpected {_few(extra)}"
        )
    for name, info in want.items():
        if got[name] != info:
            raise ManifestMismatch(
                f"manifest.tensors[{name!r}]: got {echo(got[name].dtype + str(list(got[name].shape)))}, "
                f"expected {info.dtype}{list(info.shape)}"
            )


def _check_total(manifest: Manifest, expected: Tuple[TensorInfo, ...]) -> None:
    """A total no payload of these tensors can have: refused before a byte is buffered
    (without this, a stream could carry the margin of the size limit for nothing)."""
    shortest, longest = payload_size_range(expected)
    if not shortest <= manifest.total_bytes <= longest:
        raise BadStream(
            f"manifest.total_bytes: {manifest.total_bytes} announced, but a safetensors payload of these "
            f"tensors is {shortest}..{longest} bytes"
        )


def _numel(shape: Tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _header_json_bytes(spec: Tuple[TensorInfo, ...], offset_digits: int) -> int:
    """The length of safetensors' compact JSON header for `spec`, unpadded, with every
    data offset written in `offset_digits` digits."""
    entries = (
        len(json.dumps(t.name, ensure_ascii=False).encode("utf-8"))
        + len(f':{{"dtype":"{t.dtype}","shape":[{",".join(str(d) for d in t.shape)}],"data_offsets":[,]}}')
        + 2 * offset_digits
        for t in spec
    )
    return 2 + sum(entries) + max(len(spec) - 1, 0)


def decode(manifest: Manifest, payload: bytes) -> StateDict:
    """Load a payload, proving it is exactly what its manifest announced."""
    if len(payload) != manifest.total_bytes:
        raise CorruptPayload(
            f"payload: {len(payload)} bytes received, manifest announced {manifest.total_bytes}"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.sha256:
        raise CorruptPayload(f"payload: sha256 {digest} does not match manifest '{echo(manifest.sha256)}'")
    try:
        state = st_load(bytes(payload))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptPayload(f"payload: not a valid safetensors file: {exc}") from exc
    actual = spec_of(state)
    if actual != tuple(sorted(manifest.tensors, key=lambda t: t.name)):
        raise CorruptPayload("payload: tensors differ from the manifest's names, dtypes or shapes")
    return state


def require_finite(state: Mapping[str, torch.Tensor], who: Optional[str] = None) -> None:
    """NaN or Inf in any floating tensor makes the whole state unusable."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            owner = f" from {who}" if who else ""
            raise NonFiniteWeights(f"weights{owner}: tensor {name!r} holds NaN or Inf")


def _few(names: list, limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(f"'{echo(n)}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
