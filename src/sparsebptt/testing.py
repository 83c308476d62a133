"""Helpers for tests of cells, strategies and kernels: seeded inputs and one `assert_close`."""
from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "assert_close", "seeded", "grads_of"]

#: dtype -> (atol, rtol). float64: exact strategies agree to 1e-10 absolute; float32 to 1e-5
#: relative (to the tensor's largest magnitude); half types for fused kernels.
TOLERANCES = {
    torch.float64: (1e-10, 0.0),
    torch.float32: (0.0, 1e-5),
    torch.float16: (0.0, 5e-3),
    torch.bfloat16: (0.0, 2e-2),
}


def assert_close(name: str, ref: torch.Tensor | None, got: torch.Tensor | None, dtype=None,
                 atol: float | None = None, rtol: float | None = None) -> None:
    """Compare shapes, dtypes, then values; the message names the tensor and the worst error.

    The error allowed is ``atol + rtol * max|ref|``: absolute for float64, relative to the
    tensor's scale for the lower precisions.
    """
    if ref is None or got is None:
        assert ref is None and got is None, f"{name}: one gradient is None (ref={ref is None}, got={got is None})"
        return
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert ref.dtype == got.dtype, f"{name}: dtype {got.dtype} != reference {ref.dtype}"
    dtype = dtype or ref.dtype
    a0, r0 = TOLERANCES.get(dtype, (1e-6, 1e-5))
    atol = a0 if atol is None else atol
    rtol = r0 if rtol is None else rtol
    ref64, got64 = ref.detach().double(), got.detach().double()
    err = (ref64 - got64).abs().max().item() if ref.numel() else 0.0
    scale = ref64.abs().max().item() if ref.numel() else 0.0
    allowed = atol + rtol * scale
    assert err <= allowed, (f"{name}: max abs diff {err:.3e} > allowed {allowed:.3e} "
                            f"(atol {atol:g}, rtol {rtol:g}, max|ref| {scale:.3e}, dtype {dtype})")


def seeded(seed: int, *shape, dtype=torch.float64, kind: str = "normal", p: float = 0.3):
    """A reproducible random tensor: ``normal``, ``uniform`` in [0, 1), or ``spikes`` (Bernoulli p)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(*shape, generator=g, dtype=dtype)
    if kind == "uniform":
        return torch.rand(*shape, generator=g, dtype=dtype)
    if kind == "spikes":
        return (torch.rand(*shape, generator=g) < p).to(dtype)
    raise ValueError(f"seeded: unknown kind {kind!r}; valid kinds are: normal, uniform, spikes")


def grads_of(module: torch.nn.Module, *tensors) -> dict[str, torch.Tensor | None]:
    """Gradients of ``tensors`` (named t0, t1, ...) and of every named parameter, cloned."""
    out = {f"t{i}": (t.grad.clone() if t.grad is not None else None) for i, t in enumerate(tensors)}
    for n, p in module.named_parameters():
        out[n] = p.grad.clone() if p.grad is not None else None
    return out
