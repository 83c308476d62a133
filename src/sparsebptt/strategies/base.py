"""Strategy base class, validation helpers and `parse_strategy`.

A strategy is a small frozen dataclass that says which states a scan keeps, where, and what it
recomputes. Exact strategies other than `FullBPTT` produce a *schedule*: a sequence of
`checkpoint_schedules` actions (Forward / Reverse / Copy / Move / EndForward / EndReverse) that
`sparsebptt.strategies.executor` runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

__all__ = ["Strategy", "parse_strategy", "register", "register_variant", "positive_int"]

_REGISTRY: dict[str, type["Strategy"]] = {}


def positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Strategy:
    """Base class. Subclasses set ``name`` and ``usage`` (the string form parse_strategy takes)."""

    name: ClassVar[str] = ""
    usage: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    n_args: ClassVar[int] = 1  # integers in the string form

    def schedule(self, T: int) -> Iterable:
        """The actions that run a scan of length T (see `checkpoint_schedules`)."""
        raise NotImplementedError

    def fast_slots(self, T: int) -> int:
        """How many checkpoints this schedule holds at once in fast memory, at most."""
        raise NotImplementedError

    def slow_slots(self, T: int) -> int:
        """How many checkpoints it holds at once in slow storage, at most. Strategies with slow
        slots also have ``slow_storage`` ("host" or "disk") and ``disk_dir``."""
        return 0

    def run(self, cell, x, state0, reduce, params, preserve_rng=True):
        """Run ``cell`` over ``x`` under this strategy; returns (out, state_T)."""
        from .executor import run_schedule

        return run_schedule(cell, x, state0, self, reduce, params, preserve_rng)

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
