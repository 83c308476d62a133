/* EGRU's masked products for one scalar type: included by egru.c with T (the C type), SUF (the
   name suffix), VT (the AVX vector type), LANES (its lanes) and PS (the intrinsics' suffix, ps
   or pd) defined. MM(op) names the intrinsic _mm256_<op>_<PS>. */
#define MM(op) SB_CAT(_mm256_##op, PS)

#if X86
__attribute__((target("avx2,fma")))
static T FN(dot_simd)(const T* a, const T* b, long n) {
    VT s0 = MM(setzero)(), s1 = MM(setzero)(), s2 = MM(setzero)(), s3 = MM(setzero)();
    long i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        s0 = MM(fmadd)(MM(loadu)(a + i), MM(loadu)(b + i), s0);
        s1 = MM(fmadd)(MM(loadu)(a + i + LANES), MM(loadu)(b + i + LANES), s1);
        s2 = MM(fmadd)(MM(loadu)(a + i + 2 * LANES), MM(loadu)(b + i + 2 * LANES), s2);
        s3 = MM(fmadd)(MM(loadu)(a + i + 3 * LANES), MM(loadu)(b + i + 3 * LANES), s3);
    }
    for (; i + LANES <= n; i += LANES)
        s0 = MM(fmadd)(MM(loadu)(a + i), MM(loadu)(b + i), s0);
    s0 = MM(add)(MM(add)(s0, s1), MM(add)(s2, s3));
    T lanes[LANES];
    MM(storeu)(lanes, s0);
    T r = 0;
    for (int k = 0; k < LANES; ++k) r += lanes[k];
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
}
#endif

static T FN(dot_plain)(const T* a, const T* b, long n) {
    T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
    T r = 0;
    for (int k = 0; k < 8; ++k) r += s[k];
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
}

#if !X86
#define dot_simd_f32 dot_plain_f32
#define dot_simd_f64 dot_plain_f64
#endif

/* dy[b, j] = g[b] . wt[j] where mask[b, j] (dy is zero elsewhere, set by the caller);
   g [B, O], wt [H, O], mask and dy [B, H] */
void FN(masked_rows_dot)(const T* g, const T* wt, const unsigned char* mask, T* dy,
                         long B, long H, long O) {
    const int v = use_simd();
    const unsigned int csr = ftz_on();
    for (long j = 0; j < H; ++j) {
        const T* w = wt + j * O;
        for (long b = 0; b < B; ++b) {
            if (!mask[b * H + j]) continue;
            dy[b * H + j] = v ? FN(dot_simd)(g + b * O, w, O) : FN(dot_plain)(g + b * O, w, O);
        }
    }
    ftz_off(csr);
}

#if X86
__attribute__((target("avx2,fma")))
static void FN(axpy_rows_simd)(T* row, const T* g, const long* bs, const T* vs, long m, long O) {
    long i = 0;
    for (; i + LANES <= O; i += LANES) {
        VT acc = MM(loadu)(row + i);
        for (long k = 0; k < m; ++k)
            acc = MM(fmadd)(MM(set1)(vs[k]), MM(loadu)(g + bs[k] * O + i), acc);
        MM(storeu)(row + i, acc);
    }
    for (; i < O; ++i) {
        T acc = row[i];
        for (long k = 0; k < m; ++k) acc += vs[k] * g[bs[k] * O + i];
        row[i] = acc;
    }
}
#endif

static void FN(axpy_rows_plain)(T* row, const T* g, const long* bs, const T* vs, long m, long O) {
    for (long k = 0; k < m; ++k) {
        const T* gk = g + bs[k] * O;
        const T a = vs[k];
        for (long i = 0; i < O; ++i) row[i] += a * gk[i];
    }
}

#if !X86
#define axpy_rows_simd_f32 axpy_rows_plain_f32
#define axpy_rows_simd_f64 axpy_rows_plain_f64
#endif

/* buf[j] += sum_b y[b, j] * g[b] over mask[b, j]: y [B, H], g [B, O], buf [H, O];
   bs, vs: the caller's scratch of B entries each */
void FN(masked_rows_axpy)(const T* y, const T* g, const unsigned char* mask, T* buf,
                          long B, long H, long O, long* bs, T* vs) {
    const int v = use_simd();
    const unsigned int csr = ftz_on();
    for (long j = 0; j < H; ++j) {
        long m = 0;
        for (long b = 0; b < B; ++b)
            if (mask[b * H + j]) { bs[m] = b; vs[m] = y[b * H + j]; ++m; }
        if (!m) continue;
        if (v) FN(axpy_rows_simd)(buf + j * O, g, bs, vs, m, O);
        else FN(axpy_rows_plain)(buf + j * O, g, bs, vs, m, O);
    }
    ftz_off(csr);
}


/* ---- register-blocked products (egru_mm.h): an AVX-512 and an AVX2 copy, and plain C ---- */

#if X86
__attribute__((always_inline, target("avx2,fma")))
static inline T FN(hsum256)(VT v) {
    T l[LANES];
    MM(storeu)(l, v);
    T r = 0;
    for (int k = 0; k < LANES; ++k) r += l[k];
    return r;
}
#define VW 512
#define VEC VT512
#define VLN (64 / (long)sizeof(T))
#define VTGT "avx512f"
#define VHSUM(v) SB_CAT(_mm512_reduce_add, PS)(v)
#define VMASK(v) (unsigned int)SB_CAT(_mm512_cmp, SB_CAT(PS, mask))(v, SB_CAT(_mm512_setzero, PS)(), _CMP_NEQ_UQ)
#include "egru_mm.h"
#define VW 256
#define VEC VT
#define VLN (32 / (long)sizeof(T))
#define VTGT "avx2,fma"
#define VHSUM(v) FN(hsum256)(v)
#define VMASK(v) (unsigned int)MM(movemask)(MM(cmp)(v, MM(setzero)(), _CMP_NEQ_UQ))
#include "egru_mm.h"
#endif

static void FN(acc_rows_plain)(T* out, const T* init, const T* base, long stride, const long* idx,
                               const T* vals, long m, long n) {
    if (out != init) memcpy(out, init, sizeof(T) * n);
    for (long q = 0; q < m; ++q) FN(axpy)(out, vals[q], base + idx[q] * stride, n);
}

