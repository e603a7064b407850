"""The weight codec: state_dicts travel and rest as safetensors, described by a
manifest that is checked before a single tensor is handed to a model.

Nothing here unpickles: safetensors holds raw tensor bytes with explicit names, dtypes
and shapes, so a hostile payload can be wrong but never executes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from jetfed.errors import BadStream, CorruptPayload, ManifestMismatch, NonFiniteWeights
from jetfed.status import echo

FORMAT = "safetensors"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# safetensors: an 8-byte little-endian length, a JSON header padded with spaces to a
# multiple of 8 bytes, then the tensors' raw bytes.
_LENGTH_BYTES = 8
_ALIGNMENT = 8
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# The order safetensors writes tensors in (then by name), so `encode` gives the bytes
# safetensors' own writer gives; every tensor then starts aligned to its item size.
_WRITE_ORDER = {"I64": 0, "F64": 1, "F32": 2, "I32": 3, "BF16": 4, "F16": 5, "I16": 6, "I8": 7, "U8": 8, "BOOL": 9}
# Payloads are received into a bytearray (jetfed.stream) and encoded into one.
Payload = Union[bytes, bytearray]

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

_DTYPES: Dict[str, torch.dtype] = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_FLOATING = ("F64", "F32", "F16", "BF16")

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
    # What the payload holds (jetfed.compression): "full" weights, or a "delta" from
    # the weights whose payload's SHA-256 is `base_sha256` (of round `base_round`);
    # its F32 tensors encoded as `encoding` says ("raw", "fp16", "bf16", "int8",
    # "int8-channel", "topk" keeping `topk_fraction` of each tensor).
    content: str = "full"
    encoding: str = "raw"
    topk_fraction: float = 0.0
    base_sha256: str = ""
    base_round: int = 0


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


def encode(state: Mapping[str, torch.Tensor], model: str) -> Tuple[Manifest, bytearray]:
    """Serialize a state_dict as safetensors (the bytes safetensors' own writer gives):
    tensors are moved to the CPU and copied once, straight into the payload, which is
    then hashed once. safetensors' `save` copied each tensor out and joined the copies."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    spec = spec_of(tensors)
    order = sorted(spec, key=lambda t: (_WRITE_ORDER[t.dtype], t.name))
    header: Dict[str, Any] = {}
    offset = 0
    for info in order:
        end = offset + _ITEM_BYTES[info.dtype] * _numel(info.shape)
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGNMENT)
    start = _LENGTH_BYTES + len(text)
    payload = bytearray(start + offset)
    payload[:start] = struct.pack("<Q", len(text)) + text
    if offset:
        address = ctypes.addressof(ctypes.c_char.from_buffer(payload))
        for info in order:
            begin, end = header[info.name]["data_offsets"]
            if end > begin:
                # memmove, not Tensor.copy_: no torch thread pool, whose wake-ups cost
                # more than the copy on a loaded board
                ctypes.memmove(address + start + begin, tensors[info.name].data_ptr(), end - begin)
    manifest = Manifest(model=model, tensors=spec, total_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
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


def decode(manifest: Manifest, payload: Payload, sha256: Optional[str] = None) -> StateDict:
    """Load a payload, proving it is exactly what its manifest announced.

    `sha256` is the payload's digest when the receiver hashed it as it arrived
    (stream.PayloadAssembler); without it the payload is hashed here. The tensors of a
    bytearray payload are views of its memory, not copies: neither may be written to
    afterwards (the payload would no longer match its manifest)."""
    if len(payload) != manifest.total_bytes:
        raise CorruptPayload(
            f"payload: {len(payload)} bytes received, manifest announced {manifest.total_bytes}"
        )
    return _decode(manifest, payload, sha256)[0]


def decode_finite(manifest: Manifest, payload: Payload, sha256: Optional[str] = None,
                  who: Optional[str] = None) -> StateDict:
    """`decode`, then `require_finite`, the way every receiver of weights needs them;
    with one reduction per run of same-typed tensors that lie side by side in the
    payload (resnet18: one for 11M floats instead of 102), the element-wise test only
    for the tensors of a run whose sum is not finite."""
    state, runs = _decode(manifest, payload, sha256)
    if runs is None:
        require_finite(state, who)
        return state
    for dtype, begin, end, names in runs:
        if dtype not in _FLOATING:
            continue
        item = _ITEM_BYTES[dtype]
        if begin % item == 0:
            flat = torch.frombuffer(payload, dtype=_DTYPES[dtype], count=(end - begin) // item, offset=begin)
            if bool(torch.isfinite(flat.sum())):
                continue
        require_finite({name: state[name] for name in names}, who)
    return state


Runs = List[Tuple[str, int, int, List[str]]]


def _decode(manifest: Manifest, payload: Payload, sha256: Optional[str]) -> Tuple[StateDict, Optional[Runs]]:
    """The checked state and, when its tensors map the payload, the runs of same-typed
    tensors side by side in it: (dtype, begin, end, names), offsets into the payload."""
    if len(payload) != manifest.total_bytes:
        raise CorruptPayload(
            f"payload: {len(payload)} bytes received, manifest announced {manifest.total_bytes}"
        )
    digest = sha256 if sha256 is not None else hashlib.sha256(payload).hexdigest()
    if digest != manifest.sha256:
        raise CorruptPayload(f"payload: sha256 {digest} does not match manifest '{echo(manifest.sha256)}'")
    state, runs = _load(payload)
    actual = spec_of(state)
    if actual != tuple(sorted(manifest.tensors, key=lambda t: t.name)):
        raise CorruptPayload("payload: tensors differ from the manifest's names, dtypes or shapes")
    return state, runs


def _load(payload: Payload) -> Tuple[StateDict, Optional[Runs]]:
    """safetensors' format, read and checked as safetensors' own loader does, into
    tensors that map the payload (a bytearray) instead of copying it. A bytes payload,
    or a big-endian machine, goes through safetensors' loader (one copy), without runs."""
    if isinstance(payload, bytes) or sys.byteorder != "little":
        try:
            return st_load(bytes(payload)), None
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CorruptPayload(f"payload: not a valid safetensors file: {exc}") from exc
    entries, start = _read_header(payload)
    state: StateDict = {}
    runs: Runs = []
    for name, dtype, shape, begin, end in entries:
        state[name] = _tensor_at(payload, dtype, shape, start + begin, end - begin)
        if runs and runs[-1][0] == dtype:
            runs[-1] = (dtype, runs[-1][1], start + end, runs[-1][3] + [name])
        else:
            runs.append((dtype, start + begin, start + end, [name]))
    return state, runs


def _read_header(payload: Payload) -> Tuple[List[Tuple[str, str, Tuple[int, ...], int, int]], int]:
    """The entries of a safetensors header (name, dtype, shape, data offsets) and where
    the data starts, refusing what safetensors refuses: a header past the payload, JSON
    that is no object of entries, an unknown dtype, offsets that disagree with a shape,
    and data that does not tile the rest of the payload exactly."""
    def bad(why: str) -> CorruptPayload:
        return CorruptPayload(f"payload: not a valid safetensors file: {why}")

    if len(payload) < _LENGTH_BYTES:
        raise bad(f"{len(payload)} bytes, shorter than the {_LENGTH_BYTES}-byte header length")
    (length,) = struct.unpack_from("<Q", payload, 0)
    start = _LENGTH_BYTES + length
    if start > len(payload):
        raise bad(f"the header's {length} bytes run past the payload's {len(payload)}")
    try:
        header = json.loads(bytes(payload[_LENGTH_BYTES:start]).decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the header is not JSON ({echo(str(exc))})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("__metadata__ is not a map of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor '{echo(name)}' is not an entry of dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise bad(f"tensor '{echo(name)}' has dtype '{echo(str(dtype))}'")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise bad(f"tensor '{echo(name)}' has a shape that is no list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor '{echo(name)}' has data_offsets that are no [begin, end]")
        if offsets[1] - offsets[0] != _ITEM_BYTES[dtype] * _numel(tuple(shape)):
            raise bad(f"tensor '{echo(name)}': data_offsets {offsets} do not hold {dtype}{shape}")
        entries.append((name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e[3], e[4]))
    covered = 0
    for name, _, _, begin, end in entries:
        if begin != covered:
            raise bad(f"tensor '{echo(name)}' starts at {begin}, not at {covered} (data overlaps or has gaps)")
        covered = end
    if start + covered != len(payload):
        raise bad(f"the tensors hold {covered} data bytes, the payload carries {len(payload) - start}")
    return entries, start


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a name is repeated")
    return result


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_at(payload: bytearray, dtype: str, shape: Tuple[int, ...], offset: int, size: int) -> torch.Tensor:
    """The tensor stored at payload[offset:offset + size], mapping that memory. A
    tensor whose bytes are misaligned for its type (safetensors' writer never does
    that), or a bool tensor (whose bytes must be 0 or 1), is copied."""
    if size == 0:
        return torch.empty(shape, dtype=_DTYPES[dtype])
    raw = torch.frombuffer(payload, dtype=torch.uint8, count=size, offset=offset)
    if dtype == "BOOL":
        return raw.ne(0).reshape(shape)
    if offset % _ITEM_BYTES[dtype]:
        raw = raw.clone()
    return raw.view(_DTYPES[dtype]).reshape(shape)


def require_finite(state: Mapping[str, torch.Tensor], who: Optional[str] = None) -> None:
    """NaN or Inf in any floating tensor makes the whole state unusable.

    One reduction per tensor: a sum that is finite proves every element finite (a NaN
    or an Inf makes any sum NaN or infinite); only a tensor whose sum is not finite,
    an overflow of finite values included, gets the element-wise test. That costs a
    tenth of isfinite(...).all() here, whose boolean temporaries and second pass take
    long on a loaded machine."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())):
            if not bool(torch.isfinite(tensor).all()):
                owner = f" from {who}" if who else ""
                raise NonFiniteWeights(f"weights{owner}: tensor {name!r} holds NaN or Inf")


def _few(names: list, limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(f"'{echo(n)}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
