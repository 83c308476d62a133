"""Helpers for tests of cells, strategies and kernels: seeded inputs and one `assert_close`."""
from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "assert_close", "seeded", "grads_of", "scan_grads"]

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


def scan_grads(cell, x, state0, strategy=None, *, x_grad=True, state_grad=True, reduce=None):
    """One traced forward + backward of ``sb.scan`` with the loss ``(out * dout).sum() +
    sum_k (state_T[k] * dstate_k).sum()`` (seeded ``dout``, ``dstate_k``); returns ``(results,
    trace)``: out, state_T[k], dx, dstate0[k] and d<param> for every named parameter.
    ``state_grad``: one flag for every state component, or one flag per component; ``reduce`` as
    `sb.scan`'s."""
    from .scan import scan
    from .trace import trace

    flags = [state_grad] * len(state0) if isinstance(state_grad, bool) else list(state_grad)
    x = x.clone().requires_grad_(x_grad)
    state0 = tuple(s.clone().requires_grad_(f) for s, f in zip(state0, flags))
    for p in cell.parameters():
        p.grad = None
    with trace() as t:
        out, state = scan(cell, x, state0, strategy=strategy, reduce=reduce)
        loss = (out * seeded(100, *out.shape, dtype=x.dtype)).sum()
        for k, s in enumerate(state):
            loss = loss + (s * seeded(200 + k, *s.shape, dtype=x.dtype)).sum()
        loss.backward()
    res = {"out": out.detach(), "dx": x.grad}
    res.update({f"state_T[{k}]": s.detach() for k, s in enumerate(state)})
    res.update({f"dstate0[{k}]": s.grad for k, s in enumerate(state0)})
    res.update({f"d{n}": p.grad for n, p in cell.named_parameters()})
    return res, t
