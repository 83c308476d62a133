/* The LIF kernels for one scalar type: included by lif.c with T (the C type), SUF (the name
   suffix) and FABS (its fabs) defined. Every flag combination gets its own specialised loop (the
   switch cases below: the flags are constants after inlining, so no branch is left inside the
   loops). */

INL T FN(surrogate)(const T x, const int kind, const T c_scale, const T c_k, const T c_a) {
    if (kind == 0) { const T a = c_scale * FABS(x) + (T)1; return (T)1 / (a * a); }
    if (kind == 1) { const T y = c_k * x; return c_a / ((T)1 + y * y); }
    if (kind == 3) { const T sg = (T)1 / ((T)1 + EXP(-(c_scale * x))); return ((T)1 - sg) * sg * c_scale; }
    { const T r = (T)1 - FABS(x) / c_scale; return r > (T)0 ? r : (T)0; }
}
/* forward over the segment; u or z may alias i (each element of u_t, z_t is written after that
   element of i_t is read). after: the
   reset of the previous step's spike r = H(v_{t-1} - th) is applied after the decay (the state
   holds the membrane before its reset: v_t = u_t) */
INL void FN(fwd_loop)(const T* i, const T* beta, const T bs, const T th, const long L,
                      const long B, const long H, T* z, T* u, T* vT,
                      const int reset_zero, const int after, const int has_beta, const int save_u) {
    const long N = B * H;
    for (long t = 0; t < L; ++t) {
        for (long b = 0; b < B; ++b) {
            T* p_v = vT + b * H; const T* p_i = i + t * N + b * H; T* p_z = z + t * N + b * H;
            T* p_u = u + t * N + b * H;
            for (long h = 0; h < H; ++h) {
                const T b_beta = has_beta ? beta[h] : bs;
                T b_u;
                if (after) {
                    const T b_v = p_v[h]; const T b_r = b_v > th ? (T)1 : (T)0;
                    if (reset_zero) {
                        b_u = b_beta * (b_v * ((T)1 - b_r));
                        b_u = b_u + p_i[h];
                    } else {
                        b_u = b_beta * b_v;
                        b_u = b_u + p_i[h];
                        b_u = b_u - b_r * th;
                    }
                } else {
                    b_u = b_beta * p_v[h];
                    b_u = b_u + p_i[h];
                }
                const T b_z = b_u > th ? (T)1 : (T)0;
                p_z[h] = b_z;
                if (save_u) p_u[h] = b_u;
                p_v[h] = after ? b_u : reset_zero ? b_u * ((T)1 - b_z) : b_u - b_z * th;
            }
        }
    }
}
#define FWD_CASE(ad, rz, hb, su) \
    case (ad) * 8 + (rz) * 4 + (hb) * 2 + (su): \
        FN(fwd_loop)(i, beta, bs, th, L, B, H, z, u, vT, rz, ad, hb, su); break;
#define FWD_CASES(ad) FWD_CASE(ad, 0, 0, 0) FWD_CASE(ad, 0, 0, 1) FWD_CASE(ad, 0, 1, 0) FWD_CASE(ad, 0, 1, 1) \
    FWD_CASE(ad, 1, 0, 0) FWD_CASE(ad, 1, 0, 1) FWD_CASE(ad, 1, 1, 0) FWD_CASE(ad, 1, 1, 1)
CLONES void FN(lif_fwd)(const T* i, const T* v0, const T* beta, double beta_s, double th_d,
                 int reset_zero, int after, long L, long B, long H, T* z, T* u, T* vT) {
    const T th = (T)th_d; const T bs = (T)beta_s;
    memcpy(vT, v0, sizeof(T) * B * H);
    switch (after * 8 + reset_zero * 4 + (beta != NULL) * 2 + (u != NULL)) {
        FWD_CASES(0) FWD_CASES(1)
    }
}
#undef FWD_CASES
#undef FWD_CASE
/* backward over the segment, t = L-1 .. 0; g = dL/dv_t carried in dv0. after (reset after the
   decay, v_t = u_t): du_t = g_t + dz_t s(u_t - th); with v_p = v_{t-1} (u_{t-1}, or v0 at t = 0),
   r = H(v_p - th) and s_p = s(v_p - th):
     subtract: g_{t-1} = beta du_t - th du_t s_p            dbeta += du_t v_p
     zero:     g_{t-1} = beta du_t (1 - r) - beta du_t v_p s_p   dbeta += du_t v_p (1 - r)
   (the s_p terms only without detach). v0 is read whenever after or dbeta is set. */
