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

#include "sparse_input/sparse_input_body.h"  /* sp_csr, sp_mm, sp_mm_t for this T */

/* A feed-forward layer's forward over a segment from a mostly-zero input x [R = L*B, K], in one
   call: sp_csr (returns -1, having run nothing else, when x has more than max_nnz nonzeros),
   the currents i = x W^T + b by sp_mm (wt = W^T [K, H]), then lif_fwd over them (u may be i:
   the currents are overwritten with u). Returns the number of nonzeros; *binary as sp_csr's. */
CLONES long FN(lif_layer_fwd)(const T* x, long R, long K, long max_nnz, long* ptr, int* col, T* val, int* binary,
                              const T* wt, const T* bias, long H, T* i, const T* v0, const T* beta, double beta_s,
                              double th_d, int reset_zero, int after, long L, long B, T* z, T* u, T* vT) {
    const long n = FN(sp_csr)(x, R, K, max_nnz, ptr, col, val, binary);
    if (n < 0) return n;
    FN(sp_mm)(ptr, col, *binary ? NULL : val, wt, bias, R, H, i);
    FN(lif_fwd)(i, v0, beta, beta_s, th_d, reset_zero, after, L, B, H, z, u, vT);
    return n;
}

/* A feed-forward layer's backward over a segment whose input was kept as its nonzeros, in one
   call: lif_bwd (di [L*B, H] into the caller's buffer, dv0, dbeta), then db_acc[h] += the sum of
   di[:, h] over the segment's rows (in row order, into a T accumulator first; NULL: no db), then
   dwt += dW^T from the nonzeros (sp_mm_t; NULL: no dW). dx = di W stays a matmul. */
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
    if (dwt) FN(sp_mm_t)(ptr, col, val, di, L * B, K, H, dwt, cnt, rows, vals);
}

/* this body's parameters end here, so the next instantiation can define them anew */
#undef T
#undef SUF
#undef FABS
#undef EXP
