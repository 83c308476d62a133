"""The sparse-input products (`sparsebptt.kernels.sparse_input.cpu`): the CSR of a mostly-zero
input, its projection and weight gradient against the matmul, on random seeded inputs."""
from __future__ import annotations

import pytest
import torch

from sparsebptt.kernels.sparse_input.cpu import SparseRows
from sparsebptt.testing import assert_close, seeded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37, 19, 23), (160, 64, 256), (300, 40, 100), (1, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("values", ["spikes", "events"])
def test_sparse_rows_products_equal_the_matmul(dtype, shape, bias, values):
    """Currents from the rows of W^T at the nonzeros, and dW from the rows of dL/di at them, equal
    the dense products (vector tails: H and K off every block size); spikes (all 1) or values."""
    R, K, H = shape
    x = seeded(1, R, K, dtype=dtype, kind="spikes", p=0.2)
    if values == "events":
        x = x * seeded(5, R, K, dtype=dtype)
    W, b, d = seeded(2, H, K, dtype=dtype), seeded(3, H, dtype=dtype) if bias else None, seeded(4, R, H, dtype=dtype)
    rows = SparseRows.of(x, keep=True)
    assert rows is not None and rows.col.numel() == int(x.count_nonzero())
    assert (rows.val is None) == bool(((x == 0) | (x == 1)).all())
    out = torch.empty(R, H, dtype=dtype)
    rows.project(W, b, out)
    ref = x @ W.t() + (b if bias else 0)
    assert_close("currents", ref, out, dtype)
    assert_close("dW", d.t() @ x, rows.weight_grad(d), dtype)


def test_sparse_rows_of_a_row_do_not_depend_on_the_others():
    """A row's currents are summed in one fixed order whatever rows come with it, so a recomputed
    segment repeats the forward's currents bit for bit however the scan was cut."""
    x = seeded(5, 96, 70, dtype=torch.float32, kind="spikes", p=0.15)
    W, b = seeded(6, 50, 70, dtype=torch.float32), seeded(7, 50, dtype=torch.float32)
    whole = torch.empty(96, 50)
    SparseRows.of(x, keep=False).project(W, b, whole)
    for a, c in ((0, 10), (10, 13), (13, 96)):
        part = torch.empty(c - a, 50)
        SparseRows.of(x[a:c].contiguous(), keep=False).project(W, b, part)
        assert torch.equal(part, whole[a:c])
    x[3, 4] = 2.5  # a value: the same row sums, times the values
    ones = torch.empty(96, 50)
    SparseRows.of(x, keep=False).project(W, b, ones)
    assert torch.equal(ones[:3], whole[:3]) and torch.equal(ones[4:], whole[4:])


def test_sparse_rows_stop_counting_above_the_density_asked():
    x = seeded(8, 40, 30, kind="spikes", p=0.5)
    assert SparseRows.of(x, keep=False, max_density=0.25) is None
    assert SparseRows.of(x, keep=False, max_density=0.75) is not None
    x[0, 0] = float("nan")  # a NaN is a nonzero with a value: it reaches the currents as in a matmul
    out = torch.empty(40, 3, dtype=torch.float64)
    SparseRows.of(x, keep=False).project(seeded(9, 3, 30), None, out)
    assert out[0].isnan().all() and not out[1:].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_part_of_the_rows_gives_those_rows_products(dtype):
    """`SparseRows.part` (a range of rows, nothing copied): its currents are those rows' of the
    whole, bit for bit, and the weight gradients of the parts add up to the whole's."""
    x = seeded(20, 90, 40, dtype=dtype, kind="spikes", p=0.1) * seeded(21, 90, 40, dtype=dtype)
    W, b, d = seeded(22, 33, 40, dtype=dtype), seeded(23, 33, dtype=dtype), seeded(24, 90, 33, dtype=dtype)
    rows = SparseRows.of(x, keep=True)
    whole = torch.empty(90, 33, dtype=dtype)
    rows.project(W, b, whole)
    dw = None
    for a, c in ((0, 7), (7, 8), (8, 90)):
        out = torch.empty(c - a, 33, dtype=dtype)
        part = rows.part(a, c)
        assert part.R == c - a
        part.project(W, b, out)
        assert torch.equal(out, whole[a:c])
        dw = part.weight_grad(d[a:c].contiguous(), into=dw)
    assert_close("dW", d.t() @ x, dw, dtype)
