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


/* SB_BASELINE_ONLY (set by $SPARSEBPTT_KERNEL_BASELINE=1, see cbuild.py): build as for an x86-64
   CPU without AVX: no clones, and SB_CPU_HAS says no to every feature, so the tests can run the
   baseline code on a machine that has AVX-512 */
#ifdef SB_BASELINE_ONLY
#define SB_CPU_HAS(feature) 0
#define SB_CLONES(...)
#else
#define SB_CPU_HAS(feature) __builtin_cpu_supports(feature)
#endif

/* SB_CLONES("avx2", "default"): a copy of a function per target, picked by the loader (ifunc), on
   x86-64 Linux with a compiler that has target_clones; elsewhere the one baseline function */
#if !defined(SB_CLONES) && defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define SB_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#endif
#endif
#ifndef SB_CLONES
#define SB_CLONES(...)
#endif

#endif