INL void FN(bwd_loop)(const T* u, const T* dz, const long dz_st, const T* v0, const T* beta,
                      const T bs,
                      const T th, const T c_scale, const T c_k, const T c_a, const long L,
                      const long B, const long H, T* di, T* g, double* dbeta, const int kind,
                      const int reset_zero, const int detach, const int after, const int beta_mode) {
    const long N = B * H;
    for (long t = L - 1; t >= 0; --t) {
        for (long b = 0; b < B; ++b) {
            const long o = t * N + b * H;
            const T* p_u = u + o; const T* p_dz = dz + t * dz_st + b * H; T* p_di = di + o;
            T* p_g = g + b * H;
            const T* p_up = t > 0 ? u + o - N : NULL; const T* p_v0 = v0 + b * H;
            for (long h = 0; h < H; ++h) {
                const T b_u = p_u[h]; const T b_g = p_g[h]; const T b_dz = p_dz[h];
                const T b_s = FN(surrogate)(b_u - th, kind, c_scale, c_k, c_a);
                const T b_beta = beta_mode ? beta[h] : bs;
                if (after) {
                    const T b_du = b_g + b_dz * b_s;
                    p_di[h] = b_du;
                    const T v_p = p_up ? p_up[h] : p_v0[h];
                    const T keep = v_p > th ? (T)0 : (T)1;
                    T b_gp;
                    if (reset_zero) {
                        b_gp = b_beta * b_du * keep;
                        if (!detach)
                            b_gp = b_gp - b_beta * b_du * v_p * FN(surrogate)(v_p - th, kind, c_scale, c_k, c_a);
                        if (beta_mode == 2) dbeta[h] += (double)b_du * (double)(v_p * keep);
                    } else {
                        b_gp = b_beta * b_du;
                        if (!detach) b_gp = b_gp - th * b_du * FN(surrogate)(v_p - th, kind, c_scale, c_k, c_a);
                        if (beta_mode == 2) dbeta[h] += (double)b_du * (double)v_p;
                    }
                    p_g[h] = b_gp;
                    continue;
                }
                T b_du;
                if (reset_zero) {
                    const T keep = b_u > th ? (T)0 : (T)1;
                    b_du = detach ? b_g * keep + b_dz * b_s : b_g * keep + (b_dz - b_u * b_g) * b_s;
                } else {
                    b_du = detach ? b_g + b_dz * b_s : b_g + (b_dz - th * b_g) * b_s;
                }
                p_di[h] = b_du;
                if (beta_mode == 2) {
                    T v_p;
                    if (p_up) {
                        const T up = p_up[h]; const T zp = up > th ? (T)1 : (T)0;
                        v_p = reset_zero ? up * ((T)1 - zp) : up - zp * th;
                    } else {
                        v_p = p_v0[h];
                    }
                    dbeta[h] += (double)b_du * (double)v_p;
                }
                p_g[h] = b_beta * b_du;
            }
        }
    }
}
/* one case per (surrogate kind, reset, detach, reset timing, beta mode) */
#define BWD_CASE(k, rz, d, ad, bm) \
    case ((((k) * 2 + (rz)) * 2 + (d)) * 2 + (ad)) * 3 + (bm): \
        FN(bwd_loop)(u, dz, dz_st, v0, beta, bs, th, c_scale, c_k, c_a, L, B, H, di, g, dbeta, k, rz, d, ad, bm); \
        break;
