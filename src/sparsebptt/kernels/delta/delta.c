/* Delta GRU / Delta LSTM segment kernels for the "cpu" backend (see sparsebptt/kernels/delta/cpu.py
   for the equations and the backward): delta_fwd and delta_bwd, each _f32 and _f64, one copy of
   delta_body.h per type. The weights come transposed (W^T [in, G*H]): an active input column is
   one contiguous row, read once per step for every sample that has it active (an axpy per active
   entry forward, a dot per active entry and an axpy per event into dW^T backward). An AVX-512
   and an AVX2 copy of each entry point beside the baseline one, picked by the loader (ifunc).
   Denormals are flushed to zero while a kernel runs (FTZ/DAZ on x86), as in egru.c. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

#include "cbuild.h"

/* fused multiply-adds in these kernels (the build turns them off for the gate kernels that must
   round as torch does; here the products are sums in another order anyway) */
#pragma GCC optimize("fp-contract=fast")

#ifndef UPD_CHUNK
#define UPD_CHUNK (1L << 30)  /* output columns per pass of the forward update: one pass (chunks of
                                   128-2048 gained nothing: benchmarks/delta_blocking.py) */
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif

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

/* float: exp as in rnn.c (Cephes expf, branch-free so the gate loops vectorise) */
#define T float
#define SUF f32
#define I int32_t
#define EXP_LO -87.0
#define EXP_HI 88.0
#define EXP_MAGIC 12582912.0
#define EXP_C1 0.693359375
#define EXP_C2 -2.12194440e-4
#define EXP_BIAS 127
#define EXP_MANT 23
#define EXP_POLY \
    const T r2 = r * r; T p = (T)1.9875691500E-4; p = p * r + (T)1.3981999507E-3; \
    p = p * r + (T)8.3334519073E-3; p = p * r + (T)4.1665795894E-2; \
    p = p * r + (T)1.6666665459E-1; p = p * r + (T)5.0000001201E-1; p = p * r2 + r; \
    p = p + (T)1;
#include "delta_body.h"

#define T double
#define SUF f64
#define I int64_t
#define EXP_LO -708.0
#define EXP_HI 708.0
#define EXP_MAGIC 6755399441055744.0
#define EXP_C1 6.93145751953125E-1
#define EXP_C2 1.42860682030941723212E-6
#define EXP_BIAS 1023
#define EXP_MANT 52
#define EXP_POLY \
    const T r2 = r * r; \
    const T px = r * ((1.26177193074810590878E-4 * r2 + 3.02994407707441961300E-2) * r2 \
                      + 9.99999999999999999910E-1); \
    const T qx = ((3.00198505138664455042E-6 * r2 + 2.52448340349684104192E-3) * r2 \
                  + 2.27265548208155028766E-1) * r2 + 2.00000000000000000009E0; \
    T p = px / (qx - px); p = (T)1 + (T)2 * p;
#include "delta_body.h"