/* out[o] = init[o] + sum_{q < m} vals[q] base[idx[q] stride + o], o < n (see egru_mm.h) */
static void FN(acc_rows)(T* out, const T* init, const T* base, long stride, const long* idx,
                         const T* vals, long m, long n) {
#if X86
    const int l = isa_level();
    if (l >= 2) { SB_CAT(FN(acc_rows), 512)(out, init, base, stride, idx, vals, m, n); return; }
    if (l == 1) { SB_CAT(FN(acc_rows), 256)(out, init, base, stride, idx, vals, m, n); return; }
#endif
    FN(acc_rows_plain)(out, init, base, stride, idx, vals, m, n);
}

/* the non-zero entries of y [n]: indices into js, values into vs; returns their count */
static long FN(nonzeros)(const T* y, long n, long* js, T* vs) {
#if X86
    const int l = isa_level();
    if (l >= 2) return SB_CAT(FN(nonzeros), 512)(y, n, js, vs);
    if (l == 1) return SB_CAT(FN(nonzeros), 256)(y, n, js, vs);
#endif
    long k = 0;
    for (long j = 0; j < n; ++j)
        if (y[j] != (T)0) { js[k] = j; vs[k] = y[j]; ++k; }
    return k;
}

/* out[q] = w . a[q] over n entries, q < k (any k: groups of 4 samples per pass over w) */
static void FN(multi_dot)(const T* w, const T* const* a, long k, long n, T* out) {
#if X86
    const int l = isa_level();
    if (l >= 1) {
        for (long g = 0; g < k; g += 4) {
            const int kk = (int)(k - g < 4 ? k - g : 4);
            if (l >= 2) SB_CAT(FN(dots), 512)(w, a + g, kk, n, out + g);
            else SB_CAT(FN(dots), 256)(w, a + g, kk, n, out + g);
        }
        return;
    }
#endif
    for (long q = 0; q < k; ++q) out[q] = FN(dot_plain)(a[q], w, n);
}


/* out[u * 4 + q] = w[u] . a[q] over n entries, u < ju (2 or 4), q < k (1..4) */
static void FN(unit_tile)(const T* const* w, int ju, const T* const* a, int k, long n, T* out) {
#if X86
    const int l = isa_level();
    if (l >= 2) { SB_CAT(FN(tile), 512)(w, a, ju, k, n, out); return; }
    if (l == 1) { SB_CAT(FN(tile), 256)(w, a, ju, k, n, out); return; }
#endif
    for (int u = 0; u < ju; ++u)
        for (int q = 0; q < k; ++q) out[u * 4 + q] = FN(dot_plain)(a[q], w[u], n);
}

/* ---- the segment scan (egru_fwd, egru_bwd): equations in sparsebptt/kernels/egru/cpu.py ---- */


/* The pointwise forward of one sample (FusedPointwiseFunction's equations): gi, hh [3H] (x W_ih^T
   + b_ih, W_hh y + b_hh); c, y [H] updated; r, u, n, W_hn y + b_hn into sb [4H] and c~ into ctb
   [H] when HAS_S; the events added to cntb [H] when HAS_CNT (constants after inlining: the loop
   has no branch and vectorises); *fired, *wanted: its events and the entries whose dL/dy the
   backward takes (events and |c~ - threshold| < epsilon). */
INL void FN(fwd_point)(long H, const T* restrict gi, const T* restrict hh, const T* restrict thr, T ep,
                       T* restrict cb, T* restrict yb, T* restrict sb, T* restrict ctb, T* restrict cntb,
                       int* fired, int* wanted, const int HAS_S, const int HAS_CNT) {
    int f = 0, w = 0;
    for (long j = 0; j < H; ++j) {
        const T r = FN(sigm)(gi[j] + hh[j]);
        const T u = FN(sigm)(gi[H + j] + hh[H + j]);
        const T hn = hh[2 * H + j];
        const T nn = FN(tanh)(gi[2 * H + j] + r * hn);
        const T ct = nn + u * (cb[j] - nn);
        const T e = (ct - thr[j]) > (T)0 ? (T)1 : (T)0;
        yb[j] = ct * e;
        cb[j] = ct - e * thr[j];
        const T v = ct - thr[j];
        const T av = v < (T)0 ? -v : v;
        f += v > (T)0;
        w += (v > (T)0) | (av < ep);
        if (HAS_CNT) cntb[j] += e;
        if (HAS_S) { sb[j] = r; sb[H + j] = u; sb[2 * H + j] = nn; sb[3 * H + j] = hn; ctb[j] = ct; }
    }
    *fired = f;
    *wanted = w;
}

/* gh[b, chunk ci] = bh + sum of the rows of W_hh^T at sample b's events (bs, vs, mb: from
   nonzeros) over the chunk's FCH outputs, for every b (each output in registers, acc_rows) */
INL void FN(fwd_chunk)(long ci, long B, long H, T* gh, const T* whT, const T* bh, const long* bs,
                       const T* vs, const long* mb) {
    const long O = 3 * H, o0 = ci * FCH, n = O - o0 < FCH ? O - o0 : FCH;
    for (long b = 0; b < B; ++b)
        FN(acc_rows)(gh + b * O + o0, bh + o0, whT + o0, O, bs + b * H, vs + b * H, mb[b], n);
}

/* The pointwise forward of sample b at step t (fwd_point with its saves chosen): fired and
   wanted get the sample's events and wanted units added */
