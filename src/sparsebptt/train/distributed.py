"""Data-parallel training with `torch.distributed` (DDP), as started by ``torchrun``.

``torchrun --nproc_per_node=N -m sparsebptt train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` set; `setup` joins them into a process
group (gloo on CPU, NCCL on CUDA, one GPU per process: ``cuda:LOCAL_RANK``). Every process draws
the same global batch from the run's seed and keeps its share (`shard`), so N processes see the
examples one process would, in the same order. The loss of a share is its summed cross-entropy
times ``N / global_batch``: DDP averages the gradients over the N processes, which gives exactly
the gradient of the mean loss over the global batch, whatever the shares' sizes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["Dist", "setup", "teardown", "shard", "share_loss", "all_sum", "broadcast_object",
           "launched_by_torchrun", "resolve_device"]


@dataclass
class Dist:
    """Where this process stands: ``rank`` of ``world`` processes, training on ``device``.
    ``owns_group`` is True if `setup` created the process group (and `teardown` destroys it)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment says this is one of several processes (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def resolve_device(device: "str | torch.device") -> torch.device:
    """``device`` as a `torch.device`; ValueError (one line) if it does not parse or is absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid devices are: cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch {torch.__version__} sees no CUDA "
                             "device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: {torch.cuda.device_count()} CUDA "
                             f"device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported by the trainer; valid devices are: cpu, cuda, "
                         "cuda:N")
    return dev


def setup(device: "str | torch.device" = "cpu") -> Dist:
    """Join the process group torchrun described (if any) and pick this process's device.

    A single process (no ``WORLD_SIZE`` > 1 and no initialised group) gets ``Dist(0, 1, device)``.
    Under torchrun with a CUDA ``device`` each process takes ``cuda:LOCAL_RANK``.
    """
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), _local_device(dev), owns_group=False)
    if not launched_by_torchrun():
        return Dist(0, 1, dev)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = _local_device(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns_group=True)


def _local_device(dev: torch.device) -> torch.device:
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def teardown(d: Dist, finished: bool = False) -> None:
    """Destroy the process group `setup` made. ``finished`` (the run ended normally on this rank):
    wait for every rank first, so no rank tears gloo down while another still talks to it (that
    aborted a process: "terminate called without an active exception"); after an error no barrier,
    since the other ranks may never reach it."""
    if d.owns_group and dist.is_initialized():
        if finished and d.enabled:
            dist.barrier()
        dist.destroy_process_group()


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int):
    """This process's share of a global batch: ``(x[:, part], y[part], n_global, empty)``.

    Shares are contiguous and differ in size by at most one example. A process whose share is
    empty (global batch smaller than ``world``) gets the first example and ``empty=True``, so it
    still joins the gradient all-reduce; `share_loss` gives that example weight 0.
    """
    n = y.shape[0]
    if world == 1:
        return x, y, n, False
    lo, hi = rank * n // world, (rank + 1) * n // world
    if hi == lo:
        return x[:, :1], y[:1], n, True
    return x[:, lo:hi], y[lo:hi], n, False


def share_loss(logits: torch.Tensor, y: torch.Tensor, n_global: int, world: int, empty: bool = False):
    """Loss of one share whose DDP-averaged gradient is that of the mean over the global batch,
    and the share's summed cross-entropy (detached, for logging)."""
    if world == 1 and not empty and y.shape[0] == n_global:
        loss = F.cross_entropy(logits, y)
        return loss, loss.detach() * y.shape[0]
    total = F.cross_entropy(logits, y, reduction="sum")
    if empty:
        total = total * 0.0
    return total * (world / n_global), total.detach()


def all_sum(values: "list[float]", d: Dist) -> "list[float]":
    """Sum of ``values`` over the processes (float64 on the CPU; the values themselves if one)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if d.device.type == "cuda":  # NCCL reduces only device tensors
        t = t.to(d.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` (picklable) on every process: the run folder rank 0 chose, or an error only
    rank 0 can detect (a folder that already holds a run), so all processes stop together
    instead of hanging."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
