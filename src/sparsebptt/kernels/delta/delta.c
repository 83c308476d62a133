/* Delta GRU / Delta LSTM segment kernels for the "cpu" backend (see sparsebptt/kernels/delta/cpu.py
   for the equations and the backward): delta_fwd and delta_bwd, each _f32 and _f64, one copy of
   delta_body.h per type. The weights come transposed (W^T [in, G*H]): an active input column is
   one contiguous row, read once per step for every sample that has it active (an axpy per active
   entry forward, a dot per active entry and an axpy per event into dW^T backward). An AVX-512
   and an AVX2 copy of each entry point beside the baseline one, picked by the loader (ifunc).
   Denormals are flushed to zero while a kernel runs (FTZ/DAZ on x86), (ftz.h). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "ftz.h"  /* X86, ftz_on/ftz_off */

#include "cbuild.h"

/* fused multiply-adds in these kernels (the build turns them off for the gate kernels that must
   round as torch does; here the products are sums in another order anyway) */
#pragma GCC optimize("fp-contract=fast")

#ifndef UPD_CHUNK
#define UPD_CHUNK (1L << 30)  /* output columns per pass of the forward update: one pass (chunks of
                                   128-2048 gained nothing: benchmarks/delta_blocking.py) */
#endif

#define CLONES SB_CLONES("avx512f", "avx2", "default")

/* float, then double; exp, sigmoid, tanh, axpy and dot from cmath.h */
#define T float
#define SUF f32
#define TBITS 32
#include "cmath.h"
#include "delta_body.h"

#define T double
#define SUF f64
#define TBITS 64
#include "cmath.h"
#include "delta_body.h"