INL void FN(fwd_sample)(long t, long b, long B, long H, const T* gis, const T* gh, const T* thr, T ep,
                        T* c, T* y, T* s, T* cts, T* cnt, long* fired, long* wanted) {
    const long O = 3 * H;
    const T* gi = gis + (t * B + b) * O;
    const T* hh = gh + b * O;
    T* sb = s ? s + (t * B + b) * 4 * H : NULL;
    T* ctb = cts ? cts + (t * B + b) * H : NULL;
    T* cb_ = cnt ? cnt + b * H : NULL;
    int f = 0, w = 0;
    if (sb && cb_) FN(fwd_point)(H, gi, hh, thr, ep, c + b * H, y + b * H, sb, ctb, cb_, &f, &w, 1, 1);
    else if (sb) FN(fwd_point)(H, gi, hh, thr, ep, c + b * H, y + b * H, sb, ctb, cb_, &f, &w, 1, 0);
    else if (cb_) FN(fwd_point)(H, gi, hh, thr, ep, c + b * H, y + b * H, sb, ctb, cb_, &f, &w, 0, 1);
    else FN(fwd_point)(H, gi, hh, thr, ep, c + b * H, y + b * H, sb, ctb, cb_, &f, &w, 0, 0);
    *fired += f;
    *wanted += w;
}

/* Forward of L steps. gis [L, B, 3H] (x W_ih^T + b_ih), whT [H, 3H] (W_hh^T), bh [3H] (zeros for
   none), thr [H]; c, y [B, H] (and cnt, the event counts, when not NULL) updated in place;
   ys [L, B, H]; s [L, B, 4H] (r, u, n, W_hn y + b_hn) and cts [L, B, H] (c~) when not NULL;
   gh [B, 3H], bs [B (H + 1)], vs [B H]: scratch; counts [L, 3]: events of each step, non-zero y read, entries
   whose dL/dy the backward takes (events, |c~ - threshold| < epsilon). */
CLONES void FN(egru_fwd)(long L, long B, long H, const T* gis, const T* whT, const T* bh, const T* thr,
                         double epsilon, T* c, T* y, T* cnt, T* ys, T* s, T* cts, T* gh, long* bs, T* vs,
                         long* counts) {
    const T ep = (T)epsilon;
    const unsigned int csr = ftz_on();
    const long O = 3 * H;
    for (long t = 0; t < L; ++t) {
        long nz = 0, fired = 0, wanted = 0;
#if EGRU_FWD_BY_SAMPLE
        /* per sample the units with an event (bs) and their y (vs); then per chunk of FCH outputs
           (W_hh^T's columns of it stay in L2 for all samples) each sample's rows added in
           registers (acc_rows); then the pointwise part per sample. Samples and chunks shared out
           among egru_nt OpenMP threads (each output computed by one thread, in one order) */
        long* mb = bs + B * H;
        const long nch = (O + FCH - 1) / FCH;
        const int rev = (int)(t & 1 & EGRU_ALTERNATE);  /* chunks in alternating order (see masked_dots) */
        if (egru_nt > 1) {  /* (a region only here: its outlined loops run ~2 % slower on one thread) */
#pragma omp parallel reduction(+ : nz, fired, wanted) num_threads(egru_nt)
            {
            const unsigned int csr_t = ftz_on();
#pragma omp for schedule(static)
            for (long b = 0; b < B; ++b) nz += mb[b] = FN(nonzeros)(y + b * H, H, bs + b * H, vs + b * H);
#pragma omp for schedule(static)
            for (long ci = 0; ci < nch; ++ci) FN(fwd_chunk)(rev ? nch - 1 - ci : ci, B, H, gh, whT, bh, bs, vs, mb);
#pragma omp for schedule(static)
            for (long b = 0; b < B; ++b)
                FN(fwd_sample)(t, b, B, H, gis, gh, thr, ep, c, y, s, cts, cnt, &fired, &wanted);
            ftz_off(csr_t);
            }
        } else {
            for (long b = 0; b < B; ++b) nz += mb[b] = FN(nonzeros)(y + b * H, H, bs + b * H, vs + b * H);
            for (long ci = 0; ci < nch; ++ci) FN(fwd_chunk)(rev ? nch - 1 - ci : ci, B, H, gh, whT, bh, bs, vs, mb);
            for (long b = 0; b < B; ++b)
                FN(fwd_sample)(t, b, B, H, gis, gh, thr, ep, c, y, s, cts, cnt, &fired, &wanted);
        }
#else
        for (long b = 0; b < B; ++b) memcpy(gh + b * O, bh, sizeof(T) * O);
        for (long j = 0; j < H; ++j) {  /* gh[b] += y[b, j] W_hh^T[j] over the non-zero y */
            long k = 0;
            for (long b = 0; b < B; ++b)
                if (y[b * H + j] != (T)0) { bs[k] = b; vs[k] = y[b * H + j]; ++k; }
            const T* w = whT + j * O;
            for (long q = 0; q < k; ++q) FN(axpy)(gh + bs[q] * O, vs[q], w, O);
            nz += k;
        }
        for (long b = 0; b < B; ++b) FN(fwd_sample)(t, b, B, H, gis, gh, thr, ep, c, y, s, cts, cnt, &fired, &wanted);
#endif
        memcpy(ys + t * B * H, y, sizeof(T) * B * H);
        counts[3 * t] = fired;
        counts[3 * t + 1] = nz;
        counts[3 * t + 2] = wanted;
    }
    ftz_off(csr);
}

/* The pointwise backward of one sample (FusedPointwiseFunction's equations); tm = 0 at the
   segment's first step (c_{t-1} = c0 as given), else 1 (c_{t-1} = c~_{t-1} - e threshold,
   bitwise the forward's); HAS_GN (a constant after inlining): gnb, the counts' gradient, given;
   HAS_DGI (likewise): dgi [3H] written, else only its n part (the one part not in dg) into dgn [H]. */
