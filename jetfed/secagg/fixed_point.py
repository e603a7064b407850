"""Fixed-point encoding of float updates into uint32 mod 2^32, the ring masks live in.

Masks are uniform in Z_{2^32}, so inputs must be integers there too. A coordinate is
clipped to [-clip, clip], scaled by a power of two (exact in float64), rounded half to
even and reduced mod 2^32 (two's complement). A sum of n encodings decodes exactly as
a signed 32-bit integer while n * clip * scale < 2^31; `for_fleet` keeps
`headroom_bits` more, so a garbage vector (uniform after unmasking) is caught by
`decode_sum`'s range check instead of being applied."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jetfed.secagg.errors import AggregateOutOfRange, SecAggConfigError

DEFAULT_HEADROOM_BITS = 4


@dataclass(frozen=True)
class FixedPoint:
    """The declared range (`clip`, per coordinate) and `scale` of the encoding."""

    clip: float
    scale: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggConfigError(f"secagg clip: {self.clip!r} must be a positive finite number")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise SecAggConfigError(f"secagg scale: {self.scale!r} must be a positive finite number")
        if self.per_worker_bound >= 1 << 31:
            raise SecAggConfigError(f"secagg: clip {self.clip} x scale {self.scale} does not fit one signed "
                                    "32-bit value; lower the scale")

    @classmethod
    def for_fleet(cls, clip: float, max_workers: int, *, headroom_bits: int = DEFAULT_HEADROOM_BITS) -> "FixedPoint":
        """The finest power-of-two scale for which `max_workers` inputs sum without
        overflow, with `headroom_bits` to spare."""
        if max_workers < 1:
            raise SecAggConfigError(f"secagg max_workers: {max_workers} must be at least 1")
        if not 0 <= headroom_bits < 30:
            raise SecAggConfigError(f"secagg headroom_bits: {headroom_bits} must be in 0..29")
        limit = (1 << (31 - headroom_bits)) - 1
        exponent = math.floor(math.log2(limit / (max_workers * clip)))
        scale = 2.0 ** exponent
        while max_workers * round(clip * scale) > limit:
            scale /= 2
        if scale * clip < 1:
            raise SecAggConfigError(f"secagg: {max_workers} workers with clip {clip} leave less than one "
                                    "integer step per coordinate; lower max_workers or raise clip")
        return cls(clip=float(clip), scale=scale)

    @property
    def per_worker_bound(self) -> int:
        """The largest |integer| one worker's coordinate encodes to."""
        return int(np.rint(self.clip * self.scale))

    def capacity(self) -> int:
        """How many inputs may be summed before the signed decoding overflows."""
        return ((1 << 31) - 1) // max(self.per_worker_bound, 1)

    def check_capacity(self, workers: int) -> None:
        """Refuse a round whose sum could wrap around."""
        if workers > self.capacity():
            raise SecAggConfigError(f"secagg: {workers} workers could overflow the sum (clip {self.clip}, "
                                    f"scale {self.scale} holds {self.capacity()}); declare a larger "
                                    "max_workers so the scale is chosen for it")

    def encode(self, values: np.ndarray) -> np.ndarray:
        """A float vector as uint32 (clipped; non-finite values are refused, not clipped)."""
        flat = np.array(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            raise SecAggConfigError("secagg: the update holds NaN or infinite values; it cannot be encoded")
        np.clip(flat, -self.clip, self.clip, out=flat)
        flat *= self.scale
        np.rint(flat, out=flat)
        return flat.astype(np.int64).astype(np.uint32)  # integer casts wrap: two's complement mod 2^32

    def to_signed(self, total: np.ndarray) -> np.ndarray:
        """A uint32 sum read as signed 32-bit integers (two's complement, no copy)."""
        return np.ascontiguousarray(total, dtype=np.uint32).view(np.int32)

    def decode_sum(self, total: np.ndarray, workers: int) -> np.ndarray:
        """The float64 sum of `workers` inputs from their uint32 sum; a coordinate
        beyond `workers * clip` proves some input was not an encoding."""
        self.check_capacity(workers)
        signed = self.to_signed(total)
        bound = workers * self.per_worker_bound
        outside = int(np.count_nonzero((signed > bound) | (signed < -bound)))
        if outside:
            raise AggregateOutOfRange(f"secagg: {outside} of {signed.size} coordinates of the sum of {workers} "
                                      f"inputs exceed {workers} x clip {self.clip}: a worker sent a vector "
                                      "that is not a masked encoding; the round's aggregate is refused")
        return signed.astype(np.float64) / self.scale
