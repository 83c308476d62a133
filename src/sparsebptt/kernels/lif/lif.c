/* Fused CPU LIF kernels (see sparsebptt/kernels/lif/cpu.py for the equations and the backward):
   lif_fwd/lif_bwd and the layer calls over sparse inputs (sparse_input_body.h's products),
   _f32 and _f64, one copy of lif_body.h per type. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "cbuild.h"

/* the sparse-input products get a copy per vector width, picked at load time */
#define CLONES SB_CLONES("avx512f", "avx2", "default")

#include "sparse_input/sparse_input.h"  /* sp_csr's AVX-512 version */

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