INL void FN(bwd_point)(long H, const T* restrict sb, const T* restrict ctb, const T* restrict cpb,
                       const T* restrict thr, const T* restrict gyb, const T* restrict gy_,
                       const T* restrict gnb, T tm, T gm, T iep, T* restrict gcb, T* restrict dgi,
                       T* restrict dgn, T* restrict dg, T* restrict gthr, const int HAS_GN, const int HAS_DGI) {
    for (long j = 0; j < H; ++j) {
        const T ct = ctb[j], th = thr[j];
        const T v = ct - th;
        const T e = v > (T)0 ? (T)1 : (T)0;
        T cp = cpb[j];
        const T ep_ = ((cp - th) > (T)0 ? (T)1 : (T)0) * tm;
        cp = cp - ep_ * th;
        const T dy = gy_[j] + gyb[j];
        const T dcn = gcb[j];
        T det = dy * ct - dcn * th;
        if (HAS_GN) det = det + gnb[j];
        const T av = v < (T)0 ? -v : v;
        const T ps = (T)1 - av * iep;
        const T dv = det * (gm * (ps > (T)0 ? ps : (T)0));
        const T dct = (dv + dy * e) + dcn;
        gthr[j] -= dv + dcn * e;
        const T r = sb[j], u = sb[H + j], nn = sb[2 * H + j], hn = sb[3 * H + j];
        const T dcp = dct * u;
        const T dn = dct - dcp;
        const T du = dct * (cp - nn);
        const T dan = dn * ((T)1 - nn * nn);
        const T dau = du * u * ((T)1 - u);
        const T dar = dan * hn * r * ((T)1 - r);
        if (HAS_DGI) { dgi[j] = dar; dgi[H + j] = dau; dgi[2 * H + j] = dan; }
        else dgn[j] = dan;
        dg[j] = dar; dg[H + j] = dau; dg[2 * H + j] = dan * r;
        gcb[j] = dcp;
    }
}

/* The pointwise backward of step t (FusedPointwiseFunction's equations): from gy (dL/dy_t from
   the step after, [B, H]) plus gys[t], gc (dL/dc_t, replaced by dL/dc_{t-1}) and gcnt; writes
   dgi and dgh [B, 3H] (dL/d(x W_ih^T + b_ih), dL/d(W_hh y + b_hh) of step t; dgi NULL: only its n
   part, into dgn [B, H]); accumulates gbh [3H], gthr [H] and, unless NULL, gbn [H] (the n gate's
   dgi: the only part of dL/db_ih not in gbh). gys: step t's output gradient at gys + t * gst
   (gst = 0: the same [B, H] every step). xptr, xcol, xval (NULL: none): the segment's input as
   its nonzeros (rows t B + b; xval NULL: every value 1): then dwih [K, 3H] (dL/dW_ih^T) gets
   x[t, b, j] dgi[b] added at each nonzero (dgi's r and z parts are dg's). */
INL void FN(bwd_pointwise)(long B, long H, long t, const T* c0, const T* s, const T* cts,
                              const T* thr, T gm, T iep, const T* gys, long gst, T* gc, const T* gy,
                              const T* gcnt, T* dgi, T* dgh, T* gbh, T* gthr, T* gbn, T* dgn,
                              const long* xptr, const int* xcol, const T* xval, T* dwih) {
    const long O = 3 * H;
    const T tm = t ? (T)1 : (T)0;
    for (long b = 0; b < B; ++b) {
        const T* sb = s + (t * B + b) * 4 * H;
        const T* ctb = cts + (t * B + b) * H;
        const T* cpb = t ? cts + ((t - 1) * B + b) * H : c0 + b * H;
        const T* gyb = gys + t * gst + b * H;
        T* dg = dgh + b * O;
        T* dgib = dgi ? dgi + b * O : NULL;
        T* dgnb = dgn + b * H;
        if (gcnt && dgi)
            FN(bwd_point)(H, sb, ctb, cpb, thr, gyb, gy + b * H, gcnt + b * H, tm, gm, iep, gc + b * H,
                          dgib, dgnb, dg, gthr, 1, 1);
        else if (dgi)
            FN(bwd_point)(H, sb, ctb, cpb, thr, gyb, gy + b * H, NULL, tm, gm, iep, gc + b * H,
                          dgib, dgnb, dg, gthr, 0, 1);
        else if (gcnt)
            FN(bwd_point)(H, sb, ctb, cpb, thr, gyb, gy + b * H, gcnt + b * H, tm, gm, iep, gc + b * H,
                          dgib, dgnb, dg, gthr, 1, 0);
        else
            FN(bwd_point)(H, sb, ctb, cpb, thr, gyb, gy + b * H, NULL, tm, gm, iep, gc + b * H,
                          dgib, dgnb, dg, gthr, 0, 0);
        for (long o = 0; o < O; ++o) gbh[o] += dg[o];
        const T* dn = dgi ? dgib + 2 * H : dgnb;  /* dgi's n part */
        if (gbn)
            for (long j = 0; j < H; ++j) gbn[j] += dn[j];
        if (xptr) {
            const long r = t * B + b;
            for (long q = xptr[r]; q < xptr[r + 1]; ++q) {
                T* w = dwih + (long)xcol[q] * O;
                const T a = xval ? xval[q] : (T)1;
                FN(axpy)(w, a, dg, 2 * H);
                FN(axpy)(w + 2 * H, a, dn, H);
            }
        }
    }
}

/* the width in entries of dw_block's column chunks at instruction set level l: 6 vectors for
   AVX-512 (384 bytes: dw_quad's 4 x 6 accumulators fit the 32 registers), 8 for AVX2 (256 bytes,
   as plain C) */
static long FN(dw_width)(int l) {
    return (l >= 2 ? 384L : 256L) / (long)sizeof(T);
}

#ifndef DW_NS
#define DW_NS 96  /* rows of a sub-block at most (<= 128) */
#endif
#ifndef DW_PACK_MIN
#define DW_PACK_MIN 4  /* events per row (of a sub-block) from which its rows are packed */
#endif
#ifndef DW_QUAD
#define DW_QUAD 40  /* percent: 4 units run as a quad while their union's rows < this share of their events */
#endif

