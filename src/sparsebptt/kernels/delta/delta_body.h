/* Delta GRU / Delta LSTM segment kernels for one scalar type: included by delta.c with T (the C
   type), SUF (the name suffix), I (the same-width integer) and the EXP_* constants defined.
   Layout: x [L, B, nI]; states h, c, h_ref [B, H], x_ref [B, nI], m_x, m_h [B, G*H]; W^T
   [in, G*H] (row j: the weights of input column j). */

/* exp(x) as in rnn_body.h: branch-free, so the gate loops vectorise */
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

/* One memory's step: d = v - ref, active where |d| > th (every entry when th == 0), ref := v
   there, m[b] += d[b, j] W^T[j] for each active (b, j), column by column (the row W^T[j] read
   once for every sample with j active). mk, dv [B, n] (saved for the backward) when not NULL.
   Returns the number of active entries. */
INL long FN(encode_update)(const T* restrict v, T* restrict ref, const T th, const long B, const long n,
                           const long O, const T* restrict wT, T* restrict m, unsigned char* restrict mk,
                           T* restrict dv, long* restrict bs, T* restrict vs) {
    long cnt = 0;
    for (long j = 0; j < n; ++j) {
        long k = 0;
        for (long b = 0; b < B; ++b) {
            const long e = b * n + j;
            const T d = v[e] - ref[e];
            const int act = th == (T)0 || (d < 0 ? -d : d) > th;
            if (mk) { mk[e] = (unsigned char)act; dv[e] = d; }
            if (act) { ref[e] = v[e]; bs[k] = b; vs[k] = d; ++k; }
        }
        const T* w = wT + j * O;
        for (long q = 0; q < k; ++q) FN(axpy)(m + bs[q] * O, vs[q], w, O);
        cnt += k;
    }
    return cnt;
}

/* The backward of one memory's step, column by column: for each active (b, j),
   gd = gm[b] . W^T[j] (the gradient of the delta, when need_in), gout[b, j] += gref[b, j] + gd
   (gout: the gradient of v, when not NULL), gref[b, j] = -gd; gwT[j] += sum_b d[b, j] gm[b]
   (when gwT is not NULL). Inactive entries pass gref on unchanged and give v nothing. */
INL void FN(side_bwd)(const long B, const long n, const long O, const unsigned char* restrict mk,
                      const T* restrict dv, const T* restrict wT, const T* restrict gm, T* restrict gref,
                      T* restrict gout, const long need_in, T* restrict gwT, long* restrict bs,
                      T* restrict vs) {
    for (long j = 0; j < n; ++j) {
        long k = 0;
        for (long b = 0; b < B; ++b) {
            const long e = b * n + j;
            if (mk[e]) { bs[k] = b; vs[k] = dv[e]; ++k; }
        }
        if (!k) continue;
        if (need_in) {
            const T* w = wT + j * O;
            for (long q = 0; q < k; ++q) {
                const long e = bs[q] * n + j;
                const T gd = FN(dot)(gm + bs[q] * O, w, O);
                if (gout) gout[e] += gref[e] + gd;
                gref[e] = -gd;
            }
        }
        if (gwT) {
            T* row = gwT + j * O;
            for (long q = 0; q < k; ++q) FN(axpy)(row, vs[q], gm + bs[q] * O, O);
        }
    }
}

/* The forward of a segment of L steps; states updated in place. ys [L, B, H]. Saved for the
   backward when s is not NULL: sx, dxs [L, B, nI], sh, dhs [L, B, H] (masks, deltas), s
   [L, B, 4H] (GRU: r, z, n, m_hn + b_hn; LSTM: i, f, g, o), cs [L, B, H] (LSTM: c_t).
   counts [L, 2]: active input and hidden entries per step. bs, vs: scratch of B entries. */
