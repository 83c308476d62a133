"""Double checkpointing: coarse checkpoints in slow storage, fine ones in fast memory.

The method of the double-checkpointing paper for sparse RNNs/SNNs: the forward keeps the state
every ``outer`` steps in slow, large storage (host memory next to a GPU; host RAM or a disk file
on a CPU). In backward, each coarse segment is restored and recomputed once without graph to lay
fine checkpoints every ``inner`` steps in fast memory; each fine segment is then recomputed with
graph and back-propagated. Fast memory holds ~ (outer/inner + inner) states' worth; every step
is recomputed about twice.

`DoubleCheckpoint.optimal(fast_slots, slow_slots)` instead runs the optimal two-level binomial
schedule (Stumm & Walther's multistage Revolve, from `checkpoint_schedules`): the binomial
schedule for fast + slow slots, with the least-used checkpoints placed in slow storage.
"""
from __future__ import annotations

from dataclasses import dataclass

from checkpoint_schedules import (EndForward, EndReverse, Forward, Move, MultistageCheckpointSchedule,
                                  Reverse, StorageType)

from ..storage import check_disk_dir, check_storage
from .base import Strategy, positive_int, register, register_variant

__all__ = ["DoubleCheckpoint", "TwoLevelRevolve"]

_SLOW = ("host", "disk")


def _check_slow(owner, outer_storage, disk_dir):
    check_storage(owner, "outer_storage", outer_storage)
    if outer_storage not in _SLOW:
        raise ValueError(f"{owner}: outer_storage must be a slow storage, one of {', '.join(_SLOW)}, "
                         f"got {outer_storage!r} (fine checkpoints are already in device memory)")
    check_disk_dir(owner, disk_dir)


def double_schedule(T: int, outer: int, inner: int):
    outers = list(range(0, T, outer))
    for a in outers[:-1]:
        yield Forward(a, a + outer, True, False, StorageType.DISK)
    last = outers[-1]
    fine = list(range(last, T, inner))
    for s in fine[:-1]:
        yield Forward(s, s + inner, True, False, StorageType.RAM)
    yield Forward(fine[-1], T, False, True, StorageType.WORK)
    yield EndForward()
    ends = {last: T}
    ends.update({a: a + outer for a in outers[:-1]})
    for i, a in enumerate(reversed(outers)):
        b = ends[a]
        fine = list(range(a, b, inner))
        if i > 0:  # restore the coarse checkpoint and lay this segment's fine checkpoints
            yield Move(a, StorageType.DISK, StorageType.WORK)
            for s in fine[:-1]:
                yield Forward(s, s + inner, True, False, StorageType.RAM)
            yield Forward(fine[-1], b, False, True, StorageType.WORK)
        yield Reverse(b, fine[-1], True)
        for s in reversed(fine[:-1]):
            yield Move(s, StorageType.RAM, StorageType.WORK)
            yield Forward(s, s + inner, False, True, StorageType.WORK)
            yield Reverse(s + inner, s, True)
    yield EndReverse()


@register
@dataclass(frozen=True)
class DoubleCheckpoint(Strategy):
    """Coarse checkpoints every ``outer`` steps in ``outer_storage`` ("host" or "disk"), fine
    checkpoints every ``inner`` steps in fast memory while a coarse segment is recomputed.

    ``disk_dir``: folder for the disk file (default: the system temp folder).
    """

    outer: int = 256
    inner: int = 16
    outer_storage: str = "host"
    disk_dir: str | None = None
    name = "double"
    usage = "double:OUTER,INNER"
    n_args = 2

    def __post_init__(self):
        positive_int("DoubleCheckpoint", "outer", self.outer)
        positive_int("DoubleCheckpoint", "inner", self.inner)
        if self.outer < self.inner:
            raise ValueError(f"DoubleCheckpoint: outer must be >= inner, got outer={self.outer}, "
                             f"inner={self.inner}")
        _check_slow("DoubleCheckpoint", self.outer_storage, self.disk_dir)

    @property
    def slow_storage(self):
        return self.outer_storage

    @staticmethod
    def optimal(fast_slots: int, slow_slots: int, outer_storage: str = "host", disk_dir=None):
        """The optimal two-level binomial schedule for the given numbers of slots."""
        return TwoLevelRevolve(fast_slots, slow_slots, outer_storage, disk_dir)

    def schedule(self, T):
        return double_schedule(T, self.outer, self.inner)

    def fast_slots(self, T):
        return max(0, -(-min(self.outer, T) // self.inner) - 1)

    def slow_slots(self, T):
        return max(0, -(-T // self.outer) - 1)

    def to_string(self):
        name = "double" if self.outer_storage == "host" else f"double-{self.outer_storage}"
        return f"{name}:{self.outer},{self.inner}"


register_variant("double-disk", "double-disk:OUTER,INNER",
                 lambda outer, inner: DoubleCheckpoint(outer, inner, "disk"))


@register
@dataclass(frozen=True)
class TwoLevelRevolve(Strategy):
    """Binomial checkpointing over two levels: ``fast_slots`` in device memory, ``slow_slots`` in
    ``outer_storage``. Made by `DoubleCheckpoint.optimal`."""

    fast: int = 8
    slow: int = 8
    outer_storage: str = "host"
    disk_dir: str | None = None
    name = "double-optimal"
    usage = "double-optimal:FAST,SLOW"
    n_args = 2

    def __post_init__(self):
        positive_int("DoubleCheckpoint.optimal", "fast_slots", self.fast)
        if isinstance(self.slow, bool) or not isinstance(self.slow, int) or self.slow < 0:
            raise ValueError(f"DoubleCheckpoint.optimal: slow_slots must be an int >= 0, got {self.slow!r}")
        _check_slow("DoubleCheckpoint.optimal", self.outer_storage, self.disk_dir)

    @property
    def slow_storage(self):
        return self.outer_storage

    def schedule(self, T):
        return iter(MultistageCheckpointSchedule(T, self.fast, self.slow))

    def _split(self, T):
        sched = MultistageCheckpointSchedule(T, self.fast, self.slow)
        return sched._snapshots_in_ram, sched._snapshots_on_disk

    def fast_slots(self, T):
        return self._split(T)[0] if T > 1 else 0

    def slow_slots(self, T):
        return self._split(T)[1] if T > 1 else 0

    def to_string(self):
        name = "double-optimal" if self.outer_storage == "host" else f"double-optimal-{self.outer_storage}"
        return f"{name}:{self.fast},{self.slow}"


register_variant("double-optimal-disk", "double-optimal-disk:FAST,SLOW",
                 lambda fast, slow: TwoLevelRevolve(fast, slow, "disk"))