/* dw_block's column chunk c for every sub-block (what one thread does: see dw_block) */
struct FN(dw_args) {
    long B, H, N, NS, nsub, t0, R, cw, nch;
    int l;
    const T* dghs;
    T* gwhT;
    const long *at, *qat, *direct, *quads;
    const unsigned char *rows, *qrows;
    const T *vals, *qvals;
};
static void FN(dw_chunk)(long c, const struct FN(dw_args)* a) {
    const long B = a->B, H = a->H, O = 3 * H, N = a->N, NS = a->NS, nsub = a->nsub, t0 = a->t0, R = a->R;
    const long cw = a->cw, nch = a->nch;
    const int l = a->l;
    const T* dghs = a->dghs;
    T* gwhT = a->gwhT;
    const long *at = a->at, *qat = a->qat, *direct = a->direct, *quads = a->quads;
    const unsigned char *rows = a->rows, *qrows = a->qrows;
    const T *vals = a->vals, *qvals = a->qvals;
    (void)l;
    (void)nch;
    T pkt[DW_NS * (384 / sizeof(T))] __attribute__((aligned(64)));  /* this chunk's packed rows */
    long lrt[DW_NS];
    T lvt[DW_NS];
    const long o0 = c * cw, w = O - o0 < cw ? O - o0 : cw;
    for (long s = 0; s < nsub; ++s) {
        if (direct[s]) continue;
        const long* as = at + s * H;
        const long rs = N - s * NS < NS ? N - s * NS : NS;
        for (long q = 0; q < rs; ++q) {  /* pack the sub-block's rows of this chunk */
            const long r = s * NS + q, t = t0 + r / B;
            memcpy(pkt + q * cw, dghs + ((t % R) * B + r % B) * O + o0, sizeof(T) * w);
        }
#if X86
        const long pf = c + 1 < nch ? cw : 0;  /* the next chunk's column into L2 */
        if (w == cw && l >= 2) {
            SB_CAT(FN(dw_quad), 512)(gwhT + o0, O, pkt, quads + 6 * qat[s], qat[s + 1] - qat[s], qrows, qvals, pf);
            SB_CAT(FN(dw_tile), 512)(gwhT + o0, O, pkt, rows, as, vals, H, pf);
            continue;
        }
        if (w == cw && l == 1) { SB_CAT(FN(dw_tile), 256)(gwhT + o0, O, pkt, rows, as, vals, H, pf); continue; }
#endif
        for (long j = 0; j < H; ++j) {
            const long e0 = as[j], k = as[j + 1] - e0;
            for (long e = 0; e < k; ++e) lrt[e] = rows[e0 + e];
            T* g = gwhT + j * O + o0;
            if (k) FN(acc_rows)(g, g, pkt, cw, lrt, vals + e0, k, w);
        }
        for (long i = qat[s]; i < qat[s + 1]; ++i) {  /* the quads' units one by one */
            const long* qd = quads + 6 * i;
            const long k = qd[5] - qd[4];
            for (long e = 0; e < k; ++e) lrt[e] = qrows[qd[4] + e];
            for (int v = 0; v < 4; ++v) {
                for (long e = 0; e < k; ++e) lvt[e] = qvals[4 * (qd[4] + e) + v];
                T* g = gwhT + qd[v] * O + o0;
                FN(acc_rows)(g, g, pkt, cw, lrt, lvt, k, w);
            }
        }
    }
}

/* dW_hh^T[j] += sum_{t0 <= t < t1} sum_b y_{t-1}[b, j] dgh_t[b] over the non-zero y_{t-1}: the
   weight gradient of a block of steps, N = (t1 - t0) B rows (r = (t - t0) B + b) of dgh (dghs: a
   ring of R steps). Rows in sub-blocks of NS <= DW_NS (equal sizes but the last), columns in
   chunks of cw entries (dw_width). Per sub-block first each unit's events (bit masks lo, hi of
   its rows, then their count cj) are listed: rows (bytes) and y (vals), unit j's from at[s H + j];
   with AVX-512, units taken in order of events (most first) 4 at a time form quads while the
   union of their rows is below DW_QUAD % of their events (quads [.., 6]: the units and their
   range of qrows, the union's rows, and qvals [.., 4], each unit's y there, zero where it has no
   event; a quad's units have no list of their own). Then per chunk (its column of dW_hh^T, H cw
   entries, stays in L2; the next chunk's prefetched into L2 meanwhile; the chunks shared out
   among egru_nt OpenMP threads, each owning its columns), per sub-block, the sub-block's rows of
   the chunk are packed (a thread's pkt on its stack, NS cw entries: <= 36 KiB, in L1 while used) and
   each unit's chunk is held in registers while its events' packed rows are added (dw_tile),
   each quad's 4 chunks while the union's rows are (dw_quad: a loaded row serves 4 units); the
   last chunk when narrower and plain C through acc_rows. (A quad multiplies the zero y of a unit
   without an event by that row: the same sum unless the row has an infinite or NaN entry.)
   A sub-block with fewer than DW_PACK_MIN events per row is not packed: each unit's events add
   whole dgh rows from the ring (acc_rows). Scratch: cnt [2 H] longs (cj, the units' order); idx
   [2 H + nsub (H + 2) + 2 + 6 nsub (H / 4) + 128 + 5 N H / 32] longs, nsub <= ceil(N / 64) (lo,
   hi, at, quads' starts per sub-block, direct, quads, acc_rows' rows, then rows and qrows as
   bytes); val [2 N H] (vals, qvals). Returns the events (axpys of 3H). */
