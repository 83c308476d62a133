"""Fused CPU LIF recurrence: one C call runs a whole segment forward, one its backward.

Given input currents ``i`` [L, B, H] (the segment's input projection, done by the caller as one
matmul) and the membrane ``v0`` [B, H], the forward computes per step (see `cells.lif`)::

    u_t = beta * v_{t-1} + i_t
    z_t = H(u_t - threshold)
    v_t = u_t - z_t * threshold      (reset="subtract")   |   u_t * (1 - z_t)   (reset="zero")

and saves only ``u`` [L, B, H] for the backward, which recomputes ``z_t`` and ``v_{t-1}`` from it.
With ``g_t = dL/dv_t`` (``g_L`` = the gradient of the final state) and ``s_t`` the surrogate of
``u_t - threshold``, the backward runs once from t = L-1 to 0::

    subtract: du_t = g_t + (dz_t - threshold * g_t) * s_t      (detach_reset: g_t + dz_t * s_t)
    zero:     du_t = g_t * (1 - z_t) + (dz_t - u_t * g_t) * s_t   (detach_reset: no u_t*g_t term)
    di_t = du_t,   g_{t-1} = beta * du_t,   dbeta += sum_b du_t * v_{t-1}

Steps are ordered as in the torch reference and compiled without fused multiply-adds, so the
forward is bitwise equal to the reference for the same currents.
"""
from __future__ import annotations

import ctypes

import torch

from ...cells.lif import LIFParams
from ...cells.surrogate import SURROGATES
from ..cbuild import build

__all__ = ["fused_recurrent_lif", "load_library", "SOURCE"]

_SURROGATE_IDS = {"fast_sigmoid": 0, "atan": 1, "triangle": 2}
assert set(_SURROGATE_IDS) == set(SURROGATES), "every surrogate needs a C implementation"

SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <string.h>

#define PI_2 1.57079632679489661923

