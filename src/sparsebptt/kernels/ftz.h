/* Denormals flushed to zero while a kernel runs (FTZ and DAZ on x86; a no-op elsewhere): denormal
   operands (gate derivatives of saturated units underflow there) cost a microcode assist per
   operation, and a kernel ran 6x slower on a trained EGRU's gradients than on random ones. Values
   below 1.2e-38 in float32 become zero. Included once by a kernel's <cell>.c (egru.c, delta.c);
   defines X86. ftz_on() returns the old control word for ftz_off(). */
#ifndef SPARSEBPTT_FTZ_H
#define SPARSEBPTT_FTZ_H
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
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
#endif
