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


/* ---- the segment scan (egru_fwd, egru_bwd): equations in sparsebptt/kernels/egru/cpu.py ---- */


/* Forward of L steps. gis [L, B, 3H] (x W_ih^T + b_ih), whT [H, 3H] (W_hh^T), bh [3H] (zeros for
   none), thr [H]; c, y [B, H] (and cnt, the event counts, when not NULL) updated in place;
   ys [L, B, H]; s [L, B, 4H] (r, u, n, W_hn y + b_hn) and cts [L, B, H] (c~) when not NULL;
   gh [B, 3H], bs, vs [B]: scratch; counts [L, 3]: events of each step, non-zero y read, entries
   whose dL/dy the backward takes (events, |c~ - threshold| < epsilon). */
CLONES void FN(egru_fwd)(long L, long B, long H, const T* gis, const T* whT, const T* bh, const T* thr,
                         double epsilon, T* c, T* y, T* cnt, T* ys, T* s, T* cts, T* gh, long* bs, T* vs,
                         long* counts) {
    const T ep = (T)epsilon;
    const unsigned int csr = ftz_on();
    const long O = 3 * H;
    for (long t = 0; t < L; ++t) {
        long nz = 0;
#if EGRU_FWD_BY_SAMPLE
        /* per sample, output chunks of 64 held in registers while its events' rows are added */
        for (long b = 0; b < B; ++b) {
            long k = 0;
            for (long j = 0; j < H; ++j)
                if (y[b * H + j] != (T)0) { bs[k] = j; vs[k] = y[b * H + j]; ++k; }
            nz += k;
            T* g = gh + b * O;
            long o0 = 0;
            for (; o0 + 64 <= O; o0 += 64) {
                T acc[64];
                for (int l = 0; l < 64; ++l) acc[l] = bh[o0 + l];
                for (long q = 0; q < k; ++q) {
                    const T* restrict w = whT + bs[q] * O + o0;
                    const T v = vs[q];
                    for (int l = 0; l < 64; ++l) acc[l] += v * w[l];
                }
                for (int l = 0; l < 64; ++l) g[o0 + l] = acc[l];
            }
            for (; o0 < O; ++o0) {
                T a = bh[o0];
                for (long q = 0; q < k; ++q) a += vs[q] * whT[bs[q] * O + o0];
                g[o0] = a;
            }
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
#endif
        long fired = 0, wanted = 0;
        for (long b = 0; b < B; ++b) {
            const T* restrict gi = gis + (t * B + b) * O;
            const T* restrict hh = gh + b * O;
            T* restrict cb = c + b * H;
            T* restrict yb = y + b * H;
            T* restrict sb = s ? s + (t * B + b) * 4 * H : NULL;
            T* restrict ctb = cts ? cts + (t * B + b) * H : NULL;
            long f = 0, w = 0;
            for (long j = 0; j < H; ++j) {
                const T r = FN(sigm)(gi[j] + hh[j]);
                const T u = FN(sigm)(gi[H + j] + hh[H + j]);
                const T hn = hh[2 * H + j];
                const T nn = FN(tanh)(gi[2 * H + j] + r * hn);
                const T ct = nn + u * (cb[j] - nn);
                const T e = (ct - thr[j]) > (T)0 ? (T)1 : (T)0;
                yb[j] = ct * e;
                cb[j] = ct - e * thr[j];
                f += e > (T)0;
                const T v = ct - thr[j];
                w += e > (T)0 || (v < (T)0 ? -v : v) < ep;
                if (cnt) cnt[b * H + j] += e;
                if (sb) { sb[j] = r; sb[H + j] = u; sb[2 * H + j] = nn; sb[3 * H + j] = hn; ctb[j] = ct; }
            }
            fired += f;
            wanted += w;
        }
        memcpy(ys + t * B * H, y, sizeof(T) * B * H);
        counts[3 * t] = fired;
        counts[3 * t + 1] = nz;
        counts[3 * t + 2] = wanted;
    }
    ftz_off(csr);
}

/* Backward of step t (the caller runs t = L-1 .. 0). c0, y0 [B, H]: the segment's initial state;
   ys, s, cts: the forward's; gys [L, B, H] (zeros for none); gc, gy [B, H]: in the gradients of
   c_t and y_t, out those of c_{t-1} and (when dots) y_{t-1}; gcnt [B, H] or NULL: the gradient of
   the final counts (constant along the segment). Out: dgis[t], dghs[t] [B, 3H]; accumulated: gbh
   [3H], gthr [H], and gwhT [H, 3H] when axpy. dots: take dL/dy_{t-1} = dgh . W_hh^T[j] only
   where the step before needs it (its events and |c~ - threshold| < epsilon; every entry of y0
   when t = 0 and need_y0); else the caller does it (a GEMM when most entries are needed).
   axpy: dW_hh^T[j] += y_{t-1}[b, j] dgh[b] over the non-zero y_{t-1}. Scratch gyn [B, H], bs,
   vs [B]. macs [2]: the dots and the axpys done are added (times 3H). */
CLONES void FN(egru_bwd_step)(long L, long B, long H, long t, const T* c0, const T* y0, const T* ys,
                              const T* s, const T* cts, const T* whT, const T* thr, double gamma,
                              double epsilon, const T* gys, T* gc, T* gy, const T* gcnt, long need_y0,
                              long dots, long axpy, T* dgis, T* dghs, T* gwhT, T* gbh, T* gthr, T* gyn,
                              long* bs, T* vs, long* macs) {
    (void)L;
    const unsigned int csr = ftz_on();
    const long O = 3 * H;
    const T gm = (T)gamma, ep = (T)epsilon, iep = (T)1 / (T)epsilon;
    T* dgh = dghs + t * B * O;
    for (long b = 0; b < B; ++b) {
        const T* restrict sb = s + (t * B + b) * 4 * H;
        const T* restrict ctb = cts + (t * B + b) * H;
        const T* restrict cpb = t ? cts + ((t - 1) * B + b) * H : c0 + b * H;
        const T* restrict gyb = gys + (t * B + b) * H;
        const T* restrict gnb = gcnt ? gcnt + b * H : NULL;
        T* restrict gcb = gc + b * H;
        T* restrict gy_ = gy + b * H;
        T* restrict dgi = dgis + (t * B + b) * O;
        T* restrict dg = dgh + b * O;
        for (long j = 0; j < H; ++j) {
            const T ct = ctb[j], th = thr[j];
            const T v = ct - th;
            const T e = v > (T)0 ? (T)1 : (T)0;
            /* c_{t-1}: the forward's c = c~ - e threshold of the step before (bitwise) */
            T cp = cpb[j];
            if (t) { const T ep_ = (cp - th) > (T)0 ? (T)1 : (T)0; cp = cp - ep_ * th; }
            const T dy = gy_[j] + gyb[j];
            const T dcn = gcb[j];
            T det = dy * ct - dcn * th;
            if (gnb) det = det + gnb[j];
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
            dgi[j] = dar; dgi[H + j] = dau; dgi[2 * H + j] = dan;
            dg[j] = dar; dg[H + j] = dau; dg[2 * H + j] = dan * r;
            gcb[j] = dcp;
        }
        for (long o = 0; o < O; ++o) gbh[o] += dg[o];
    }
    /* the recurrent product W_hh y_{t-1}: dL/dy_{t-1} where needed, dW_hh over its non-zero y */
    const T* yp = t ? ys + (t - 1) * B * H : y0;
    const T* ctp = t ? cts + (t - 1) * B * H : NULL;
    long ndot = 0, naxpy = 0;
    const int do_dots = dots && (t || need_y0);
    if (do_dots) memset(gyn, 0, sizeof(T) * B * H);
    for (long j = 0; j < H; ++j) {
        const T* w = whT + j * O;
        if (do_dots) {
            for (long b = 0; b < B; ++b) {
                int want = 1;
                if (t) {
                    const T v = ctp[b * H + j] - thr[j];
                    want = v > (T)0 || (v < (T)0 ? -v : v) < ep;
                }
                if (want) { gyn[b * H + j] = FN(dot)(dgh + b * O, w, O); ++ndot; }
            }
        }
        if (axpy) {
            long k = 0;
            for (long b = 0; b < B; ++b)
                if (yp[b * H + j] != (T)0) { bs[k] = b; vs[k] = yp[b * H + j]; ++k; }
            T* row = gwhT + j * O;
            for (long q = 0; q < k; ++q) FN(axpy)(row, vs[q], dgh + bs[q] * O, O);
            naxpy += k;
        }
    }
    if (do_dots) memcpy(gy, gyn, sizeof(T) * B * H);
    macs[0] += ndot;
    macs[1] += naxpy;
    ftz_off(csr);
}

/* dW_hh^T[j] += sum_{t0 <= t < t1} sum_b y_{t-1}[b, j] dgh_t[b] over the non-zero y_{t-1}: the
   weight gradient of a block of steps, row by row, so each row of dW_hh^T is read and written once
   per block (not once per step) while the block's dgh rows stay in cache. y0 [B, H]; ys [L, B, H];
   dghs [L, B, 3H]. Returns the axpys done (times 3H). */
CLONES long FN(egru_dw_block)(long B, long H, long t0, long t1, const T* y0, const T* ys, const T* dghs,
                              T* gwhT) {
    const unsigned int csr = ftz_on();
    const long O = 3 * H;
    long n = 0;
    for (long j = 0; j < H; ++j) {
        T* row = gwhT + j * O;
        for (long t = t0; t < t1; ++t) {
            const T* yp = t ? ys + (t - 1) * B * H : y0;
            const T* dg = dghs + t * B * O;
            for (long b = 0; b < B; ++b) {
                const T v = yp[b * H + j];
                if (v != (T)0) { FN(axpy)(row, v, dg + b * O, O); ++n; }
            }
        }
    }
    ftz_off(csr);
    return n;
}

#undef MM

/* this body's parameters end here, so the next instantiation can define them anew */
#undef T
#undef SUF
#undef VT
#undef LANES
#undef PS
#undef TBITS