#define BWD_CASES_BM(k, rz, d, ad) BWD_CASE(k, rz, d, ad, 0) BWD_CASE(k, rz, d, ad, 1) BWD_CASE(k, rz, d, ad, 2)
#define BWD_CASES_AD(k, rz, d) BWD_CASES_BM(k, rz, d, 0) BWD_CASES_BM(k, rz, d, 1)
#define BWD_CASES_D(k, rz) BWD_CASES_AD(k, rz, 0) BWD_CASES_AD(k, rz, 1)
#define BWD_CASES_RZ(k) BWD_CASES_D(k, 0) BWD_CASES_D(k, 1)
/* u [L,B,H], dz [L,B,H] (time stride dz_st: B*H, or 0 for one [B,H] slice repeated), dvT [B,H] */
/* or NULL, v0 [B,H] (read for dbeta and for after) -> di [L,B,H],                              */
/* dv0 [B,H], dbeta [H] (float64, accumulated) or NULL. beta: [H] or NULL (then beta_s).         */
CLONES void FN(lif_bwd)(const T* u, const T* dz, long dz_st, const T* dvT, const T* v0, const T* beta,
                 double beta_s, double th_d, int reset_zero, int detach, int after, int kind, double scale,
                 long L, long B, long H, T* di, T* dv0, double* dbeta) {
    const T th = (T)th_d; const T bs = (T)beta_s; const T c_scale = (T)scale;
    const T c_k = (T)(1.57079632679489661923 * scale); const T c_a = (T)(scale / 2);
    T* g = dv0;
    if (dvT) memcpy(g, dvT, sizeof(T) * B * H); else memset(g, 0, sizeof(T) * B * H);
    const int beta_mode = beta == NULL ? 0 : dbeta == NULL ? 1 : 2;
    switch (((((kind * 2 + reset_zero) * 2 + detach) * 2 + after) * 3) + beta_mode) {
        BWD_CASES_RZ(0) BWD_CASES_RZ(1) BWD_CASES_RZ(2) BWD_CASES_RZ(3)
    }
}
#undef BWD_CASE
#undef BWD_CASES_BM
#undef BWD_CASES_D
#undef BWD_CASES_AD
#undef BWD_CASES_RZ

/* ---- sparse-input products (a layer whose input is mostly zeros: spikes, events) ------------
   x [R, K] -> CSR: row r's nonzero columns, ascending, in col[ptr[r] .. ptr[r+1]], their values in
   val. Returns the number of nonzeros, or -1 as soon as it exceeds max_nnz (the caller then runs
   the dense matmul); *binary says whether every nonzero is exactly 1 (the products below then
   add rows of W^T without multiplying: the same result, as 1 * w == w). col and val must hold
   max_nnz + K + 1 entries. A NaN counts as a nonzero that is not 1 (it propagates as in a matmul). */
static long FN(csr_scalar)(const T* x, long R, long K, long max_nnz, long* ptr, int* col, T* val, int* binary) {
    long n = 0; int other = 0;
    for (long r = 0; r < R; ++r) {
        const T* xr = x + r * K;
        ptr[r] = n;
        if (n > max_nnz) return -1;
        for (long j = 0; j < K; ++j) {
            const T a = xr[j];
            col[n] = (int)j;
            val[n] = a;
            n += a != (T)0;
            other |= (a != (T)0) & (a != (T)1);
        }
    }
    ptr[R] = n;
    *binary = !other;
    return n > max_nnz ? -1 : n;
}
long FN(lif_csr)(const T* x, long R, long K, long max_nnz, long* ptr, int* col, T* val, int* binary) {
#ifdef SB_CSR_AVX512  /* lif.c: a compress-store version, where the CPU has AVX-512 */
    if (FN(csr_avx512_ok)()) return FN(csr_avx512)(x, R, K, max_nnz, ptr, col, val, binary);
#endif
    return FN(csr_scalar)(x, R, K, max_nnz, ptr, col, val, binary);
}

#define VL (64 / (long)sizeof(T))  /* lanes of a 64-byte vector */
#define VB 8                       /* vectors per block of output columns (8 accumulators) */
typedef T FN(vec) __attribute__((vector_size(64), aligned(sizeof(T))));

/* out[r, :] = bias + sum over q in row r of val[q] * wt[col[q], :]  (wt = W^T [K, H]; bias [H] or
   NULL; val NULL: every value is 1). Blocks of VB*VL output columns; per row the accumulators stay
   in registers and each nonzero input adds one row block of W^T: the sum runs over the row's
   nonzeros in ascending column order, so a row's result does not depend on the rows computed with
   it (a recomputed segment repeats the forward bit for bit, however the scan was cut). */
