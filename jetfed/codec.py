"""The weight codec: state_dicts travel and rest as safetensors, described by a
manifest that is checked before a single tensor is handed to a model.

Nothing here unpickles: safetensors holds raw tensor bytes with explicit names, dtypes
and shapes, so a hostile payload can be wrong but never executes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from jetfed.errors import CorruptPayload, ManifestMismatch, NonFiniteWeights

FORMAT = "safetensors"

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


def check_manifest(manifest: Manifest, model: str, expected: Tuple[TensorInfo, ...]) -> None:
    """Refuse weights meant for another model before reading their bytes."""
    if manifest.format != FORMAT:
        raise ManifestMismatch(f"manifest.format: {manifest.format!r} is not {FORMAT!r}")
    if manifest.model != model:
        raise ManifestMismatch(f"manifest.model: got {manifest.model!r}, this service runs {model!r}")
    got = {t.name: t for t in manifest.tensors}
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
                f"manifest.tensors[{name!r}]: got {got[name].dtype}{list(got[name].shape)}, "
                f"expected {info.dtype}{list(info.shape)}"
            )


def decode(manifest: Manifest, payload: bytes) -> StateDict:
    """Load a payload, proving it is exactly what its manifest announced."""
    if len(payload) != manifest.total_bytes:
        raise CorruptPayload(
            f"payload: {len(payload)} bytes received, manifest announced {manifest.total_bytes}"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.sha256:
        raise CorruptPayload(f"payload: sha256 {digest} does not match manifest {manifest.sha256}")
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
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
