/* EGRU's sparse-backward kernels (see sparsebptt/kernels/egru/cpu.py): masked_rows_dot and
   masked_rows_axpy, each _f32 and _f64, one copy of egru_body.h per type; AVX2 + FMA loops where
   the CPU has them (chosen at run time), else plain C; denormals flushed to zero while a kernel
   runs. */
#include <stddef.h>
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

/* float: 8 lanes of __m256, the _ps intrinsics */
#define T float
#define SUF f32
#define VT __m256
#define LANES 8
#define PS ps
#include "egru_body.h"

/* double: 4 lanes of __m256d, the _pd intrinsics */
#define T double
#define SUF f64
#define VT __m256d
#define LANES 4
#define PS pd
#include "egru_body.h"
