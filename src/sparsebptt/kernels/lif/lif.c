/* Fused CPU LIF kernels (see sparsebptt/kernels/lif/cpu.py for the equations and the backward):
   lif_fwd_f32 / lif_bwd_f32 and lif_fwd_f64 / lif_bwd_f64, one copy of lif_body.h per type. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "cbuild.h"

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
