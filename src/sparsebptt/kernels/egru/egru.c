/* EGRU's sparse-backward kernels (see sparsebptt/kernels/egru/cpu.py): masked_rows_dot,
   masked_rows_axpy and the segment scan egru_fwd / egru_bwd, each _f32 and _f64, one copy of
   egru_body.h per type; AVX2 + FMA loops where the CPU has them (chosen at run time), else plain C; denormals flushed to zero while a kernel
   runs. */
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

#ifndef EGRU_FWD_BY_SAMPLE
#define EGRU_FWD_BY_SAMPLE 0  /* 1: the forward's W_hh y per sample (see egru_body.h) */
#endif

/* the segment scan's entry points (egru_fwd, egru_bwd): an AVX-512 and an AVX2 copy beside the
   baseline one, picked by the loader (ifunc) */
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif

/* float: 8 lanes of __m256, the _ps intrinsics; exp as in rnn.c (I: the same-width integer) */
#define T float
#define SUF f32
#define VT __m256
#define LANES 8
#define PS ps
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
#include "egru_body.h"

/* double: 4 lanes of __m256d, the _pd intrinsics */
#define T double
#define SUF f64
#define VT __m256d
#define LANES 4
#define PS pd
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
#include "egru_body.h"
