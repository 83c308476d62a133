/* EGRU's register-blocked sparse products for one scalar type and one vector width (issue 17):
   included by egru_body.h with T, SUF, PS (ps or pd) and VW (512 or 256), VEC (the vector type),
   VLN (its lanes), VTGT (the target string), VHSUM(v) (the sum of a vector's lanes) and VMASK(v)
   (the bit mask of its non-zero lanes) defined.
   FV(name) names the copy name_<SUF>_<VW>; each is compiled for its target only and called only
   when the CPU has it (egru_body.h's dispatch). Multiply-adds are fused here (these are sums of
   products whose order differs from torch's anyway); the pointwise math is not (cbuild's
   -ffp-contract=off). */
#define SB_MMV_(w) _mm##w
#define SB_MMV(w) SB_MMV_(w)
#define VOP(op) SB_CAT(SB_CAT(SB_MMV(VW), op), PS)
#define FV(name) SB_CAT(FN(name), VW)

/* acc_rows' block of NV vectors at o (NV a constant after inlining: its accumulators stay in
   registers while the m rows are added, one load per multiply-add) */
__attribute__((always_inline, target(VTGT)))
static inline void FV(acc_block)(T* out, const T* init, const T* base, long stride, const long* idx,
                                 const T* vals, long m, long o, const int NV) {
    VEC a[8];
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) a[k] = VOP(loadu)(init + o + k * VLN);
    for (long q = 0; q < m; ++q) {
        const VEC v = VOP(set1)(vals[q]);
        const T* p = base + idx[q] * stride + o;
#pragma GCC unroll 8
        for (int k = 0; k < NV; ++k) a[k] = VOP(fmadd)(v, VOP(loadu)(p + k * VLN), a[k]);
    }
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) VOP(storeu)(out + o + k * VLN, a[k]);
}

/* out[o] = init[o] + sum_{q < m} vals[q] base[idx[q] stride + o] for o < n (out may be init):
   blocks of 8 vectors of out held in registers while the m rows are added, then 4, then single
   vectors, then scalars. The forward's W_hh y over a sample's events (base = W_hh^T, idx = its
   units) and the weight gradient's dW_hh^T[j] over the events of unit j in a block of steps
   (base = dL/d(W_hh y) rows, idx = their (t, b)). */
__attribute__((target(VTGT)))
static void FV(acc_rows)(T* out, const T* init, const T* base, long stride, const long* idx,
                         const T* vals, long m, long n) {
    long o = 0;
    for (; o + 8 * VLN <= n; o += 8 * VLN) FV(acc_block)(out, init, base, stride, idx, vals, m, o, 8);
    for (; o + 4 * VLN <= n; o += 4 * VLN) FV(acc_block)(out, init, base, stride, idx, vals, m, o, 4);
    for (; o + VLN <= n; o += VLN) FV(acc_block)(out, init, base, stride, idx, vals, m, o, 1);
    for (; o < n; ++o) {
        T a = init[o];
        for (long q = 0; q < m; ++q) a += vals[q] * base[idx[q] * stride + o];
        out[o] = a;
    }
}

/* dw_block's column chunk: DWN vectors (6 for AVX-512, leaving registers for dw_quad's 4 x 6
   accumulators; 8 for AVX2) */
#define DWN (VW == 512 ? 6 : 8)

/* The weight gradient's tile (dw_block): for each unit j < H with events in a sub-block (its
   rows at rows[at[j] .. at[j + 1]), their y at vals[..]), gw[j O + o] += sum_e vals[e]
   pk[rows[e] DWN VLN + o], o < DWN VLN (one column chunk of dW_hh^T's row j): the chunk held in
   registers while the packed dgh rows of its events are added (pk: the sub-block's rows of this
   chunk, contiguous, in L1; the broadcast y times one loaded vector per multiply-add; with
   AVX-512 two events at a time into two sets of accumulators, summed at the end). pf != 0:
   unit j's next chunk (gw + pf) is prefetched into L2 meanwhile. */
