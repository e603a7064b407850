"""Float64 arithmetic over float32 models, a cache-sized block at a time.

The coordinator's per-update work (an update's delta norm, folding it into the
round's exact sum) is a handful of elementwise passes over the model in float64.
Over whole tensors each pass streams the model through memory and allocates a
float64 temporary; a block's scratch tensors instead stay in a core's L2 cache (1 MiB
here), where the passes cost a tenth (mnist-cnn, measured: TwoSum 2.6 ms an update
instead of 10-26 ms). Each element goes through the same operations in the same
order as over whole tensors, so the results are the same bits; only a reduction (the
norm's sum of squares) sums in another order.

The passes are numpy's ufuncs on the same memory (torch's CPU tensors share it): the
same IEEE float64 operations, at a fifth of torch's per-call cost, which at a block's
size is a fifth of the pass (TwoSum on mnist-cnn: 2.3-2.9 -> 1.8-1.9 ms an update,
same bits)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

# Elements per block: three to four float64 scratch blocks of 256 KiB fit in L2.
BLOCK = 32768


class Scratch:
    """Reusable float64 blocks (one set per user: not shared across threads)."""

    def __init__(self, count: int) -> None:
        self._blocks = torch.empty(count * BLOCK, dtype=torch.float64)
        self._arrays = self._blocks.numpy()
        self._count = count
        self._views: Dict[int, Tuple[np.ndarray, ...]] = {}

    def blocks(self, size: int) -> Tuple[np.ndarray, ...]:
        """`count` float64 arrays of `size` (≤ BLOCK) elements, uninitialised; the
        views are made once per size (a model has few), not once per block."""
        views = self._views.get(size)
        if views is None:
            views = self._views[size] = tuple(self._arrays[i * BLOCK:i * BLOCK + size] for i in range(self._count))
        return views


def _flat(values: torch.Tensor) -> np.ndarray:
    """`values` as a flat array (a view where it can be). numpy has no bfloat16: such a
    tensor is widened to float32 first, which is exact, as its float64 is."""
    if values.dtype == torch.bfloat16:
        values = values.float()
    return values.reshape(-1).numpy()


def squared_distance(values: torch.Tensor, base: torch.Tensor, scratch: Scratch) -> float:
    """sum((values - base)^2) in float64, without a model-sized temporary."""
    flat, origin = _flat(values), _flat(base)
    total = 0.0
    for start in range(0, flat.size, BLOCK):
        end = min(start + BLOCK, flat.size)
        delta = scratch.blocks(end - start)[0]
        np.subtract(flat[start:end], origin[start:end], out=delta, dtype=np.float64)
        square = torch.from_numpy(delta)
        total += float(torch.dot(square, square))  # torch's reduction order, as before
    return total


def add_scaled(acc: torch.Tensor, values: torch.Tensor, factor: float, scratch: Scratch) -> None:
    """acc += values * factor, values widened to float64 first, in place: what
    `acc += values.to(torch.float64) * factor` gives, bit for bit, without its two
    float64 temporaries of the tensor's size (resnet18's largest: 19 MB each).
    `acc` is a contiguous float64 tensor of values' element count."""
    target, flat = acc.view(-1).numpy(), _flat(values)
    for start in range(0, target.size, BLOCK):
        end = min(start + BLOCK, target.size)
        term = scratch.blocks(end - start)[0]
        np.multiply(flat[start:end], factor, out=term, dtype=np.float64)
        np.add(target[start:end], term, out=target[start:end])


def two_sum_fold(hi: torch.Tensor, lo: torch.Tensor, values: torch.Tensor, weight: float, scratch: Scratch,
                 *, base: Optional[torch.Tensor] = None, scale: float = 1.0) -> None:
    """hi, lo += term by Knuth's TwoSum, in place, where term is values * weight, or
    ((values - base) * scale) * weight when `base` is given (all in float64, rounded
    as those expressions round over whole tensors):
    total = hi + term; virtual = total - hi;
    lo += (hi - (total - virtual)) + (term - virtual); hi = total.
    `hi` and `lo` are contiguous float64 tensors of values' element count."""
    high, low = hi.view(-1).numpy(), lo.view(-1).numpy()
    flat = _flat(values)
    origin = None if base is None else _flat(base)
    for start in range(0, high.size, BLOCK):
        end = min(start + BLOCK, high.size)
        term, total, virtual, error = scratch.blocks(end - start)
        h, lo_block = high[start:end], low[start:end]
        if origin is None:
            np.multiply(flat[start:end], weight, out=term, dtype=np.float64)
        else:  # both widened to float64, then subtracted
            np.subtract(flat[start:end], origin[start:end], out=term, dtype=np.float64)
            np.multiply(term, scale, out=term)
            np.multiply(term, weight, out=term)
        np.add(h, term, out=total)
        np.subtract(total, h, out=virtual)
        np.subtract(term, virtual, out=term)          # term - virtual
        np.subtract(total, virtual, out=error)        # total - virtual
        np.subtract(h, error, out=error)              # hi - (total - virtual)
        np.add(error, term, out=error)                # the error of this addition
        np.add(lo_block, error, out=lo_block)
        np.copyto(h, total)
