"""Strategy base class, the `Plan` a strategy hands to the executor, `parse_strategy`.

A strategy is a small frozen dataclass that says which states a scan keeps, where, and what it
recomputes. It is a pure plan: `Strategy.plan(T)` returns a `Plan` (its *schedule*, a sequence of
`checkpoint_schedules` actions: Forward / Reverse / Copy / Move / EndForward / EndReverse, plus
`SkipReverse` below, and the checkpoint slots it needs), and `sparsebptt.strategies.executor` runs
it, knowing no strategy by name. `FullBPTT`'s plan is the one without a schedule: keep the whole
graph (plain autograd).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

from checkpoint_schedules import CheckpointAction

__all__ = ["Strategy", "Plan", "SkipReverse", "CARRIES", "parse_strategy", "register", "register_variant",
           "positive_int"]

#: what a `SkipReverse` does with dL/dstate at the end of the steps it skips
CARRIES = ("drop", "through")

_REGISTRY: dict[str, type["Strategy"]] = {}


def positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


class SkipReverse(CheckpointAction):
    """Move the reverse sweep from step n1 back to n0 without back-propagating steps n0..n1.

    The steps n0..n1 send no gradient to the parameters or to x. ``carry`` says what becomes of
    the state gradient dL/dstate_n1: ``"drop"`` stops it there (the sweep goes on from n0 with
    none but what the outputs before n0 bring), ``"through"`` hands it unchanged to step n0, as if
    the skipped steps were the identity map. (Skipper's approximation; see `strategies.skipper`.)
    """

    def __init__(self, n1, n0, carry="drop"):
        if carry not in CARRIES:
            raise ValueError(f"SkipReverse: unknown carry {carry!r}; valid carries are: {', '.join(CARRIES)}")
        super().__init__(n1, n0, carry)

    @property
    def n1(self):
        return self.args[0]

    @property
    def n0(self):
        return self.args[1]

    @property
    def carry(self):
        return self.args[2]


@dataclass(frozen=True)
class Plan:
    """Everything the executor needs to run a scan of ``T`` steps: made by `Strategy.plan`.

    Either ``keep_graph`` (plain autograd over the whole sequence: every step's graph is kept and
    nothing is stored or recomputed; `FullBPTT`) or a schedule: ``actions``, an iterable of
    `checkpoint_schedules` actions (and `SkipReverse`) run once (a plan serves one scan; a
    generator is fine: the forward stops at EndForward and the backward goes on from there), with
    checkpoint slots preallocated
    in fast memory (``fast_slots``, the schedule's StorageType.RAM) and in slow storage
    (``slow_slots`` in ``slow_storage``, "host" or "disk", under ``disk_dir``; its StorageType.DISK).
    """

    T: int
    keep_graph: bool = False
    actions: Iterable = ()
    fast_slots: int = 0
    slow_slots: int = 0
    slow_storage: str | None = None
    disk_dir: str | None = None


@dataclass(frozen=True)
class Strategy:
    """Base class. Subclasses set ``name`` and ``usage`` (the string form parse_strategy takes)."""

    name: ClassVar[str] = ""
    usage: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    n_args: ClassVar[int] = 1  # integers in the string form

    def plan(self, T: int) -> Plan:
        """What the executor runs for a scan of length T: this strategy's schedule and slots."""
        slow = self.slow_slots(T)
        return Plan(T, actions=iter(self.schedule(T)), fast_slots=self.fast_slots(T), slow_slots=slow,
                    slow_storage=self.slow_storage if slow else None,
                    disk_dir=getattr(self, "disk_dir", None) if slow else None)

    def schedule(self, T: int) -> Iterable:
        """The actions that run a scan of length T (see `checkpoint_schedules`)."""
        raise NotImplementedError

    def fast_slots(self, T: int) -> int:
        """How many checkpoints this schedule holds at once in fast memory, at most."""
        raise NotImplementedError

    def slow_slots(self, T: int) -> int:
        """How many checkpoints it holds at once in slow storage, at most. Strategies with slow
        slots also have ``slow_storage`` ("host" or "disk") and may have ``disk_dir`` (a folder)."""
        return 0

    @classmethod
    def from_args(cls, args: list[int]) -> "Strategy":
        if len(args) != cls.n_args:
            raise TypeError(f"{cls.name} takes {cls.n_args} arguments, got {len(args)}")
        return cls(*args)

    def to_string(self) -> str:
        """The string `parse_strategy` turns back into this strategy."""
        raise NotImplementedError


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


class _Variant:
    """A string form that builds a strategy with non-default options (see `register_variant`)."""

    def __init__(self, name, usage, make, n_args):
        self.name, self.usage, self._make, self.n_args = name, usage, make, n_args

    def from_args(self, args):
        if len(args) != self.n_args:
            raise TypeError(f"{self.name} takes {self.n_args} arguments, got {len(args)}")
        return self._make(*args)


def register_variant(name: str, usage: str, make, n_args: int = 2) -> None:
    """Register ``name:ARGS`` for ``parse_strategy``, built by ``make(*args)`` (e.g.
    ``double-disk:O,I`` -> ``DoubleCheckpoint(O, I, "disk")``)."""
    _REGISTRY[name] = _Variant(name, usage, make, n_args)


def _forms() -> str:
    return ", ".join(repr(c.usage) for c in _REGISTRY.values())


def parse_strategy(text: "str | Strategy") -> Strategy:
    """``"full"``, ``"checkpoint:32"``, ``"revolve:8"``, ``"double:256,16"``, ``"skipper:64,16"``."""
    if isinstance(text, Strategy):
        return text
    if not isinstance(text, str):
        raise TypeError(f"parse_strategy: expected a string such as 'checkpoint:32', got {type(text).__name__}")
    name, _, rest = text.strip().partition(":")
    cls = _REGISTRY.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown strategy {text!r}; valid forms are: {_forms()}")
    try:
        args = [int(a) for a in rest.split(",")] if rest.strip() else []
    except ValueError:
        raise ValueError(f"cannot parse strategy {text!r}: arguments must be integers; "
                         f"expected the form {cls.usage!r}") from None
    try:
        return cls.from_args(args)
    except TypeError:
        raise ValueError(f"cannot parse strategy {text!r}: expected the form {cls.usage!r}") from None