#define DEF(T, SUF, FABS)                                                                          \
static inline T surrogate_##SUF(T x, int kind, double scale) {                                     \
    if (kind == 0) { T a = (T)scale * FABS(x) + (T)1; return (T)1 / (a * a); }                    \
    if (kind == 1) { T y = (T)(PI_2 * scale) * x; return (T)(scale / 2) / ((T)1 + y * y); }       \
    { T r = (T)1 - FABS(x) / (T)scale; return r > (T)0 ? r : (T)0; }                              \
}                                                                                                  \
/* forward: i [L,B,H], v0 [B,H], beta [H] or NULL (then beta_s) -> z [L,B,H], u [L,B,H] or NULL, */ \
/* vT [B,H] */                                                                                     \
void lif_fwd_##SUF(const T* i, const T* v0, const T* beta, double beta_s, double th_d,            \
                   int reset_zero, long L, long B, long H, T* z, T* u, T* vT) {                   \
    const long N = B * H; const T th = (T)th_d; const T bs = (T)beta_s;                            \
    memcpy(vT, v0, sizeof(T) * N);                                                                 \
    for (long t = 0; t < L; ++t) {                                                                 \
        const T* i_t = i + t * N; T* z_t = z + t * N; T* u_t = u ? u + t * N : NULL;               \
        for (long b = 0; b < B; ++b) {                                                             \
            T* p_v = vT + b * H; const T* p_i = i_t + b * H; T* p_z = z_t + b * H;                 \
            if (beta) {                                                                            \
                for (long h = 0; h < H; ++h) {                                                     \
                    T b_u = beta[h] * p_v[h]; b_u = b_u + p_i[h];                                  \
                    T b_z = b_u > th ? (T)1 : (T)0;                                                \
                    p_z[h] = b_z;                                                                  \
                    p_v[h] = reset_zero ? b_u * ((T)1 - b_z) : b_u - b_z * th;                     \
                    if (u_t) u_t[b * H + h] = b_u;                                                 \
                }                                                                                  \
            } else {                                                                               \
                for (long h = 0; h < H; ++h) {                                                     \
                    T b_u = bs * p_v[h]; b_u = b_u + p_i[h];                                       \
                    T b_z = b_u > th ? (T)1 : (T)0;                                                \
                    p_z[h] = b_z;                                                                  \
                    p_v[h] = reset_zero ? b_u * ((T)1 - b_z) : b_u - b_z * th;                     \
                    if (u_t) u_t[b * H + h] = b_u;                                                 \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
/* backward: u [L,B,H], dz [L,B,H] or NULL, dvT [B,H] or NULL, v0 [B,H] -> di [L,B,H],          */ \
/* dv0 [B,H], dbeta [H] (float64, accumulated) or NULL                                          */ \
void lif_bwd_##SUF(const T* u, const T* dz, const T* dvT, const T* v0, const T* beta,             \
                   double beta_s, double th_d, int reset_zero, int detach, int kind, double scale, \
                   long L, long B, long H, T* di, T* dv0, double* dbeta) {                         \
    const long N = B * H; const T th = (T)th_d; const T bs = (T)beta_s;                            \
    T* g = dv0;                                                                                    \
    if (dvT) memcpy(g, dvT, sizeof(T) * N); else memset(g, 0, sizeof(T) * N);                      \
    for (long t = L - 1; t >= 0; --t) {                                                            \
        const T* u_t = u + t * N; const T* dz_t = dz ? dz + t * N : NULL; T* di_t = di + t * N;   \
        const T* u_p = t > 0 ? u + (t - 1) * N : NULL;                                             \
        for (long b = 0; b < B; ++b) {                                                             \
            for (long h = 0; h < H; ++h) {                                                         \
                const long j = b * H + h;                                                          \
                const T b_u = u_t[j]; const T b_g = g[j];                                          \
                const T b_s = surrogate_##SUF(b_u - th, kind, scale);                              \
                const T b_dz = dz_t ? dz_t[j] : (T)0;                                              \
                T b_du;                                                                            \
                if (reset_zero) {                                                                  \
                    const T keep = b_u > th ? (T)0 : (T)1;                                         \
                    b_du = detach ? b_g * keep + b_dz * b_s : b_g * keep + (b_dz - b_u * b_g) * b_s; \
                } else {                                                                           \
                    b_du = detach ? b_g + b_dz * b_s : b_g + (b_dz - th * b_g) * b_s;              \
                }                                                                                  \
                di_t[j] = b_du;                                                                    \
                const T b_beta = beta ? beta[h] : bs;                                              \
                if (dbeta) {                                                                       \
                    T v_p;                                                                         \
                    if (u_p) {                                                                     \
                        const T up = u_p[j]; const T zp = up > th ? (T)1 : (T)0;                   \
                        v_p = reset_zero ? up * ((T)1 - zp) : up - zp * th;                        \
                    } else {                                                                       \
                        v_p = v0[j];                                                               \
                    }                                                                              \
                    dbeta[h] += (double)b_du * (double)v_p;                                        \
                }                                                                                  \
                g[j] = b_beta * b_du;                                                              \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

DEF(float, f32, fabsf)
DEF(double, f64, fabs)
"""

_lib = None
_P = ctypes.c_void_p
_FWD_ARGS = [_P, _P, _P, ctypes.c_double, ctypes.c_double, ctypes.c_int,
             ctypes.c_long, ctypes.c_long, ctypes.c_long, _P, _P, _P]
_BWD_ARGS = [_P, _P, _P, _P, _P, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int,
             ctypes.c_int, ctypes.c_double, ctypes.c_long, ctypes.c_long, ctypes.c_long, _P, _P, _P]


def load_library():
    """Build (once, cached on disk) and load the C kernels; raises `CBuildError` if impossible."""
    global _lib
    if _lib is None:
        lib = build("sparsebptt_lif", SOURCE)
        for suf in ("f32", "f64"):
            fwd, bwd = getattr(lib, f"lif_fwd_{suf}"), getattr(lib, f"lif_bwd_{suf}")
            fwd.restype = bwd.restype = None
            fwd.argtypes, bwd.argtypes = _FWD_ARGS, _BWD_ARGS
        _lib = lib
    return _lib


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _scale(p: LIFParams) -> float:
    return float(SURROGATES[p.surrogate][1] if p.surrogate_scale is None else p.surrogate_scale)


def _lif_fwd(i, v0, beta, p: LIFParams, save_u: bool):
    L, B, H = i.shape
    fn = getattr(load_library(), f"lif_fwd_{_SUFFIX[i.dtype]}")
    z = torch.empty_like(i)
    u = torch.empty_like(i) if save_u else None
    vT = torch.empty_like(v0)
    beta_t = beta if isinstance(beta, torch.Tensor) else None
    beta_s = 0.0 if beta_t is not None else float(beta)
    fn(_ptr(i), _ptr(v0), _ptr(beta_t), beta_s, float(p.threshold), int(p.reset == "zero"),
       L, B, H, _ptr(z), _ptr(u), _ptr(vT))
    return z, u, vT


def _lif_bwd(u, dz, dvT, v0, beta, p: LIFParams, need_dbeta: bool):
    L, B, H = u.shape
    fn = getattr(load_library(), f"lif_bwd_{_SUFFIX[u.dtype]}")
    di = torch.empty_like(u)
    dv0 = torch.empty(B, H, dtype=u.dtype, device=u.device)
    beta_t = beta if isinstance(beta, torch.Tensor) else None
    beta_s = 0.0 if beta_t is not None else float(beta)
    dbeta = torch.zeros(H, dtype=torch.float64) if need_dbeta else None
    fn(_ptr(u), _ptr(dz), _ptr(dvT), _ptr(v0), _ptr(beta_t), beta_s, float(p.threshold),
       int(p.reset == "zero"), int(p.detach_reset), _SURROGATE_IDS[p.surrogate], _scale(p),
       L, B, H, _ptr(di), _ptr(dv0), _ptr(dbeta))
    return di, dv0, (None if dbeta is None else dbeta.to(u.dtype))


class FusedRecurrentLIFFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i, v0, beta, p: LIFParams):
        z, u, vT = _lif_fwd(i, v0, beta, p, save_u=True)
        beta_t = beta if isinstance(beta, torch.Tensor) else None
        ctx.p = p
        ctx.beta_s = None if beta_t is not None else beta
        ctx.need_dbeta = beta_t is not None and beta_t.requires_grad
        # u is the one [L, B, H] tensor kept; v0 only when dbeta needs v_{-1}
        ctx.save_for_backward(u, v0 if ctx.need_dbeta else None, beta_t)
        ctx.set_materialize_grads(False)
        return z, vT

    @staticmethod
    def backward(ctx, dz, dvT):
        u, v0, beta_t = ctx.saved_tensors
        beta = beta_t if beta_t is not None else ctx.beta_s
        dz = None if dz is None else dz.contiguous()
        dvT = None if dvT is None else dvT.contiguous()
        di, dv0, dbeta = _lif_bwd(u, dz, dvT, v0, beta, ctx.p, ctx.need_dbeta)
        return di, dv0, dbeta, None


def _check(i, v0, beta):
    if not isinstance(i, torch.Tensor) or i.dim() != 3:
        raise ValueError(f"fused_recurrent_lif: i must be a 3-D tensor [L, B, H] of input currents, got "
                         f"{tuple(i.shape) if isinstance(i, torch.Tensor) else type(i).__name__}")
    L, B, H = i.shape
    if i.dtype not in _SUFFIX:
        raise TypeError(f"fused_recurrent_lif (cpu): dtype {i.dtype} is not supported; use float32 or "
                        "float64 (or backend='torch')")
    if i.device.type != "cpu":
        raise ValueError(f"fused_recurrent_lif (cpu): i is on {i.device}; the cpu backend needs CPU "
                         "tensors (use backend='triton' or 'auto' for CUDA)")
    if not isinstance(v0, torch.Tensor) or v0.shape != (B, H):
        raise ValueError(f"fused_recurrent_lif: v0 must have shape {(B, H)} (B, H) like i[0], got "
                         f"{tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
    if v0.dtype != i.dtype or v0.device != i.device:
        raise TypeError(f"fused_recurrent_lif: v0 is {v0.dtype} on {v0.device} but i is {i.dtype} on "
                        f"{i.device}; they must match")
    if isinstance(beta, torch.Tensor):
        if beta.shape != (H,) or beta.dtype != i.dtype or beta.device != i.device:
            raise ValueError(f"fused_recurrent_lif: a tensor beta must have shape ({H},), dtype {i.dtype} "
                             f"and device {i.device}; got shape {tuple(beta.shape)}, {beta.dtype}, "
                             f"{beta.device}")
    elif not isinstance(beta, (int, float)):
        raise TypeError(f"fused_recurrent_lif: beta must be a float or a [H] tensor, got {type(beta).__name__}")


def fused_recurrent_lif(i: torch.Tensor, v0: torch.Tensor, beta, p: LIFParams):
    """The LIF recurrence over a segment on CPU: ``(z [L, B, H], v_T [B, H])``.

    Args:
        i: input currents ``W x_t + b`` for every step, [L, B, H], float32 or float64.
        v0: membrane before the first step, [B, H].
        beta: decay, a float or a per-neuron [H] tensor (already clamped to [0, 1]; may require
            grad, then its gradient is returned too).
        p: the LIF constants (threshold, reset, surrogate, detach_reset); ``p.beta`` is ignored.

    Differentiable in ``i``, ``v0`` and a tensor ``beta`` (surrogate gradient for the spikes).
    Outside autograd (no input requires grad, or under ``torch.no_grad``) nothing is saved.
    """
    _check(i, v0, beta)
    i, v0 = i.contiguous(), v0.contiguous()
    if isinstance(beta, torch.Tensor):
        beta = beta.contiguous()
    needs_grad = torch.is_grad_enabled() and (
        i.requires_grad or v0.requires_grad or (isinstance(beta, torch.Tensor) and beta.requires_grad))
    if not needs_grad:
        z, _, vT = _lif_fwd(i, v0, beta, p, save_u=False)
        return z, vT
    return FusedRecurrentLIFFunction.apply(i, v0, beta, p)