__attribute__((target(VTGT)))
static void FV(dw_tile)(T* gw, long O, const T* pk, const unsigned char* rows, const long* at,
                        const T* vals, long H, long pf) {
    for (long j = 0; j < H; ++j) {
        long e = at[j];
        const long e1 = at[j + 1];
        if (e == e1) continue;
        T* g = gw + j * O;
        if (pf)
            for (int k = 0; k < DWN * VLN * (int)sizeof(T); k += 64) _mm_prefetch((const char*)(g + pf) + k, _MM_HINT_T1);
        VEC a[DWN], b[DWN];
#pragma GCC unroll 8
        for (int i = 0; i < DWN; ++i) { a[i] = VOP(loadu)(g + i * VLN); b[i] = VOP(setzero)(); }
#if VW == 512
        for (; e + 2 <= e1; e += 2) {  /* two events at a time, into two sets of accumulators */
            const VEC v = VOP(set1)(vals[e]), u = VOP(set1)(vals[e + 1]);
            const T* p = pk + (long)rows[e] * DWN * VLN;
            const T* q = pk + (long)rows[e + 1] * DWN * VLN;
#pragma GCC unroll 8
            for (int i = 0; i < DWN; ++i) {
                a[i] = VOP(fmadd)(v, VOP(loadu)(p + i * VLN), a[i]);
                b[i] = VOP(fmadd)(u, VOP(loadu)(q + i * VLN), b[i]);
            }
        }
#endif
        for (; e < e1; ++e) {
            const VEC v = VOP(set1)(vals[e]);
            const T* p = pk + (long)rows[e] * DWN * VLN;
#pragma GCC unroll 8
            for (int i = 0; i < DWN; ++i) a[i] = VOP(fmadd)(v, VOP(loadu)(p + i * VLN), a[i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < DWN; ++i) VOP(storeu)(g + i * VLN, VOP(add)(a[i], b[i]));
    }
}

#if VW == 512
/* dw_tile for groups of 4 units that fire at most of the same rows (quads [nq, 6]: the units,
   then the range [k0, k1) of their union's rows qrows and y qvals [k, 4], zero where a unit has
   no event): each loaded vector of a packed row serves the 4 units (4 x DWN accumulators), a
   multiply by zero where one does not fire. */
__attribute__((target(VTGT)))
static void FV(dw_quad)(T* gw, long O, const T* pk, const long* quads, long nq,
                        const unsigned char* qrows, const T* qvals, long pf) {
    for (long i = 0; i < nq; ++i) {
        const long* qd = quads + 6 * i;
        T* g[4] = {gw + qd[0] * O, gw + qd[1] * O, gw + qd[2] * O, gw + qd[3] * O};
        if (pf)
            for (int u = 0; u < 4; ++u)
                for (int k = 0; k < DWN * VLN * (int)sizeof(T); k += 64) _mm_prefetch((const char*)(g[u] + pf) + k, _MM_HINT_T1);
        VEC a[4][DWN];
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u)
#pragma GCC unroll 8
            for (int v = 0; v < DWN; ++v) a[u][v] = VOP(loadu)(g[u] + v * VLN);
        for (long k = qd[4]; k < qd[5]; ++k) {
            const T* p = pk + (long)qrows[k] * DWN * VLN;
            const VEC y0 = VOP(set1)(qvals[4 * k]), y1 = VOP(set1)(qvals[4 * k + 1]);
            const VEC y2 = VOP(set1)(qvals[4 * k + 2]), y3 = VOP(set1)(qvals[4 * k + 3]);
#pragma GCC unroll 8
            for (int v = 0; v < DWN; ++v) {
                const VEC x = VOP(loadu)(p + v * VLN);
                a[0][v] = VOP(fmadd)(y0, x, a[0][v]);
                a[1][v] = VOP(fmadd)(y1, x, a[1][v]);
                a[2][v] = VOP(fmadd)(y2, x, a[2][v]);
                a[3][v] = VOP(fmadd)(y3, x, a[3][v]);
            }
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u)
#pragma GCC unroll 8
            for (int v = 0; v < DWN; ++v) VOP(storeu)(g[u] + v * VLN, a[u][v]);
    }
}
#endif

/* msk[j] |= bit where y[j] != 0, j < n (dw_block's event masks: one row's bit) */
__attribute__((target(VTGT)))
static void FV(dw_bits)(const T* restrict y, long n, uint64_t* restrict msk, uint64_t bit) {
    for (long j = 0; j < n; ++j) msk[j] |= y[j] != (T)0 ? bit : 0;
}

/* out[q] = w . a[q] over n entries for q < K (K = 1..4, a constant after inlining): each chunk
   of w loaded once for the K samples, two vectors per sample in flight (2K accumulators) */
__attribute__((always_inline, target(VTGT)))
static inline void FV(dotk)(const T* w, const T* const* a, long n, T* out, const int K) {
    const T* a0 = a[0];
    const T* a1 = K > 1 ? a[1] : a0;
    const T* a2 = K > 2 ? a[2] : a0;
    const T* a3 = K > 3 ? a[3] : a0;
    VEC s00 = VOP(setzero)(), s01 = VOP(setzero)(), s10 = VOP(setzero)(), s11 = VOP(setzero)();
    VEC s20 = VOP(setzero)(), s21 = VOP(setzero)(), s30 = VOP(setzero)(), s31 = VOP(setzero)();
    long i = 0;
    for (; i + 2 * VLN <= n; i += 2 * VLN) {
        const VEC w0 = VOP(loadu)(w + i), w1 = VOP(loadu)(w + i + VLN);
        s00 = VOP(fmadd)(w0, VOP(loadu)(a0 + i), s00);
        s01 = VOP(fmadd)(w1, VOP(loadu)(a0 + i + VLN), s01);
        if (K > 1) {
            s10 = VOP(fmadd)(w0, VOP(loadu)(a1 + i), s10);
            s11 = VOP(fmadd)(w1, VOP(loadu)(a1 + i + VLN), s11);
        }
        if (K > 2) {
            s20 = VOP(fmadd)(w0, VOP(loadu)(a2 + i), s20);
            s21 = VOP(fmadd)(w1, VOP(loadu)(a2 + i + VLN), s21);
        }
        if (K > 3) {
            s30 = VOP(fmadd)(w0, VOP(loadu)(a3 + i), s30);
            s31 = VOP(fmadd)(w1, VOP(loadu)(a3 + i + VLN), s31);
        }
    }
    for (; i + VLN <= n; i += VLN) {
        const VEC w0 = VOP(loadu)(w + i);
        s00 = VOP(fmadd)(w0, VOP(loadu)(a0 + i), s00);
        if (K > 1) s10 = VOP(fmadd)(w0, VOP(loadu)(a1 + i), s10);
        if (K > 2) s20 = VOP(fmadd)(w0, VOP(loadu)(a2 + i), s20);
        if (K > 3) s30 = VOP(fmadd)(w0, VOP(loadu)(a3 + i), s30);
    }
    T r0 = VHSUM(VOP(add)(s00, s01)), r1 = 0, r2 = 0, r3 = 0;
    if (K > 1) r1 = VHSUM(VOP(add)(s10, s11));
    if (K > 2) r2 = VHSUM(VOP(add)(s20, s21));
    if (K > 3) r3 = VHSUM(VOP(add)(s30, s31));
    for (; i < n; ++i) {
        r0 += w[i] * a0[i];
        if (K > 1) r1 += w[i] * a1[i];
        if (K > 2) r2 += w[i] * a2[i];
        if (K > 3) r3 += w[i] * a3[i];
    }
    out[0] = r0;
    if (K > 1) out[1] = r1;
    if (K > 2) out[2] = r2;
    if (K > 3) out[3] = r3;
}

/* out[u * 4 + q] = w[u] . a[q] over n entries for u < JU (2 or 4 units), q < K (1..4 samples;
   constants after inlining): a tile of JU x K accumulators, each loaded chunk of a sample's row
   used for JU units and each chunk of a unit's row for K samples (loads per multiply-add
   (JU + K) / (JU K), against (1 + K) / K for one unit) */
__attribute__((always_inline, target(VTGT)))
static inline void FV(tilek)(const T* const* w, const T* const* a, long n, T* out, const int JU,
                             const int K) {
    VEC s[4][4];
    for (int u = 0; u < 4; ++u)
        for (int q = 0; q < 4; ++q) s[u][q] = VOP(setzero)();
    long i = 0;
    for (; i + VLN <= n; i += VLN) {
        VEC wv[4], av[4];
        for (int u = 0; u < JU; ++u) wv[u] = VOP(loadu)(w[u] + i);
        for (int q = 0; q < K; ++q) av[q] = VOP(loadu)(a[q] + i);
        for (int u = 0; u < JU; ++u)
            for (int q = 0; q < K; ++q) s[u][q] = VOP(fmadd)(wv[u], av[q], s[u][q]);
    }
    for (int u = 0; u < JU; ++u)
        for (int q = 0; q < K; ++q) {
            T r = VHSUM(s[u][q]);
            for (long l = i; l < n; ++l) r += w[u][l] * a[q][l];
            out[u * 4 + q] = r;
        }
}

/* out[u * 4 + q] = w[u] . a[q] over n entries, u < ju (2 or 4), q < k (1..4) */
__attribute__((target(VTGT)))
static void FV(tile)(const T* const* w, const T* const* a, int ju, int k, long n, T* out) {
    if (ju == 4) {
        switch (k) {
        case 1: FV(tilek)(w, a, n, out, 4, 1); break;
        case 2: FV(tilek)(w, a, n, out, 4, 2); break;
        case 3: FV(tilek)(w, a, n, out, 4, 3); break;
        default: FV(tilek)(w, a, n, out, 4, 4); break;
        }
    } else {
        switch (k) {
        case 1: FV(tilek)(w, a, n, out, 2, 1); break;
        case 2: FV(tilek)(w, a, n, out, 2, 2); break;
        case 3: FV(tilek)(w, a, n, out, 2, 3); break;
        default: FV(tilek)(w, a, n, out, 2, 4); break;
        }
    }
}

/* out[q] = w . a[q] over n entries for q < k (k = 1..4) */
__attribute__((target(VTGT)))
static void FV(dots)(const T* w, const T* const* a, int k, long n, T* out) {
    switch (k) {
    case 1: FV(dotk)(w, a, n, out, 1); break;
    case 2: FV(dotk)(w, a, n, out, 2); break;
    case 3: FV(dotk)(w, a, n, out, 3); break;
    default: FV(dotk)(w, a, n, out, 4); break;
    }
}

/* The non-zero entries of y [n]: their indices into js and values into vs (in order); returns
   their count. One compare per vector, then one pass per non-zero entry over the mask's bits (a
   plain loop branches on every entry: ~15 % of them are non-zero, unpredictably). */
__attribute__((target(VTGT)))
static long FV(nonzeros)(const T* y, long n, long* js, T* vs) {
    long k = 0, j = 0;
    for (; j + VLN <= n; j += VLN) {
        unsigned int m = VMASK(VOP(loadu)(y + j));
        while (m) {
            const int q = __builtin_ctz(m);
            m &= m - 1;
            js[k] = j + q;
            vs[k] = y[j + q];
            ++k;
        }
    }
    for (; j < n; ++j)
        if (y[j] != (T)0) { js[k] = j; vs[k] = y[j]; ++k; }
    return k;
}

#undef DWN
#undef FV
#undef VOP
#undef SB_MMV
#undef SB_MMV_
/* this width's parameters end here */
#undef VW
#undef VEC
#undef VLN
#undef VTGT
#undef VHSUM
#undef VMASK
