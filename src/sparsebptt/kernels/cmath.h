/* The scalar math the fused C kernels share, for one scalar type: a kernel's <cell>.c includes it
   once per type, after `#define T float`, `#define SUF f32`, `#define TBITS 32` (or double, f64,
   64), before its own body. It defines FN(exp), FN(sigm), FN(tanh), FN(axpy), FN(dot) (static
   inline, so each library gets its own copy) and undefines its constants at its end; T, SUF and
   TBITS stay for the body. */

/* exp's constants: I the same-width integer; the clamp (LO, HI) where 2^n stays normal, the
   rounding constant (1.5 * 2^mantissa bits: adding it rounds to an integer), ln2 in two parts,
   the exponent bias and mantissa bits, and the polynomial (Cephes) */
#if TBITS == 32
/* Cephes expf: degree-5 polynomial on |r| <= ln2/2 */
#define I int32_t
#define EXP_LO -87.0
#define EXP_HI 88.0
#define EXP_MAGIC 12582912.0
#define EXP_C1 0.693359375
#define EXP_C2 -2.12194440e-4
#define EXP_BIAS 127
#define EXP_MANT 23
#define EXP_POLY \
    const T r2 = r * r; T p = (T)1.9875691500E-4; p = p * r + (T)1.3981999507E-3; \
    p = p * r + (T)8.3334519073E-3; p = p * r + (T)4.1665795894E-2; \
    p = p * r + (T)1.6666665459E-1; p = p * r + (T)5.0000001201E-1; p = p * r2 + r; \
    p = p + (T)1;
#elif TBITS == 64
/* Cephes exp, the Pade form 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)) */
#define I int64_t
#define EXP_LO -708.0
#define EXP_HI 708.0
#define EXP_MAGIC 6755399441055744.0
#define EXP_C1 6.93145751953125E-1
#define EXP_C2 1.42860682030941723212E-6
#define EXP_BIAS 1023
#define EXP_MANT 52
#define EXP_POLY \
    const T r2 = r * r; \
    const T px = r * ((1.26177193074810590878E-4 * r2 + 3.02994407707441961300E-2) * r2 \
                      + 9.99999999999999999910E-1); \
    const T qx = ((3.00198505138664455042E-6 * r2 + 2.52448340349684104192E-3) * r2 \
                  + 2.27265548208155028766E-1) * r2 + 2.00000000000000000009E0; \
    T p = px / (qx - px); p = (T)1 + (T)2 * p;
#else
#error "define TBITS as 32 (float) or 64 (double) before including cmath.h"
#endif

/* exp(x): x = n ln2 + r (ln2 in two parts), a polynomial in r, times 2^n built in the exponent
   bits; no branch and no libm call, so loops over it vectorise. Clamped where 2^n stays normal. */
INL T FN(exp)(T x) {
    x = x < (T)EXP_LO ? (T)EXP_LO : x;
    x = x > (T)EXP_HI ? (T)EXP_HI : x;
    const T magic = (T)EXP_MAGIC;
    const T t = x * (T)1.44269504088896340736 + magic;
    const T fn = t - magic;
    I bits, mbits;
    memcpy(&bits, &t, sizeof bits);
    memcpy(&mbits, &magic, sizeof mbits);
    const I n = bits - mbits;
    T r = x - fn * (T)EXP_C1;
    r = r - fn * (T)EXP_C2;
    EXP_POLY
    const I sb = (n + EXP_BIAS) << EXP_MANT;
    T s;
    memcpy(&s, &sb, sizeof s);
    return p * s;
}
INL T FN(sigm)(const T x) { return (T)1 / ((T)1 + FN(exp)(-x)); }
INL T FN(tanh)(const T x) { return (T)1 - (T)2 / ((T)1 + FN(exp)((T)2 * x)); }

/* y += a x over n entries */
INL void FN(axpy)(T* restrict y, const T a, const T* restrict x, const long n) {
    for (long i = 0; i < n; ++i) y[i] += a * x[i];
}
/* a . b: 16 running sums (straight-line, so the compiler keeps them in one or two vectors) */
INL T FN(dot)(const T* restrict a, const T* restrict b, const long n) {
    T s[16] = {0};
    long i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; ++k) s[k] += a[i + k] * b[i + k];
    T r = 0;
    for (int k = 0; k < 16; ++k) r += s[k];
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
}

#undef I
#undef EXP_LO
#undef EXP_HI
#undef EXP_MAGIC
#undef EXP_C1
#undef EXP_C2
#undef EXP_BIAS
#undef EXP_MANT
#undef EXP_POLY