#define SPMM_ROW(NB, SCALE) \
    for (long q = ptr[r]; q < ptr[r + 1]; ++q) { \
        const T* w = wb + (long)col[q] * H; \
        for (int k = 0; k < (NB); ++k) acc[k] += SCALE *(const V*)(w + k * VL); \
    }
CLONES void FN(lif_spmm)(const long* ptr, const int* col, const T* val, const T* wt, const T* bias, long R, long H,
                         T* out) {
    typedef FN(vec) V;
    const long nv = H / VL;
    for (long v0 = 0; v0 < nv; v0 += VB) {
        const int nb = v0 + VB <= nv ? VB : (int)(nv - v0);
        const T* wb = wt + v0 * VL;
        for (long r = 0; r < R; ++r) {
            V acc[VB];
            for (int k = 0; k < VB; ++k) acc[k] = (V){0};
            if (bias) for (int k = 0; k < nb; ++k) acc[k] = *(const V*)(bias + (v0 + k) * VL);
            if (val == NULL && nb == VB) { SPMM_ROW(VB, ) }
            else if (val == NULL) { SPMM_ROW(nb, ) }
            else { SPMM_ROW(nb, val[q] *) }
            T* o = out + r * H + v0 * VL;
            for (int k = 0; k < nb; ++k) *(V*)(o + k * VL) = acc[k];
        }
    }
    for (long h = nv * VL; h < H; ++h)  /* the columns past the last whole vector */
        for (long r = 0; r < R; ++r) {
            T s = bias ? bias[h] : (T)0;
            for (long q = ptr[r]; q < ptr[r + 1]; ++q) s += (val ? val[q] : (T)1) * wt[(long)col[q] * H + h];
            out[r * H + h] = s;
        }
}
#undef SPMM_ROW

/* dwt[j, :] += sum of val[q] * d[r, :] over the rows r with a nonzero x[r, j] (dW^T of
   out = x W^T + b; val NULL: every value is 1). Rows in chunks of SP_CHUNK: within a chunk the
   nonzeros of each column are listed (a counting sort of the CSR), and each column's sum is
   accumulated in registers over them, in ascending r, then added to dwt once: no
   read-modify-write of dwt per nonzero, and the chunk of d stays in cache. cnt: K + 1 ints,
   rows: SP_CHUNK * K ints (the rows of the chunk's nonzeros, by column), vals: as many T (their
   values; unused when val is NULL). */
#ifndef SP_CHUNK
#define SP_CHUNK 256
#endif
CLONES void FN(lif_spmm_t)(const long* ptr, const int* col, const T* val, const T* d, long R, long K, long H,
                           T* dwt, int* cnt, int* rows, T* vals) {
    typedef FN(vec) V;
    const long nv = H / VL;
    for (long r0 = 0; r0 < R; r0 += SP_CHUNK) {
        const long r1 = r0 + SP_CHUNK < R ? r0 + SP_CHUNK : R;
        memset(cnt, 0, sizeof(int) * (K + 1));
        for (long q = ptr[r0]; q < ptr[r1]; ++q) cnt[col[q] + 1]++;
        for (long j = 0; j < K; ++j) cnt[j + 1] += cnt[j];
        /* the row (and value) of each nonzero of column j to rows[cnt[j]...] (cnt[j] moves on: it
           then ends column j) */
        for (long r = r0; r < r1; ++r)
            for (long q = ptr[r]; q < ptr[r + 1]; ++q) {
                const int e = cnt[col[q]]++;
                rows[e] = (int)r;
                if (val) vals[e] = val[q];
            }
        for (long v0 = 0; v0 < nv; v0 += VB) {
            const int nb = v0 + VB <= nv ? VB : (int)(nv - v0);
            const T* db = d + v0 * VL;
            for (long j = 0; j < K; ++j) {
                const int q0 = j ? cnt[j - 1] : 0, q1 = cnt[j];
                if (q0 == q1) continue;
                V acc[VB];
                for (int k = 0; k < VB; ++k) acc[k] = (V){0};
                if (val)
                    for (int e = q0; e < q1; ++e) {
                        const T* dr = db + (long)rows[e] * H; const T a = vals[e];
                        for (int k = 0; k < nb; ++k) acc[k] += a * *(const V*)(dr + k * VL);
                    }
                else
                    for (int e = q0; e < q1; ++e) {
                        const T* dr = db + (long)rows[e] * H;
                        for (int k = 0; k < nb; ++k) acc[k] += *(const V*)(dr + k * VL);
                    }
                T* w = dwt + j * H + v0 * VL;
                for (int k = 0; k < nb; ++k) *(V*)(w + k * VL) += acc[k];
            }
        }
        for (long h = nv * VL; h < H; ++h)
            for (long j = 0; j < K; ++j) {
                const int q0 = j ? cnt[j - 1] : 0, q1 = cnt[j];
                T s = (T)0;
                for (int e = q0; e < q1; ++e) s += (val ? vals[e] : (T)1) * d[(long)rows[e] * H + h];
                dwt[j * H + h] += s;
            }
    }
}
#undef VL
#undef VB

