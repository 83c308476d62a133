"""Heaviside spike function with surrogate gradients, chosen by name.

Forward: ``z = H(x) = 1[x > 0]``. Backward: ``dz/dx`` replaced by a smooth bump ``s(x)``:

- ``fast_sigmoid`` (SuperSpike, Zenke & Ganguli 2018): ``s(x) = 1 / (scale*|x| + 1)^2``, scale 25
- ``atan`` (Fang et al. 2021): ``s(x) = (scale/2) / (1 + (pi/2 * scale * x)^2)``, scale 2
- ``triangle`` (Esser et al. 2016; Bellec et al. 2018): ``s(x) = max(0, 1 - |x|/scale)``, scale 1
- ``sigmoid`` (the derivative of a logistic): ``s(x) = scale * sig(scale*x) * (1 - sig(scale*x))``,
  ``sig(y) = 1 / (1 + exp(-y))``, scale 4 (SpikingJelly's default ``Sigmoid(alpha=4)``; snnTorch's
  ``surrogate.sigmoid(slope=25)`` is scale 25)

Scale conventions of the peers (snnTorch, SpikingJelly, Norse) are mapped to these in docs/peers.md.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

__all__ = ["SURROGATES", "spike", "heaviside", "surrogate_derivative", "check_surrogate"]


def _fast_sigmoid(x: torch.Tensor, scale: float) -> torch.Tensor:
    return 1.0 / (scale * x.abs() + 1.0) ** 2


def _atan(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (scale / 2) / (1.0 + (math.pi / 2 * scale * x) ** 2)


def _triangle(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(1.0 - x.abs() / scale, min=0.0)


def _sigmoid(x: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.sigmoid(scale * x)
    return (1.0 - s) * s * scale


#: name -> (derivative, default scale)
SURROGATES: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], float]] = {
    "fast_sigmoid": (_fast_sigmoid, 25.0),
    "atan": (_atan, 2.0),
    "triangle": (_triangle, 1.0),
    "sigmoid": (_sigmoid, 4.0),
}


def check_surrogate(name: str) -> None:
    if name not in SURROGATES:
        raise ValueError(
            f"unknown surrogate {name!r}; valid surrogates are: {', '.join(sorted(SURROGATES))}"
        )


def surrogate_derivative(x: torch.Tensor, name: str, scale: float | None = None) -> torch.Tensor:
    """The surrogate ``s(x)`` that replaces ``dH/dx`` in the backward."""
    check_surrogate(name)
    fn, default = SURROGATES[name]
    return fn(x, default if scale is None else scale)


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, derivative):
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, dz):
        (x,) = ctx.saved_tensors
        return dz * ctx.derivative(x), None


def heaviside(x: torch.Tensor, derivative) -> torch.Tensor:
    """``1[x > 0]`` in the forward; ``dz * derivative(x)`` in the backward (a surrogate gradient)."""
    return _Heaviside.apply(x, derivative)


def spike(x: torch.Tensor, surrogate: str = "fast_sigmoid", scale: float | None = None) -> torch.Tensor:
    """``H(x)`` in the forward, the named surrogate derivative in the backward."""
    check_surrogate(surrogate)
    return heaviside(x, partial(surrogate_derivative, name=surrogate, scale=scale))
