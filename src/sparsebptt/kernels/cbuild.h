/* Shared by the package's C kernels (built by sparsebptt/kernels/cbuild.py, which puts this
   directory on the include path). A kernel file <cell>.c instantiates its body file
   <cell>_body.h once per scalar type: it defines T float and SUF f32, includes the body (in
   which FN(lif_fwd) names lif_fwd_f32; the body undefines its parameters at its end), then
   does the same with double / f64. */
#ifndef SPARSEBPTT_CBUILD_H
#define SPARSEBPTT_CBUILD_H

#define INL static inline __attribute__((always_inline))

#define SB_CAT_(a, b) a##_##b
#define SB_CAT(a, b) SB_CAT_(a, b)
/* FN(name): name_SUF, the copy of a function for the scalar type being instantiated */
#define FN(name) SB_CAT(name, SUF)

#endif
