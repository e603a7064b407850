"""What a worker masks and how the coordinator reads the sum back: the layout both
sides derive from the model alone, so nothing about it travels but its length.

The vector is the worker's update (trained minus the weights its Train carried), the
floating-point tensors in name order, each times the worker's weight, then the weight
itself as the last value. The coordinator learns only the sums, so the weighted mean
is `sum(w_u * delta_u) / sum(w_u)`, exactly FedAvg's when w_u is the worker's share of
examples (weight_unit > 0: w_u = n_u / weight_unit, at most 1), or the plain mean of
the deltas with equal weighting (w_u = 1). The weight is masked too, rather than taken
from the examples the worker reports in the clear: a worker cannot then weigh its
update in the sum differently from what the division assumes.

Integer tensors (counters) are not in the vector; the next global model keeps the
current one's (a plain round averages them)."""

from __future__ import annotations

from typing import List, Mapping, Tuple

import numpy as np
import torch

from jetfed.codec import StateDict, TensorInfo
from jetfed.secagg.errors import AggregateOutOfRange, ProtocolViolation

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def float_names(spec: Tuple[TensorInfo, ...]) -> List[str]:
    """The tensors the vector holds, in the order it holds them."""
    return sorted(t.name for t in spec if t.dtype in FLOAT_DTYPES)


def vector_length(spec: Tuple[TensorInfo, ...]) -> int:
    """The masked vector's length for a model: its floating-point values plus the weight."""
    names = set(float_names(spec))
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in spec if t.name in names) + 1


def weight_of(num_examples: int, weight_unit: float) -> float:
    """A worker's weight in the sum: its share of `weight_unit` examples, or 1 (equal weighting)."""
    if weight_unit <= 0:
        return 1.0
    if num_examples < 0:
        raise ProtocolViolation(f"secagg: {num_examples} examples")
    return min(num_examples / weight_unit, 1.0)


def update_vector(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], weight: float) -> np.ndarray:
    """weight x (trained - base) over the floating-point tensors in name order, then the weight (float64)."""
    names = sorted(n for n, t in base.items() if t.is_floating_point())
    parts = [((trained[n].detach().to("cpu", torch.float64) - base[n].detach().to("cpu", torch.float64)) * weight)
             .reshape(-1).numpy() for n in names]
    parts.append(np.array([weight], dtype=np.float64))
    return np.concatenate(parts)


def mean_state(global_state: Mapping[str, torch.Tensor], total: np.ndarray) -> Tuple[StateDict, float]:
    """The global model moved by the weighted mean update that `total` (the decoded sum
    of the survivors' vectors) holds, and the sum of their weights. A sum of weights that
    is not positive proves a vector was not a masked update: refused."""
    weights = float(total[-1])
    if not weights > 0:
        raise AggregateOutOfRange(f"secagg: the survivors' weights sum to {weights}; the aggregate is refused")
    state: StateDict = {}
    offset = 0
    for name in sorted(n for n, t in global_state.items() if t.is_floating_point()):
        tensor = global_state[name]
        size = tensor.numel()
        delta = torch.from_numpy(np.ascontiguousarray(total[offset:offset + size]) / weights).reshape(tensor.shape)
        state[name] = (tensor.to(torch.float64) + delta).to(tensor.dtype)
        offset += size
    if offset + 1 != total.size:
        raise AggregateOutOfRange(f"secagg: the sum holds {total.size} values, the model {offset + 1}")
    return {name: state.get(name, tensor) for name, tensor in global_state.items()}, weights