static long FN(dw_block)(long B, long H, long t0, long t1, const T* y0, const T* ys, const T* dghs,
                         long R, T* gwhT, long* cnt, long* idx, T* val) {
    const long O = 3 * H, N = (t1 - t0) * B;
    const int l = isa_level();
    const long cw = FN(dw_width)(l), nch = (O + cw - 1) / cw, nsub = (N + DW_NS - 1) / DW_NS;
    const long NS = (N + nsub - 1) / nsub;  /* rows of a sub-block (the last may have fewer) */
    uint64_t* restrict lo = (uint64_t*)idx;
    uint64_t* restrict hi = lo + H;
    long* restrict at = idx + 2 * H;                /* [nsub H + 1] */
    long* restrict qat = at + nsub * H + 1;         /* [nsub + 1]: each sub-block's quads */
    long* restrict direct = qat + nsub + 1;         /* [nsub]: too few events to pack its rows */
    long* restrict quads = direct + nsub;           /* [nsub H / 4, 6] */
    long* lrows = quads + 6 * (nsub * (H / 4));     /* [NS] */
    unsigned char* restrict rows = (unsigned char*)(lrows + NS);  /* [N H] */
    unsigned char* restrict qrows = rows + N * H;   /* [N H / 4] */
    T* restrict vals = val;                         /* [N H] */
    T* restrict qvals = val + N * H;                /* [N H] */
    long* restrict cj = cnt;                        /* [H]: a unit's events in the sub-block (-1: in a quad) */
    long* restrict order = cnt + H;                 /* [H]: units by events, most first */
    const T* yr[128];  /* a sub-block's y rows */
    long n = 0, nq = 0, kq = 0, events = 0;
    for (long s = 0; s < nsub; ++s) {
        const long rs = N - s * NS < NS ? N - s * NS : NS;
        memset(lo, 0, sizeof(uint64_t) * 2 * H);
        for (long q = 0; q < rs; ++q) {
            const long r = s * NS + q, t = t0 + r / B;
            const T* yp = (t ? ys + (t - 1) * B * H : y0) + (r % B) * H;
            const uint64_t bit = (uint64_t)1 << (q & 63);
            uint64_t* ms = q < 64 ? lo : hi;
            yr[q] = yp;
#if X86
            if (l >= 2) { SB_CAT(FN(dw_bits), 512)(yp, H, ms, bit); continue; }
            if (l == 1) { SB_CAT(FN(dw_bits), 256)(yp, H, ms, bit); continue; }
#endif
            for (long j = 0; j < H; ++j) ms[j] |= yp[j] != (T)0 ? bit : 0;
        }
        long start[130], es = 0;
        memset(start, 0, sizeof start);
        for (long j = 0; j < H; ++j) {
            cj[j] = __builtin_popcountll(lo[j]) + __builtin_popcountll(hi[j]);
            es += cj[j];
            ++start[NS - cj[j] + 1];
        }
        events += es;
        direct[s] = es < DW_PACK_MIN * rs;
        qat[s] = nq;
        if (l >= 2 && DW_QUAD > 0 && !direct[s]) {  /* quads of units in order of events, while they pay */
            for (long m = 0; m < NS + 1; ++m) start[m + 1] += start[m];
            for (long j = 0; j < H; ++j) order[start[NS - cj[j]]++] = j;
            for (long g = 0; g + 4 <= H; g += 4) {
                const long* u = order + g;
                const long ev = cj[u[0]] + cj[u[1]] + cj[u[2]] + cj[u[3]];
                const uint64_t ul = lo[u[0]] | lo[u[1]] | lo[u[2]] | lo[u[3]];
                const uint64_t uh = hi[u[0]] | hi[u[1]] | hi[u[2]] | hi[u[3]];
                const long un = __builtin_popcountll(ul) + __builtin_popcountll(uh);
                if (!cj[u[3]] || 100 * un >= DW_QUAD * ev) break;
                long* qd = quads + 6 * nq++;
                qd[4] = kq;
                for (int w = 0; w < 2; ++w) {
                    uint64_t m = w ? uh : ul;
                    while (m) {
                        const long q = 64 * w + __builtin_ctzll(m);
                        m &= m - 1;
                        qrows[kq] = (unsigned char)q;
                        for (int v = 0; v < 4; ++v) qvals[4 * kq + v] = yr[q][u[v]];
                        ++kq;
                    }
                }
                qd[5] = kq;
                for (int v = 0; v < 4; ++v) { qd[v] = u[v]; cj[u[v]] = -1; }
            }
        }
        for (long j = 0; j < H; ++j) {  /* the other units' events: rows and y, unit by unit */
            at[s * H + j] = n;
            if (cj[j] < 0) continue;
            for (int w = 0; w < 2; ++w) {
                uint64_t m = w ? hi[j] : lo[j];
                while (m) {
                    const long q = 64 * w + __builtin_ctzll(m);
                    m &= m - 1;
                    rows[n] = (unsigned char)q;
                    vals[n++] = yr[q][j];
                }
            }
        }
    }
    at[nsub * H] = n;
    qat[nsub] = nq;
    for (long s = 0; s < nsub; ++s) {  /* sub-blocks with few events: each unit's whole rows, unpacked */
        if (!direct[s]) continue;
        const long* as = at + s * H;
        for (long j = 0; j < H; ++j) {
            const long e0 = as[j], k = as[j + 1] - e0;
            for (long e = 0; e < k; ++e) {
                const long r = s * NS + rows[e0 + e], t = t0 + r / B;
                lrows[e] = (t % R) * B + r % B;
            }
            if (k) FN(acc_rows)(gwhT + j * O, gwhT + j * O, dghs, O, lrows, vals + e0, k, O);
        }
    }
    /* the chunks of columns shared out among egru_nt OpenMP threads (each owns its columns of
       gwhT; packed rows and lists on its stack) */
    const struct FN(dw_args) a = {B, H, N, NS, nsub, t0, R, cw, nch, l, dghs, gwhT, at, qat, direct, quads, rows,
                                  qrows, vals, qvals};
    if (egru_nt > 1) {
#pragma omp parallel num_threads(egru_nt)
        {
        const unsigned int csr = ftz_on();
#pragma omp for schedule(static)
        for (long c = 0; c < nch; ++c) FN(dw_chunk)(c, &a);
        ftz_off(csr);
        }
    } else
        for (long c = 0; c < nch; ++c) FN(dw_chunk)(c, &a);
    return events;
}

/* m[j] (j < H): bit q set when sample b0 + q (q < nb <= 64) wants dL/dy at unit j: an event or
   within ep of the threshold (ctp: c~ [B, H] of the step; NULL: every unit wanted) */
static void FN(want_masks)(long b0, long nb, long H, const T* ctp, const T* thr, T ep, uint64_t* restrict m) {
    memset(m, 0, sizeof(uint64_t) * H);
    for (long q = 0; q < nb; ++q) {
        const T* restrict cb = ctp ? ctp + (b0 + q) * H : NULL;
        if (cb)
            for (long j = 0; j < H; ++j) {
                const T v = cb[j] - thr[j];
                m[j] |= (uint64_t)((v > (T)0) | ((v < (T)0 ? -v : v) < ep)) << q;
            }
        else
            for (long j = 0; j < H; ++j) m[j] |= (uint64_t)1 << q;
    }
}

