"""LIFNeuron's Triton path (the flattened elementwise recurrence) against its torch reference: on CPU
in Triton's interpreter (TRITON_INTERPRET=1, small shapes), on a CUDA device when there is one."""
from __future__ import annotations


import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton", reason="triton is not installed (optional: pip install triton)")

import sparsebptt as sb  # noqa: E402
from sparsebptt.kernels import backend as kb  # noqa: E402
from sparsebptt.testing import assert_close, seeded  # noqa: E402

kb._probes.pop("triton", None)  # probe again now that the interpreter is on
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=4)], ids=lambda s: s.to_string())
@pytest.mark.parametrize("learn_beta", [False, "channel"])
def test_lif_neuron_triton_equals_torch(learn_beta, strategy):
    dtype = torch.float64
    shape = (3, 4, 5)
    cells = [sb.cells.LIFNeuron(shape, beta=0.8, threshold=0.4, reset="zero", learn_beta=learn_beta,
                                backend=b).to(DEV, dtype) for b in ("torch", "triton")]
    assert cells[1].active_backend == "triton" and cells[1].scan_segment is not None
    x = (0.5 * seeded(0, 9, 2, *shape, dtype=dtype)).to(DEV)
    res = []
    for cell, st in zip(cells, [sb.FullBPTT(), strategy]):
        xx = x.clone().requires_grad_()
        z, (v,) = sb.scan(cell, xx, strategy=st)
        loss = (z * seeded(1, *z.shape, dtype=dtype).to(DEV)).sum() + v.sum()
        res.append([z, v] + list(torch.autograd.grad(loss, [xx] + list(cell.parameters()))))
    for name, a, b in zip(["z", "v", "dx", "dbeta"], *res):
        assert_close(name, a, b, dtype)
