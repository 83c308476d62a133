"""CPU kernels of EGRU's sparse backward: masked products that touch only the active entries.

Two loops over the units j, each reading row j of its matrix once for all samples of the batch:

- `masked_rows_dot`: ``dy[b, j] = g[b] . wt[j]`` where ``mask[b, j]``, else 0 (the input
  gradient of ``W_hh y`` at events and near-threshold units; ``wt = W_hh.T`` [H, 3H]);
- `masked_rows_axpy_`: ``buf[j] += sum_b y[b, j] * g[b]`` over ``mask[b, j]`` (the weight
  gradient rows of units with an event, accumulated in place).

Work is ``nnz * 3H`` multiply-adds, with no gathered copy of the weight: torch's gather-then-GEMM
(``index_select`` of the active rows, then a matmul) moves each active row twice, and its
per-sample ``embedding_bag`` backward runs at scalar speed. The loops use AVX2 + FMA where the
CPU has them (chosen at run time), else plain C; built with `sparsebptt.kernels.cbuild`.
Denormal numbers are flushed to zero while a kernel runs (FTZ/DAZ on x86): a trained EGRU's
gradients hold some (saturated gates), and each one cost a microcode assist, 6x the run time.
"""
from __future__ import annotations

import ctypes

import torch

from ..cbuild import build

__all__ = ["load_library", "masked_rows_dot", "masked_rows_axpy_", "SOURCE"]

_HEADER = r"""
#include <stddef.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

static int simd = -1;  /* 1: AVX2 + FMA, 0: plain C; decided at the first call */
static int use_simd(void) {
    if (simd < 0) {
#if X86
        __builtin_cpu_init();
        simd = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
        simd = 0;
#endif
    }
    return simd;
}
int egru_simd(void) { return use_simd(); }

/* Denormal operands (gate derivatives of saturated units underflow there) cost a microcode
   assist per operation: the kernel ran 6x slower on a trained EGRU's gradients than on random
   ones. Flush them to zero for the kernel's duration (values below 1.2e-38 in float32). */
static unsigned int ftz_on(void) {
#if X86
    const unsigned int old = _mm_getcsr();
    _mm_setcsr(old | 0x8040);  /* FTZ | DAZ */
    return old;
#else
    return 0;
#endif
}
static void ftz_off(unsigned int old) {
#if X86
    _mm_setcsr(old);
#else
    (void)old;
#endif
}
"""

#: @T@ C type, @SUF@ suffix, @V@ vector type, @W@ lanes, @P@ intrinsic suffix (ps / pd)
_TEMPLATE = r"""
#if X86
__attribute__((target("avx2,fma")))
static @T@ dot_simd_@SUF@(const @T@* a, const @T@* b, long n) {
    @V@ s0 = _mm256_setzero_@P@(), s1 = _mm256_setzero_@P@(), s2 = _mm256_setzero_@P@(), s3 = _mm256_setzero_@P@();
    long i = 0;
    for (; i + 4 * @W@ <= n; i += 4 * @W@) {
        s0 = _mm256_fmadd_@P@(_mm256_loadu_@P@(a + i), _mm256_loadu_@P@(b + i), s0);
        s1 = _mm256_fmadd_@P@(_mm256_loadu_@P@(a + i + @W@), _mm256_loadu_@P@(b + i + @W@), s1);
        s2 = _mm256_fmadd_@P@(_mm256_loadu_@P@(a + i + 2 * @W@), _mm256_loadu_@P@(b + i + 2 * @W@), s2);
        s3 = _mm256_fmadd_@P@(_mm256_loadu_@P@(a + i + 3 * @W@), _mm256_loadu_@P@(b + i + 3 * @W@), s3);
    }
    for (; i + @W@ <= n; i += @W@)
        s0 = _mm256_fmadd_@P@(_mm256_loadu_@P@(a + i), _mm256_loadu_@P@(b + i), s0);
    s0 = _mm256_add_@P@(_mm256_add_@P@(s0, s1), _mm256_add_@P@(s2, s3));
    @T@ lanes[@W@];
    _mm256_storeu_@P@(lanes, s0);
    @T@ r = 0;
    for (int k = 0; k < @W@; ++k) r += lanes[k];
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
}
#else
#define dot_simd_@SUF@ dot_plain_@SUF@
#endif

static @T@ dot_plain_@SUF@(const @T@* a, const @T@* b, long n) {
    @T@ s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
    @T@ r = 0;
    for (int k = 0; k < 8; ++k) r += s[k];
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
}

void masked_rows_dot_@SUF@(const @T@* g, const @T@* wt, const unsigned char* mask, @T@* dy,
                           long B, long H, long O) {
    const int v = use_simd();
    const unsigned int csr = ftz_on();
    for (long j = 0; j < H; ++j) {
        const @T@* w = wt + j * O;
        for (long b = 0; b < B; ++b) {
            if (!mask[b * H + j]) continue;
            dy[b * H + j] = v ? dot_simd_@SUF@(g + b * O, w, O) : dot_plain_@SUF@(g + b * O, w, O);
        }
    }
    ftz_off(csr);
}

#if X86
__attribute__((target("avx2,fma")))
static void axpy_rows_simd_@SUF@(@T@* row, const @T@* g, const long* bs, const @T@* vs, long m, long O) {
    long i = 0;
    for (; i + @W@ <= O; i += @W@) {
        @V@ acc = _mm256_loadu_@P@(row + i);
        for (long k = 0; k < m; ++k)
            acc = _mm256_fmadd_@P@(_mm256_set1_@P@(vs[k]), _mm256_loadu_@P@(g + bs[k] * O + i), acc);
        _mm256_storeu_@P@(row + i, acc);
    }
    for (; i < O; ++i) {
        @T@ acc = row[i];
        for (long k = 0; k < m; ++k) acc += vs[k] * g[bs[k] * O + i];
        row[i] = acc;
    }
}
#else
#define axpy_rows_simd_@SUF@ axpy_rows_plain_@SUF@
#endif

static void axpy_rows_plain_@SUF@(@T@* row, const @T@* g, const long* bs, const @T@* vs, long m, long O) {
    for (long k = 0; k < m; ++k) {
        const @T@* gk = g + bs[k] * O;
        const @T@ a = vs[k];
        for (long i = 0; i < O; ++i) row[i] += a * gk[i];
    }
}

/* bs, vs: caller's scratch of B entries each */
void masked_rows_axpy_@SUF@(const @T@* y, const @T@* g, const unsigned char* mask, @T@* buf,
                            long B, long H, long O, long* bs, @T@* vs) {
    const int v = use_simd();
    const unsigned int csr = ftz_on();
    for (long j = 0; j < H; ++j) {
        long m = 0;
        for (long b = 0; b < B; ++b)
            if (mask[b * H + j]) { bs[m] = b; vs[m] = y[b * H + j]; ++m; }
        if (!m) continue;
        if (v) axpy_rows_simd_@SUF@(buf + j * O, g, bs, vs, m, O);
        else axpy_rows_plain_@SUF@(buf + j * O, g, bs, vs, m, O);
    }
    ftz_off(csr);
}
"""


