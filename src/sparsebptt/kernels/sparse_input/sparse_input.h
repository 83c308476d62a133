/* The sparse-input products' shared part (included once by sparse_input.c and by lif.c, before
   their sparse_input_body.h copies): the AVX-512 compress-store CSR listing, a copy per type. */
#ifndef SPARSEBPTT_SPARSE_INPUT_H
#define SPARSEBPTT_SPARSE_INPUT_H

/* sp_csr's AVX-512 version (x86-64, GCC or clang): 16 (float) or 8 (double) entries per
   compare, their columns and values written with one compress-store each; picked at run time */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SB_CSR_AVX512 1
static int csr_avx512_ok_f32(void) { return SB_CPU_HAS("avx512f"); }
static int csr_avx512_ok_f64(void) { return SB_CPU_HAS("avx512f") && SB_CPU_HAS("avx512vl"); }
/* one copy per type: T, its 512-bit vector VT (NL lanes, mask MT, intrinsic suffix PS) and the
   NL column indices as IT (IOP: its intrinsic prefix, _mm512 or _mm256; IBASE: 0 .. NL - 1) */
#define SB_CSR_AVX512_FN(SUF, TGT, T, VT, MT, NL, PS, IT, IOP, IBASE)                                 \
    __attribute__((target(TGT))) static long csr_avx512_##SUF(const T* x, long R, long K, long max_nnz, \
                                                              long* ptr, int* col, T* val, int* binary) { \
        long n = 0; unsigned other = 0;                                                               \
        const VT zero = _mm512_setzero_##PS(), one = _mm512_set1_##PS((T)1);                         \
        const IT base = IBASE;                                                                        \
        for (long r = 0; r < R; ++r) {                                                                \
            const T* xr = x + r * K;                                                                  \
            ptr[r] = n;                                                                               \
            if (n > max_nnz) return -1;                                                               \
            long j = 0;                                                                               \
            for (; j + NL <= K; j += NL) {                                                            \
                const VT v = _mm512_loadu_##PS(xr + j);                                               \
                const MT m = _mm512_cmp_##PS##_mask(v, zero, _CMP_NEQ_UQ);                            \
                other |= _mm512_mask_cmp_##PS##_mask(m, v, one, _CMP_NEQ_UQ);                         \
                IOP##_mask_compressstoreu_epi32(col + n, m, IOP##_add_epi32(base, IOP##_set1_epi32((int)j))); \
                _mm512_mask_compressstoreu_##PS(val + n, m, v);                                       \
                n += __builtin_popcount(m);                                                           \
            }                                                                                         \
            for (; j < K; ++j) {                                                                      \
                const T a = xr[j];                                                                    \
                col[n] = (int)j; val[n] = a; n += a != (T)0; other |= (a != (T)0) & (a != (T)1);      \
            }                                                                                         \
        }                                                                                             \
        ptr[R] = n;                                                                                   \
        *binary = !other;                                                                             \
        return n > max_nnz ? -1 : n;                                                                  \
    }
SB_CSR_AVX512_FN(f32, "avx512f", float, __m512, __mmask16, 16, ps, __m512i, _mm512,
                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
SB_CSR_AVX512_FN(f64, "avx512f,avx512vl", double, __m512d, __mmask8, 8, pd, __m256i, _mm256,
                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
#undef SB_CSR_AVX512_FN
#endif

#endif
