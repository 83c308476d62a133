/* EGRU's sparse-backward kernels (see sparsebptt/kernels/egru/cpu.py): masked_rows_dot,
   masked_rows_axpy and the segment scan egru_fwd / egru_bwd, each _f32 and _f64, one copy of
   egru_body.h per type; AVX2 + FMA loops where the CPU has them (chosen at run time), else plain C;
   the register-blocked products (egru_mm.h) also in AVX-512 where the CPU has it; denormals flushed to zero while a kernel
   runs. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "ftz.h"  /* X86, ftz_on/ftz_off */

#include "cbuild.h"

static int simd = -1;  /* 1: AVX2 + FMA, 0: plain C; decided at the first call */
static int use_simd(void) {
    if (simd < 0) {
#if X86
        __builtin_cpu_init();
        simd = SB_CPU_HAS("avx2") && SB_CPU_HAS("fma");
#else
        simd = 0;
#endif
    }
    return simd;
}
int egru_simd(void) { return use_simd(); }

#ifndef SB_OMP
#define SB_OMP 0  /* 1: built with -fopenmp (cbuild, for a source with OpenMP pragmas, when the compiler can) */
#endif
/* the threads the segment scan's parallel loops (forward; the backward's dots and dW_hh blocks)
   are shared out among (OpenMP: torch's own runtime, the library binds to the libgomp torch has
   loaded); the caller sets it to torch.get_num_threads() before each call */
static int egru_nt = 1;
void egru_set_threads(int n) { egru_nt = SB_OMP && n > 1 ? n : 1; }
int egru_openmp(void) { return SB_OMP; }

#if EGRU_TIMING && X86
/* -DEGRU_TIMING=1 (benchmarks only): the backward's time stamp counter ticks per part, summed in
   egru_tsc: pointwise, dL/dy dots, dW_hh blocks */
unsigned long long egru_tsc[4];
static unsigned long long egru_t0;
#define EGRU_TICK(i) do { const unsigned long long n_ = __rdtsc(); \
    if (i) egru_tsc[(i) - 1] += n_ - egru_t0; egru_t0 = n_; } while (0)
#else
#define EGRU_TICK(i) do { } while (0)
#endif

static int isa = -1, isa_cap = 2;  /* 2: AVX-512F, 1: AVX2 + FMA, 0: plain C; decided at the first call */
static int isa_level(void) {
    if (isa < 0) {
#if X86
        __builtin_cpu_init();
        isa = SB_CPU_HAS("avx512f") ? 2 : use_simd();
#else
        isa = 0;
#endif
    }
    return isa < isa_cap ? isa : isa_cap;
}
/* the register-blocked products' instruction set (2, 1, 0 as isa_level); cap >= 0 caps it (tests
   run every copy the CPU has) */
int egru_isa(int cap) {
    if (cap >= 0) isa_cap = cap;
    return isa_level();
}

#ifndef EGRU_FWD_BY_SAMPLE
#define EGRU_FWD_BY_SAMPLE 1  /* 0: the forward's W_hh y in column order (axpys; see egru_body.h) */
#endif
#ifndef EGRU_ALTERNATE
#define EGRU_ALTERNATE 1  /* 0: W_hh^T's rows (chunks) in one order every step (see masked_dots) */
#endif
#ifndef FCH
#define FCH (1024 / (long)sizeof(T))  /* the forward's chunk of outputs: 1 KiB per sample */
#endif

/* the segment scan's entry points (egru_fwd, egru_bwd): an AVX-512 and an AVX2 copy beside the
   baseline one, picked by the loader (ifunc) */
#define CLONES SB_CLONES("avx512f", "avx2", "default")

/* float: 8 lanes of __m256, the _ps intrinsics (exp, sigmoid, tanh, axpy, dot
   from cmath.h) */
#define T float
#define SUF f32
#define TBITS 32
#define VT __m256
#define LANES 8
#define PS ps
#define VT512 __m512
#include "cmath.h"
#include "egru_body.h"

/* double: 4 lanes of __m256d, the _pd intrinsics */
#define T double
#define SUF f64
#define TBITS 64
#define VT __m256d
#define LANES 4
#define PS pd
#define VT512 __m512d
#include "cmath.h"
#include "egru_body.h"
