"""coordinator.blockwise runs TwoSum a cache-sized block at a time: every element must
go through the same float64 operations as over whole tensors (the same bits), across
block edges, for scalars, integer buffers, and deltas from a base."""

import torch

from coordinator.blockwise import BLOCK, Scratch, add_scaled, squared_distance, two_sum_fold


def whole_tensor_fold(hi, lo, values, weight, base=None, scale=1.0):
    term = values.to(torch.float64)
    if base is not None:
        term = (term - base.to(torch.float64)) * scale
    term = term * weight
    total = hi + term
    virtual = total - hi
    return total, lo + ((hi - (total - virtual)) + (term - virtual))


def test_fold_is_the_whole_tensor_arithmetic_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    scratch = Scratch(4)
    for shape in [(), (7,), (BLOCK,), (BLOCK + 1,), (3, BLOCK // 2 + 5)]:
        hi = torch.randn(shape, generator=generator, dtype=torch.float64) * 1e3
        lo = torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-13
        values = torch.randn(shape, generator=generator) * 10.0 ** torch.randint(-8, 8, shape, generator=generator)
        base = torch.randn(shape, generator=generator)
        for kwargs in ({}, {"base": base, "scale": 0.37}):
            expected_hi, expected_lo = whole_tensor_fold(hi, lo, values, 13.0, **kwargs)
            got_hi, got_lo = hi.clone(), lo.clone()
            two_sum_fold(got_hi, got_lo, values, 13.0, scratch, **kwargs)
            assert torch.equal(got_hi, expected_hi) and torch.equal(got_lo, expected_lo), (shape, kwargs)


def test_fold_of_an_integer_buffer_sums_it_as_floats():
    hi, lo = torch.tensor([5.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    two_sum_fold(hi, lo, torch.tensor([7], dtype=torch.int64), 3.0, Scratch(4))
    assert hi.item() == 26.0 and lo.item() == 0.0


def test_fold_keeps_what_float64_addition_rounds_away():
    hi, lo = torch.tensor([1e16], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    two_sum_fold(hi, lo, torch.tensor([1.0]), 1.0, Scratch(4))
    assert hi.item() == 1e16 and lo.item() == 1.0  # 1e16 + 1 is not a float64


def test_squared_distance_matches_the_whole_tensor_sum():
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(3 * BLOCK + 11, generator=generator)
    base = torch.randn(3 * BLOCK + 11, generator=generator)
    expected = float((values.to(torch.float64) - base.to(torch.float64)).pow(2).sum())
    got = squared_distance(values, base, Scratch(2))
    assert abs(got - expected) <= 1e-12 * expected
    assert squared_distance(values, values.clone(), Scratch(2)) == 0.0


def test_add_scaled_is_the_whole_tensor_arithmetic_bit_for_bit():
    generator = torch.Generator().manual_seed(7)
    scratch = Scratch(1)
    for shape in [(), (7,), (BLOCK,), (BLOCK + 1,), (3, BLOCK // 2 + 5)]:
        acc = torch.randn(shape, generator=generator, dtype=torch.float64) * 1e3
        values = torch.randn(shape, generator=generator) * 10.0 ** torch.randint(-8, 8, shape, generator=generator)
        for tensor in (values, values.to(torch.bfloat16), (values * 1e3).to(torch.int64)):
            expected = acc + tensor.to(torch.float64) * 0.3721
            got = acc.clone()
            add_scaled(got, tensor, 0.3721, scratch)
            assert torch.equal(got, expected), (shape, tensor.dtype)