/* masked_dots' work items. dots_unit: unit j's dots for the samples b0 + q of its mask
   m64[j] (blocks of up to 64 samples); returns their number. */
INL long FN(dots_unit)(long j, long b0, long H, const uint64_t* m64, const T* dgh, const T* whT, T* gy) {
    const long O = 3 * H;
    uint64_t m = m64[j];
    long bl[64], k = 0;
    while (m) { bl[k++] = b0 + __builtin_ctzll(m); m &= m - 1; }
    if (!k) return 0;
    const T* ap[64];
    T out[64];
    for (long q = 0; q < k; ++q) ap[q] = dgh + bl[q] * O;
    FN(multi_dot)(whT + j * O, ap, k, O, out);
    for (long q = 0; q < k; ++q) gy[bl[q] * H + j] = out[q];
    return k;
}

/* dots_piece: piece p of a set of units (in order, from piece[p] to the next piece or the set's
   end) that exactly the samples of its mask want, in tiles of 4, 2 then 1 units x up to 4
   samples; returns the dots done. */
INL long FN(dots_piece)(long p, const long* piece, const long* start, const uint64_t* mask, const long* order,
                        long nb, long b0, long H, const T* dgh, const T* whT, T* gy) {
    const long O = 3 * H;
    const long u0 = piece[p], m = (long)mask[order[u0]];
    const long u1 = piece[p + 1] < start[m + 1] ? piece[p + 1] : start[m + 1];
    long bl[8], k = 0;
    for (long q = 0; q < nb; ++q)
        if (m >> q & 1) bl[k++] = b0 + q;
    for (long g = 0; g < k; g += 4) {  /* samples in groups of up to 4 */
        const int kk = (int)(k - g < 4 ? k - g : 4);
        const T* ap[4];
        T out[4];
        for (int q = 0; q < kk; ++q) ap[q] = dgh + bl[g + q] * O;
        long u = u0;
        while (u < u1) {  /* units in tiles of 4, 2, then 1 */
            const int ju = u1 - u >= 4 ? 4 : (u1 - u >= 2 ? 2 : 1);
            const T* w[4];
            for (int r = 0; r < ju; ++r) w[r] = whT + order[u + r] * O;
            if (ju == 1) {
                FN(multi_dot)(w[0], ap, kk, O, out);
                for (int q = 0; q < kk; ++q) gy[bl[g + q] * H + order[u]] = out[q];
            } else {
                T o16[16];
                FN(unit_tile)(w, ju, ap, kk, O, o16);
                for (int r = 0; r < ju; ++r)
                    for (int q = 0; q < kk; ++q) gy[bl[g + q] * H + order[u + r]] = o16[r * 4 + q];
            }
            u += ju;
        }
    }
    return k * (u1 - u0);
}

/* dL/dy_{t-1}[b, j] = dgh_t[b] . W_hh^T[j] where wanted: at the step before's events and units
   within epsilon of the threshold (ctp: its c~; every entry when ctp is NULL); zero elsewhere
   (into gy [B, H]). group = 0: per unit, a dot for each sample that wants it (multi_dot, groups
   of 4 samples per pass over the row). group = 1: per block of 8 samples the units are sorted by
   the set of samples that want them (a counting sort on that 8-bit mask); each set's units run in tiles of 4 (or 2) units x
   up to 4 samples (unit_tile: a loaded chunk of a dgh row serves 4 units, one of a W_hh^T row
   4 samples), a last unit alone (multi_dot). Rows wanted by no sample are not read. (Chunking the
   columns so dgh stays in L1, or reversing the order every other step so W_hh^T's last rows are
   still in L2, measured no faster at H = 512, B = 8.) The units (group = 0) or the sets of units
   (group = 1) are shared out among egru_nt OpenMP threads (each writes its own entries of gy:
   the result does not depend on the threads). wl [3 H + 256]: scratch. Returns the dots done (of 3H). */
#ifndef DOTS_PIECE
#define DOTS_PIECE 16  /* units per piece of work of the grouped dots */
#endif
static long FN(masked_dots)(long B, long H, const T* dgh, const T* whT, const T* ctp, const T* thr,
                            T ep, int group, T* gy, long* wl) {
    long nd = 0;
    memset(gy, 0, sizeof(T) * B * H);
    if (!group) {  /* per unit, every sample that wants it (blocks of 64 samples) */
        uint64_t* restrict m64 = (uint64_t*)wl;  /* [H] */
        for (long b0 = 0; b0 < B; b0 += 64) {
            const long nb = B - b0 < 64 ? B - b0 : 64;
            FN(want_masks)(b0, nb, H, ctp, thr, ep, m64);
            if (egru_nt > 1) {  /* (a region only here: its outlined loop runs slower on one thread) */
#pragma omp parallel reduction(+ : nd) num_threads(egru_nt)
                {
                const unsigned int csr = ftz_on();  /* each thread as the caller's (egru_bwd) */
#pragma omp for schedule(dynamic, 8)
                for (long j = 0; j < H; ++j) nd += FN(dots_unit)(j, b0, H, m64, dgh, whT, gy);
                ftz_off(csr);
                }
            } else
                for (long j = 0; j < H; ++j) nd += FN(dots_unit)(j, b0, H, m64, dgh, whT, gy);
        }
        return nd;
    }
    uint64_t* restrict mask = (uint64_t*)wl;  /* [H]: a unit's wanted samples in the block of 8, as bits */
    long* order = wl + H;                      /* [H]: the units sorted by that mask */
    long* piece = wl + 2 * H;                  /* [H + 256]: where each piece of a set starts */
    for (long b0 = 0; b0 < B; b0 += 8) {
        const long nb = B - b0 < 8 ? B - b0 : 8;
        FN(want_masks)(b0, nb, H, ctp, thr, ep, mask);
        long start[257];
        memset(start, 0, sizeof start);
        for (long j = 0; j < H; ++j) ++start[mask[j] + 1];
        for (long m = 0; m < 256; ++m) start[m + 1] += start[m];
        long pos[256];
        memcpy(pos, start, sizeof pos);
        for (long j = 0; j < H; ++j) order[pos[mask[j]]++] = j;
        /* the work: with threads, each set's units in pieces of up to DOTS_PIECE (a set can hold
           most of the units: one piece per set would leave the other threads idle) */
        const long per = egru_nt > 1 ? DOTS_PIECE : H;  /* one thread: one piece per set */
        long np = 0;
        for (long m = 1; m < 256; ++m)
            for (long u = start[m]; u < start[m + 1]; u += per) piece[np++] = u;
        piece[np] = start[256];
        if (egru_nt > 1) {
#pragma omp parallel reduction(+ : nd) num_threads(egru_nt)
            {
            const unsigned int csr = ftz_on();
#pragma omp for schedule(dynamic, 1)
            for (long p = 0; p < np; ++p) nd += FN(dots_piece)(p, piece, start, mask, order, nb, b0, H, dgh, whT, gy);
            ftz_off(csr);
            }
        } else
            for (long p = 0; p < np; ++p) nd += FN(dots_piece)(p, piece, start, mask, order, nb, b0, H, dgh, whT, gy);
    }
    return nd;
}

