/* Fused CPU LIF kernels (see sparsebptt/kernels/lif/cpu.py for the equations and the backward):
   lif_fwd/lif_bwd and the sparse-input products lif_csr/lif_spmm/lif_spmm_t,
   _f32 and _f64, one copy of lif_body.h per type. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "cbuild.h"

/* the sparse-input products get a copy per vector width, picked at load time */
#define CLONES SB_CLONES("avx512f", "avx2", "default")

/* lif_csr's AVX-512 version (x86-64, GCC or clang): 16 (float) or 8 (double) entries per
   compare, their columns and values written with one compress-store each; picked at run time */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SB_CSR_AVX512 1
static int csr_avx512_ok_f32(void) { return SB_CPU_HAS("avx512f"); }
static int csr_avx512_ok_f64(void) { return SB_CPU_HAS("avx512f") && SB_CPU_HAS("avx512vl"); }
__attribute__((target("avx512f"))) static long csr_avx512_f32(const float* x, long R, long K, long max_nnz,
                                                             long* ptr, int* col, float* val, int* binary) {
    long n = 0; unsigned other = 0;
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    const __m512i base = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (long r = 0; r < R; ++r) {
        const float* xr = x + r * K;
        ptr[r] = n;
        if (n > max_nnz) return -1;
        long j = 0;
        for (; j + 16 <= K; j += 16) {
            const __m512 v = _mm512_loadu_ps(xr + j);
            const __mmask16 m = _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ);
            other |= _mm512_mask_cmp_ps_mask(m, v, one, _CMP_NEQ_UQ);
            _mm512_mask_compressstoreu_epi32(col + n, m, _mm512_add_epi32(base, _mm512_set1_epi32((int)j)));
            _mm512_mask_compressstoreu_ps(val + n, m, v);
            n += __builtin_popcount(m);
        }
        for (; j < K; ++j) {
            const float a = xr[j];
            col[n] = (int)j; val[n] = a; n += a != 0.0f; other |= (a != 0.0f) & (a != 1.0f);
        }
    }
    ptr[R] = n;
    *binary = !other;
    return n > max_nnz ? -1 : n;
}
__attribute__((target("avx512f,avx512vl"))) static long csr_avx512_f64(const double* x, long R, long K, long max_nnz,
                                                                      long* ptr, int* col, double* val, int* binary) {
    long n = 0; unsigned other = 0;
    const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
    const __m256i base = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (long r = 0; r < R; ++r) {
        const double* xr = x + r * K;
        ptr[r] = n;
        if (n > max_nnz) return -1;
        long j = 0;
        for (; j + 8 <= K; j += 8) {
            const __m512d v = _mm512_loadu_pd(xr + j);
            const __mmask8 m = _mm512_cmp_pd_mask(v, zero, _CMP_NEQ_UQ);
            other |= _mm512_mask_cmp_pd_mask(m, v, one, _CMP_NEQ_UQ);
            _mm256_mask_compressstoreu_epi32(col + n, m, _mm256_add_epi32(base, _mm256_set1_epi32((int)j)));
            _mm512_mask_compressstoreu_pd(val + n, m, v);
            n += __builtin_popcount(m);
        }
        for (; j < K; ++j) {
            const double a = xr[j];
            col[n] = (int)j; val[n] = a; n += a != 0.0; other |= (a != 0.0) & (a != 1.0);
        }
    }
    ptr[R] = n;
    *binary = !other;
    return n > max_nnz ? -1 : n;
}
#endif

#define T float
#define SUF f32
#define FABS fabsf
#define EXP expf
#include "lif_body.h"

#define T double
#define SUF f64
#define FABS fabs
#define EXP exp
#include "lif_body.h"