def _source() -> str:
    parts = [_HEADER]
    for T, suf, V, W, P in (("float", "f32", "__m256", "8", "ps"), ("double", "f64", "__m256d", "4", "pd")):
        src = _TEMPLATE
        for k, v in (("@T@", T), ("@SUF@", suf), ("@V@", V), ("@W@", W), ("@P@", P)):
            src = src.replace(k, v)
        parts.append(src)
    return "\n".join(parts)


SOURCE = _source()

_lib = None
_P = ctypes.c_void_p
_L = ctypes.c_long
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def load_library():
    """Build (once, cached on disk) and load the kernels; raises `CBuildError` if impossible."""
    global _lib
    if _lib is None:
        lib = build("sparsebptt_egru", SOURCE)
        for suf in ("f32", "f64"):
            dot, axpy = getattr(lib, f"masked_rows_dot_{suf}"), getattr(lib, f"masked_rows_axpy_{suf}")
            dot.restype = axpy.restype = None
            dot.argtypes = [_P, _P, _P, _P, _L, _L, _L]
            axpy.argtypes = [_P, _P, _P, _P, _L, _L, _L, _P, _P]
        lib.egru_simd.restype = ctypes.c_int
        _lib = lib
    return _lib


def _check(name, **tensors):
    dtypes = {t.dtype for t in tensors.values() if t.dtype != torch.bool}
    for k, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: {k} must be a contiguous CPU tensor, got {t.device} "
                             f"{'contiguous' if t.is_contiguous() else 'non-contiguous'}")
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SUFFIX:
        raise ValueError(f"{name}: needs float32 or float64 tensors of one dtype, got "
                         f"{ {k: str(t.dtype) for k, t in tensors.items()} }")
    return _SUFFIX[next(iter(dtypes))]


def masked_rows_dot(g: torch.Tensor, wt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``dy [B, H]``: ``g[b] . wt[j]`` where ``mask[b, j]`` (bool [B, H]), else 0.

    g [B, O], wt [H, O]: contiguous CPU tensors of one float dtype.
    """
    suf = _check("masked_rows_dot", g=g, wt=wt, mask=mask)
    B, O = g.shape
    H = wt.shape[0]
    if wt.shape[1] != O or mask.shape != (B, H) or mask.dtype != torch.bool:
        raise ValueError(f"masked_rows_dot: g [B, O], wt [H, O], mask bool [B, H], got {tuple(g.shape)}, "
                         f"{tuple(wt.shape)}, {mask.dtype} {tuple(mask.shape)}")
    dy = g.new_zeros(B, H)
    getattr(load_library(), f"masked_rows_dot_{suf}")(g.data_ptr(), wt.data_ptr(), mask.data_ptr(),
                                                      dy.data_ptr(), B, H, O)
    return dy


def masked_rows_axpy_(buf: torch.Tensor, y: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``buf[j] += sum_b y[b, j] * g[b]`` over ``mask[b, j]``, in place; returns ``buf``.

    buf [H, O], y [B, H], g [B, O], mask bool [B, H]: contiguous CPU tensors of one float dtype.
    """
    suf = _check("masked_rows_axpy_", buf=buf, y=y, g=g, mask=mask)
    B, H = y.shape
    O = g.shape[1]
    if buf.shape != (H, O) or g.shape[0] != B or mask.shape != (B, H) or mask.dtype != torch.bool:
        raise ValueError(f"masked_rows_axpy_: buf [H, O], y [B, H], g [B, O], mask bool [B, H], got "
                         f"{tuple(buf.shape)}, {tuple(y.shape)}, {tuple(g.shape)}, {mask.dtype} {tuple(mask.shape)}")
    bs = torch.empty(B, dtype=torch.long)
    vs = y.new_empty(B)
    getattr(load_library(), f"masked_rows_axpy_{suf}")(y.data_ptr(), g.data_ptr(), mask.data_ptr(), buf.data_ptr(),
                                                       B, H, O, bs.data_ptr(), vs.data_ptr())
    return buf
