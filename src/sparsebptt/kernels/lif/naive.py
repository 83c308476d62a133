"""The reference LIF recurrence: a plain loop over `lif_step`, the oracle of the fused kernels."""
from __future__ import annotations

from dataclasses import replace

import torch

from ...cells.base import run_steps
from ...cells.lif import LIFParams, lif_step

__all__ = ["naive_recurrent_lif"]


def naive_recurrent_lif(i: torch.Tensor, v0: torch.Tensor, beta, p: LIFParams):
    """``(z [L, B, H], v_T [B, H])`` from input currents ``i`` [L, B, H] and membrane ``v0`` [B, H],
    one `lif_step` per time step under autograd. ``beta``: float or [H] tensor."""
    if not isinstance(beta, torch.Tensor):
        p, beta = replace(p, beta=float(beta)), None
    zs, v = run_steps(lambda i_t, v: lif_step(i_t, v, p, beta), i, v0)
    return torch.stack(zs), v