/* dst [cols, rows] = src [rows, cols] transposed, in 32 x 32 tiles (each tile's rows and columns
   stay in L1): the weight gradients summed in W^T's layout (dW_hh^T [H, 3H], dW_ih^T [I, 3H]) into
   W's, as autograd wants them (its copy of a transpose took about twice as long) */
CLONES void FN(egru_transpose)(const T* src, long rows, long cols, T* dst) {
    for (long r0 = 0; r0 < rows; r0 += 32)
        for (long c0 = 0; c0 < cols; c0 += 32) {
            const long r1 = r0 + 32 < rows ? r0 + 32 : rows, c1 = c0 + 32 < cols ? c0 + 32 : cols;
            for (long c = c0; c < c1; ++c)
                for (long r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
        }
}

/* Backward of the steps t_hi, t_hi - 1, .. t_lo of a segment (the caller's chunk of its input
   projection): one call for all of them, or until a step whose dL/dy_{t-1} the caller takes as
   a GEMM (dense[t] != 0): then it returns t with dgh_t written, and the caller sets gy = dgh_t
   W_hh and calls again with t_hi = t - 1. Returns t_lo - 1 when step t_lo is done. c0, y0
   [B, H]: the segment's initial state; ys, s, cts: the forward's; gys: the outputs' gradient,
   step t's [B, H] at gys + t * gst (gst = 0: one block for every step, e.g. an expanded sum's
   or zeros); gc, gy [B, H]: in the gradients of c_t and y_t, out those of c_{t-1} and y_{t-1}; gcnt
   [B, H] or NULL: the gradient of the final counts (constant along the segment). Per step: the
   pointwise backward (bwd_pointwise), then dL/dy_{t-1} where the step before needs it
   (masked_dots, grouped when group; every entry of y0 at t = 0 when need_y0; nothing at t = 0
   otherwise); when axpy,
   dW_hh^T over the events (dw_block) each time t reaches a multiple of blk (blocks [t, t + blk)).
   Out: dgis [.., B, 3H] (step t at t - t_lo), dghs: dL/d(W_hh y + b_hh) of the steps, a ring of
   R steps (dgh_t at t mod R; R >= blk when axpy, R = L when the caller takes dW_hh as one GEMM
   over the segment); accumulated: gbh [3H], gthr [H], gwhT [H, 3H] (when axpy), gbn [H] (the
   n gate's part of dL/db_ih, unless NULL: the r and z parts equal gbh's), dwih [K, 3H] (dL/dW_ih^T
   from the input's nonzeros xptr/xcol/xval, unless xptr is NULL). dgis NULL: not written (only
   its n parts, into dgn [B, H], scratch either way). Scratch:
   wl [3 H + 256] (masked_dots'); cnt [2 H], idx, val: dw_block's (sizes
   in its comment, for N = blk B; no buffer is read through another type than it was written
   with). macs [2]: the dots and the
   axpys done are added (times 3H). */
CLONES long FN(egru_bwd)(long L, long B, long H, long t_hi, long t_lo, const T* c0, const T* y0, const T* ys,
                         const T* s, const T* cts, const T* whT, const T* thr, double gamma,
                         double epsilon, const T* gys, T* gc, T* gy, const T* gcnt, long need_y0,
                         const unsigned char* dense, long group, long axpy, long blk, long R, T* dgis, T* dghs,
                         T* gwhT, T* gbh, T* gthr, long* wl, long* cnt, long* idx,
                         T* val, long* macs, long gst, T* gbn, T* dgn, const long* xptr, const int* xcol,
                         const T* xval, T* dwih) {
    const unsigned int csr = ftz_on();
    const long O = 3 * H;
    const T gm = (T)gamma, ep = (T)epsilon, iep = (T)1 / (T)epsilon;
    long stop = t_lo - 1;
    for (long t = t_hi; t >= t_lo; --t) {
        T* dgh = dghs + (t % R) * B * O;
        EGRU_TICK(0);
        FN(bwd_pointwise)(B, H, t, c0, s, cts, thr, gm, iep, gys, gst, gc, gy, gcnt,
                          dgis ? dgis + (t - t_lo) * B * O : NULL, dgh, gbh, gthr, gbn, dgn, xptr, xcol, xval, dwih);
        EGRU_TICK(1);
        const int want_dy = t || need_y0;
        if (want_dy && !dense[t])
            macs[0] += FN(masked_dots)(B, H, dgh, whT, t ? cts + (t - 1) * B * H : NULL, thr, ep,
                                       group, gy, wl);
        EGRU_TICK(2);
        if (axpy && t % blk == 0)
            macs[1] += FN(dw_block)(B, H, t, t + blk < L ? t + blk : L, y0, ys, dghs, R, gwhT, cnt, idx, val);
        EGRU_TICK(3);
        if (want_dy && dense[t]) { stop = t; break; }
    }
    ftz_off(csr);
    return stop;
}

#undef MM

/* this body's parameters end here, so the next instantiation can define them anew */
#undef T
#undef SUF
#undef VT
#undef LANES
#undef PS
#undef TBITS
#undef VT512
