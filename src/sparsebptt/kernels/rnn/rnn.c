/* Fused CPU GRU and LSTM gate math (see sparsebptt/kernels/rnn/cpu.py for the equations and the
   backward): gru_fwd / gru_bwd / gru_hist and lstm_fwd / lstm_bwd / lstm_hist, each _f32 and _f64,
   one copy of rnn_body.h per type. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cbuild.h"

/* an AVX2 copy of each entry point beside the baseline one, picked by the loader (ifunc) */
#define CLONES SB_CLONES("avx2", "default")

/* float, then double; exp, sigmoid and tanh from cmath.h */
#define T float
#define SUF f32
#define TBITS 32
#include "cmath.h"
#include "rnn_body.h"

#define T double
#define SUF f64
#define TBITS 64
#include "cmath.h"
#include "rnn_body.h"