CLONES void FN(delta_fwd)(long lstm, long L, long B, long nI, long H, const T* x, T* h, T* c, T* xr,
                          T* hr, T* mx, T* mh, const T* wiT, const T* whT, const T* bi, const T* bh,
                          double thx, double thh, T* ys, unsigned char* sx, T* dxs, unsigned char* sh,
                          T* dhs, T* s, T* cs, long* bs, T* vs, long* counts) {
    const unsigned int csr = ftz_on();
    const long G = lstm ? 4 : 3, O = G * H;
    const int save = s != NULL;
    for (long t = 0; t < L; ++t) {
        counts[2 * t] = FN(encode_update)(x + t * B * nI, xr, (T)thx, B, nI, O, wiT, mx,
                                          save ? sx + t * B * nI : NULL, save ? dxs + t * B * nI : NULL, bs, vs);
        counts[2 * t + 1] = FN(encode_update)(h, hr, (T)thh, B, H, O, whT, mh,
                                              save ? sh + t * B * H : NULL, save ? dhs + t * B * H : NULL, bs, vs);
        T* restrict yt = ys + t * B * H;
        for (long b = 0; b < B; ++b) {
            const T* restrict a = mx + b * O;
            const T* restrict m = mh + b * O;
            const T* restrict hb = h + b * H;
            T* restrict cb = lstm ? c + b * H : NULL;
            T* restrict yb = yt + b * H;
            T* restrict sb = save ? s + (t * B + b) * 4 * H : NULL;
            T* restrict csb = (save && lstm) ? cs + (t * B + b) * H : NULL;
            for (long j = 0; j < H; ++j) {
                if (!lstm) {
                    const T ar = a[j] + (bi ? bi[j] : (T)0), az = a[H + j] + (bi ? bi[H + j] : (T)0);
                    const T an = a[2 * H + j] + (bi ? bi[2 * H + j] : (T)0);
                    const T cr = m[j] + (bh ? bh[j] : (T)0), cz = m[H + j] + (bh ? bh[H + j] : (T)0);
                    const T hn = m[2 * H + j] + (bh ? bh[2 * H + j] : (T)0);
                    const T r = FN(sigm)(ar + cr), z = FN(sigm)(az + cz);
                    const T nn = FN(tanh)(an + r * hn);
                    yb[j] = nn + z * (hb[j] - nn);
                    if (sb) { sb[j] = r; sb[H + j] = z; sb[2 * H + j] = nn; sb[3 * H + j] = hn; }
                } else {
                    T gt[4];
                    for (int q = 0; q < 4; ++q)
                        gt[q] = (a[q * H + j] + (bi ? bi[q * H + j] : (T)0)) + (m[q * H + j] + (bh ? bh[q * H + j] : (T)0));
                    const T ig = FN(sigm)(gt[0]), fg = FN(sigm)(gt[1]), gg = FN(tanh)(gt[2]), og = FN(sigm)(gt[3]);
                    const T cn = fg * cb[j] + ig * gg;
                    cb[j] = cn;
                    yb[j] = og * FN(tanh)(cn);
                    if (sb) { sb[j] = ig; sb[H + j] = fg; sb[2 * H + j] = gg; sb[3 * H + j] = og; csb[j] = cn; }
                }
            }
        }
        memcpy(h, yt, sizeof(T) * B * H);
    }
    ftz_off(csr);
}

/* The backward of a segment. In: gys [L, B, H] or NULL; gh, gc, gxr, ghr, gmx, gmh: the gradients
   of the final state (gc unused for the GRU); out: the same arrays hold the gradients of the
   initial state. gx [L, B, nI] (zeros in) or NULL; need_x: take the input side's deltas'
   gradients (for gx or the initial x_ref); gwiT [nI, G*H], gwhT [H, G*H], gbi, gbh [G*H]:
   accumulated into when not NULL. Scratch: gA, gC [B, G*H], ghn [B, H], bs, vs [B]. */
