/* Sparse-input products (see sparsebptt/kernels/sparse_input/cpu.py): sp_csr lists a mostly-zero
   input's nonzeros, sp_mm projects them (x W^T + b), sp_mm_t takes the weight gradient from
   them; _f32 and _f64, one copy of sparse_input_body.h per type. */
#include <stddef.h>
#include <string.h>

#include "cbuild.h"

/* the products get a copy per vector width, picked at load time */
#define CLONES SB_CLONES("avx512f", "avx2", "default")

#include "sparse_input.h"

#define T float
#define SUF f32
#include "sparse_input_body.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "sparse_input_body.h"
#undef T
#undef SUF
