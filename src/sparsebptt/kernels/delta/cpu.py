"""The "cpu" backend of Delta GRU / Delta LSTM: the delta-memory update over the active columns.

Delta cells run this backend step by step (no segment kernel: `DeltaGRU.scan_segment` is None
for it): each step's memory updates ``m' = m + W (d * mask)`` go through
`sparsebptt.kernels.sparse.sparse_linear`, whose forward and backward read only the active
columns of ``W`` and whose weight gradient accumulates along the chain of one memory's updates
(see that module). The result is the exact gradient of the thresholded forward (the reference,
``backend="torch"``, runs dense matmuls on the masked deltas). Any device; the batch's active
columns are shared as ``active_set`` says ("auto", "union", "sample").
"""
from __future__ import annotations

import torch

from ..sparse import sparse_linear

__all__ = ["delta_update"]


def delta_update(m: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                 active_set: str = "auto") -> torch.Tensor:
    """``m + W (d * mask)``: m [B, G*H], d and mask [B, n] (mask bool), weight [G*H, n]."""
    return sparse_linear(d, weight, mask, add_to=m, active_set=active_set)