CLONES void FN(delta_bwd)(long lstm, long L, long B, long nI, long H, const T* h0, const T* c0,
                          const T* ys, const T* cs, const T* s, const unsigned char* sx, const T* dxs,
                          const unsigned char* sh, const T* dhs, const T* wiT, const T* whT, const T* gys,
                          T* gh, T* gc, T* gxr, T* ghr, T* gmx, T* gmh, T* gx, long need_x, T* gwiT,
                          T* gwhT, T* gbi, T* gbh, T* gA, T* gC, T* ghn, long* bs, T* vs) {
    const unsigned int csr = ftz_on();
    const long G = lstm ? 4 : 3, O = G * H;
    for (long t = L - 1; t >= 0; --t) {
        const T* restrict hp = t ? ys + (t - 1) * B * H : h0;
        const T* restrict cp = lstm ? (t ? cs + (t - 1) * B * H : c0) : NULL;
        for (long b = 0; b < B; ++b) {
            const T* restrict sb = s + (t * B + b) * 4 * H;
            const T* restrict gy = gys ? gys + (t * B + b) * H : NULL;
            T* restrict ga = gA + b * O;
            T* restrict gcc = gC + b * O;
            T* restrict ghb = gh + b * H;
            T* restrict gnb = ghn + b * H;
            for (long j = 0; j < H; ++j) {
                const T g = gy ? ghb[j] + gy[j] : ghb[j];
                if (!lstm) {
                    const T r = sb[j], z = sb[H + j], nn = sb[2 * H + j], hn = sb[3 * H + j];
                    const T dan = g * ((T)1 - z) * ((T)1 - nn * nn);
                    const T dar = dan * hn * (r * ((T)1 - r));
                    const T daz = g * (hp[b * H + j] - nn) * (z * ((T)1 - z));
                    ga[j] = dar; ga[H + j] = daz; ga[2 * H + j] = dan;
                    gcc[j] = dar; gcc[H + j] = daz; gcc[2 * H + j] = dan * r;
                    gnb[j] = g * z;
                } else {
                    const T ig = sb[j], fg = sb[H + j], gg = sb[2 * H + j], og = sb[3 * H + j];
                    const T tc = FN(tanh)(cs[(t * B + b) * H + j]);
                    const T gct = gc[b * H + j] + g * og * ((T)1 - tc * tc);
                    const T dai = gct * gg * (ig * ((T)1 - ig));
                    const T daf = gct * cp[b * H + j] * (fg * ((T)1 - fg));
                    const T dag = gct * ig * ((T)1 - gg * gg);
                    const T dao = g * tc * (og * ((T)1 - og));
                    gc[b * H + j] = gct * fg;
                    ga[j] = gcc[j] = dai; ga[H + j] = gcc[H + j] = daf;
                    ga[2 * H + j] = gcc[2 * H + j] = dag; ga[3 * H + j] = gcc[3 * H + j] = dao;
                    gnb[j] = 0;
                }
            }
            T* restrict pmx = gmx + b * O;
            T* restrict pmh = gmh + b * O;
            for (long o = 0; o < O; ++o) { pmx[o] += ga[o]; pmh[o] += gcc[o]; }
            if (gbi) for (long o = 0; o < O; ++o) gbi[o] += ga[o];
            if (gbh) for (long o = 0; o < O; ++o) gbh[o] += gcc[o];
        }
        FN(side_bwd)(B, nI, O, sx + t * B * nI, dxs + t * B * nI, wiT, gmx, gxr, gx ? gx + t * B * nI : NULL,
                     need_x, gwiT, bs, vs);
        FN(side_bwd)(B, H, O, sh + t * B * H, dhs + t * B * H, whT, gmh, ghr, ghn, 1, gwhT, bs, vs);
        memcpy(gh, ghn, sizeof(T) * B * H);
    }
    ftz_off(csr);
}

#undef T
#undef SUF
#undef I
#undef EXP_LO
#undef EXP_HI
#undef EXP_MAGIC
#undef EXP_C1
#undef EXP_C2
#undef EXP_BIAS
#undef EXP_MANT
#undef EXP_POLY