/* A feed-forward layer's forward over a segment from a mostly-zero input x [R = L*B, K], in one
   call: lif_csr (returns -1, having run nothing else, when x has more than max_nnz nonzeros),
   the currents i = x W^T + b by lif_spmm (wt = W^T [K, H]), then lif_fwd over them (u may be i:
   the currents are overwritten with u). Returns the number of nonzeros; *binary as lif_csr's. */
CLONES long FN(lif_layer_fwd)(const T* x, long R, long K, long max_nnz, long* ptr, int* col, T* val, int* binary,
                              const T* wt, const T* bias, long H, T* i, const T* v0, const T* beta, double beta_s,
                              double th_d, int reset_zero, int after, long L, long B, T* z, T* u, T* vT) {
    const long n = FN(lif_csr)(x, R, K, max_nnz, ptr, col, val, binary);
    if (n < 0) return n;
    FN(lif_spmm)(ptr, col, *binary ? NULL : val, wt, bias, R, H, i);
    FN(lif_fwd)(i, v0, beta, beta_s, th_d, reset_zero, after, L, B, H, z, u, vT);
    return n;
}

/* A feed-forward layer's backward over a segment whose input was kept as its nonzeros, in one
   call: lif_bwd (di [L*B, H] into the caller's buffer, dv0, dbeta), then db_acc[h] += the sum of
   di[:, h] over the segment's rows (in row order, into a T accumulator first; NULL: no db), then
   dwt += dW^T from the nonzeros (lif_spmm_t; NULL: no dW). dx = di W stays a matmul. */
CLONES void FN(lif_layer_bwd)(const T* u, const T* dz, long dz_st, const T* dvT, const T* v0, const T* beta,
                       double beta_s, double th_d, int reset_zero, int detach, int after, int kind, double scale,
                       long L, long B, long H, T* di, T* dv0, double* dbeta, T* db_acc,
                       const long* ptr, const int* col, const T* val, long K, T* dwt, int* cnt, int* rows, T* vals) {
    FN(lif_bwd)(u, dz, dz_st, dvT, v0, beta, beta_s, th_d, reset_zero, detach, after, kind, scale, L, B, H, di, dv0,
                dbeta);
    if (db_acc) {  /* per block of 64 columns: the rows summed in order into registers, then added */
        for (long h0 = 0; h0 < H; h0 += 64) {
            const long nh = H - h0 < 64 ? H - h0 : 64;
            T s[64];
            for (long j = 0; j < nh; ++j) s[j] = (T)0;
            for (long r = 0; r < L * B; ++r) {
                const T* d = di + r * H + h0;
                for (long j = 0; j < nh; ++j) s[j] += d[j];
            }
            for (long j = 0; j < nh; ++j) db_acc[h0 + j] += s[j];
        }
    }
    if (dwt) FN(lif_spmm_t)(ptr, col, val, di, L * B, K, H, dwt, cnt, rows, vals);
}

/* this body's parameters end here, so the next instantiation can define them anew */
#undef T
#undef SUF
#undef FABS
#undef EXP
