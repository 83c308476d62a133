/* Delta GRU / Delta LSTM segment kernels for one scalar type: included by delta.c with T (the C
   type), SUF (the name suffix) and TBITS defined, after cmath.h (exp, sigm, tanh, axpy, dot).
   Layout: x [L, B, nI]; states h, c, h_ref [B, H], x_ref [B, nI], m_x, m_h [B, G*H]; W^T
   [in, G*H] (row j: the weights of input column j). */



/* One memory's step, encoding: d = v - ref, active where |d| > th (every entry when th == 0),
   ref := v there; mk, dv [B, n] get the masks and deltas (row by row, so the loop vectorises). */
INL void FN(encode)(const T* restrict v, T* restrict ref, const T th, const long B, const long n,
                    unsigned char* restrict mk, T* restrict dv) {
    const long N = B * n;
    if (th == (T)0) {
        for (long e = 0; e < N; ++e) { dv[e] = v[e] - ref[e]; mk[e] = 1; ref[e] = v[e]; }
        return;
    }
    for (long e = 0; e < N; ++e) {
        const T d = v[e] - ref[e];
        const int act = (d < 0 ? -d : d) > th;
        dv[e] = d;
        mk[e] = (unsigned char)act;
        ref[e] = act ? v[e] : ref[e];
    }
}

/* ... and the memory update: m[b] += d[b, j] W^T[j] for each active (b, j), column by column
   (the row W^T[j] read once for every sample with j active). Returns the active entries. */
INL long FN(update)(const long B, const long n, const long O, const unsigned char* restrict mk,
                    const T* restrict dv, const T* restrict wT, T* restrict m, long* restrict bs,
                    T* restrict vs) {
    /* the active entries column by column (bs, vs: n + 1 starts, then the (b, d) pairs) */
    long* start = bs;
    long* bb = bs + n + 1;
    long cnt = 0;
    for (long j = 0; j < n; ++j) {
        start[j] = cnt;
        for (long b = 0; b < B; ++b)
            if (mk[b * n + j]) { bb[cnt] = b; vs[cnt] = dv[b * n + j]; ++cnt; }
    }
    start[n] = cnt;
    /* output columns in chunks of UPD_CHUNK, so the B rows of m being added to stay in L1 */
    for (long o0 = 0; o0 < O; o0 += UPD_CHUNK) {
        const long len = O - o0 < UPD_CHUNK ? O - o0 : UPD_CHUNK;
        for (long j = 0; j < n; ++j) {
            const T* w = wT + j * O + o0;
            for (long q = start[j]; q < start[j + 1]; ++q) FN(axpy)(m + bb[q] * O + o0, vs[q], w, len);
        }
    }
    return cnt;
}

/* GRU gates of one sample: a = m_x + b_ih, c = m_h + b_hh (r z n) -> y; s (r, z, n, c_n) */
INL void FN(gru_gates)(const T* restrict a, const T* restrict m, const T* restrict bi, const T* restrict bh,
                       const T* restrict hb, const long H, T* restrict yb, T* restrict sb) {
    for (long j = 0; j < H; ++j) {
        const T r = FN(sigm)((a[j] + bi[j]) + (m[j] + bh[j]));
        const T z = FN(sigm)((a[H + j] + bi[H + j]) + (m[H + j] + bh[H + j]));
        const T hn = m[2 * H + j] + bh[2 * H + j];
        const T nn = FN(tanh)((a[2 * H + j] + bi[2 * H + j]) + r * hn);
        yb[j] = nn + z * (hb[j] - nn);
        sb[j] = r; sb[H + j] = z; sb[2 * H + j] = nn; sb[3 * H + j] = hn;
    }
}

/* LSTM gates of one sample: (m_x + b_ih) + (m_h + b_hh) (i f g o), c in place -> y; s, cs */
INL void FN(lstm_gates)(const T* restrict a, const T* restrict m, const T* restrict bi, const T* restrict bh,
                        T* restrict cb, const long H, T* restrict yb, T* restrict sb, T* restrict csb) {
    for (long j = 0; j < H; ++j) {
        const T ig = FN(sigm)((a[j] + bi[j]) + (m[j] + bh[j]));
        const T fg = FN(sigm)((a[H + j] + bi[H + j]) + (m[H + j] + bh[H + j]));
        const T gg = FN(tanh)((a[2 * H + j] + bi[2 * H + j]) + (m[2 * H + j] + bh[2 * H + j]));
        const T og = FN(sigm)((a[3 * H + j] + bi[3 * H + j]) + (m[3 * H + j] + bh[3 * H + j]));
        const T cn = fg * cb[j] + ig * gg;
        cb[j] = cn;
        yb[j] = og * FN(tanh)(cn);
        sb[j] = ig; sb[H + j] = fg; sb[2 * H + j] = gg; sb[3 * H + j] = og; csb[j] = cn;
    }
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
        const T* w = wT + j * O;
        if (need_in) {
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

/* The forward of a segment of L steps; states updated in place. ys [L, B, H]. sx, dxs [L, B, nI],
   sh, dhs [L, B, H] (masks, deltas), s [L, B, 4H] (GRU: r, z, n, m_hn + b_hn; LSTM: i, f, g, o),
   cs [L, B, H] (LSTM: c_t): saved for the backward, or with save = 0 scratch of one step (the
   first [B, .] / [B, 4H] / [B, H] of each). bi, bh: biases (zeros for none). counts [L, 2]:
   active input and hidden entries per step. bs, vs: scratch of B entries. */
CLONES void FN(delta_fwd)(long lstm, long L, long B, long nI, long H, const T* x, T* h, T* c, T* xr,
                          T* hr, T* mx, T* mh, const T* wiT, const T* whT, const T* bi, const T* bh,
                          double thx, double thh, T* ys, unsigned char* sx, T* dxs, unsigned char* sh,
                          T* dhs, T* s, T* cs, long save, long* bs, T* vs, long* counts) {
    const unsigned int csr = ftz_on();
    const long O = (lstm ? 4 : 3) * H;
    for (long t = 0; t < L; ++t) {
        const long tx = save ? t * B * nI : 0, th = save ? t * B * H : 0;
        unsigned char* mkx = sx + tx; T* dvx = dxs + tx;
        unsigned char* mkh = sh + th; T* dvh = dhs + th;
        FN(encode)(x + t * B * nI, xr, (T)thx, B, nI, mkx, dvx);
        FN(encode)(h, hr, (T)thh, B, H, mkh, dvh);
        counts[2 * t] = FN(update)(B, nI, O, mkx, dvx, wiT, mx, bs, vs);
        counts[2 * t + 1] = FN(update)(B, H, O, mkh, dvh, whT, mh, bs, vs);
        T* yt = ys + t * B * H;
        T* st = s + (save ? t * B * 4 * H : 0);
        for (long b = 0; b < B; ++b) {
            if (!lstm) FN(gru_gates)(mx + b * O, mh + b * O, bi, bh, h + b * H, H, yt + b * H, st + b * 4 * H);
            else FN(lstm_gates)(mx + b * O, mh + b * O, bi, bh, c + b * H, H, yt + b * H, st + b * 4 * H,
                                cs + th + b * H);
        }
        memcpy(h, yt, sizeof(T) * B * H);
    }
    ftz_off(csr);
}

/* The backward of a segment. In: gys, step t's output gradient [B, H] at gys + t * gst (gst = 0:
   one block for every step: none (zeros) or a sum's); gh, gc, gxr, ghr, gmx, gmh: the gradients
   of the final state (gc unused for the GRU); out: the same arrays hold the gradients of the
   initial state. gx [L, B, nI] (zeros in) or NULL; need_x: take the input side's deltas'
   gradients (for gx or the initial x_ref); gwiT [nI, G*H], gwhT [H, G*H], gbi, gbh [G*H]:
   accumulated into (gwiT, gwhT only when not NULL). Scratch: gA, gC [B, G*H], ghn [B, H], bs, vs [B]. */
CLONES void FN(delta_bwd)(long lstm, long L, long B, long nI, long H, const T* h0, const T* c0,
                          const T* ys, const T* cs, const T* s, const unsigned char* sx, const T* dxs,
                          const unsigned char* sh, const T* dhs, const T* wiT, const T* whT, const T* gys,
                          T* gh, T* gc, T* gxr, T* ghr, T* gmx, T* gmh, T* gx, long need_x, T* gwiT,
                          T* gwhT, T* gbi, T* gbh, T* gA, T* gC, T* ghn, long* bs, T* vs, long gst) {
    const unsigned int csr = ftz_on();
    const long G = lstm ? 4 : 3, O = G * H;
    for (long t = L - 1; t >= 0; --t) {
        const T* restrict hp = t ? ys + (t - 1) * B * H : h0;
        const T* restrict cp = lstm ? (t ? cs + (t - 1) * B * H : c0) : NULL;
        for (long b = 0; b < B; ++b) {
            const T* restrict sb = s + (t * B + b) * 4 * H;
            const T* restrict gy = gys + t * gst + b * H;
            T* restrict ga = gA + b * O;
            T* restrict gcc = gC + b * O;
            T* restrict ghb = gh + b * H;
            T* restrict gnb = ghn + b * H;
            if (!lstm) {
                const T* restrict hpb = hp + b * H;
                for (long j = 0; j < H; ++j) {
                    const T g = ghb[j] + gy[j];
                    const T r = sb[j], z = sb[H + j], nn = sb[2 * H + j], hn = sb[3 * H + j];
                    const T dan = g * ((T)1 - z) * ((T)1 - nn * nn);
                    const T dar = dan * hn * (r * ((T)1 - r));
                    const T daz = g * (hpb[j] - nn) * (z * ((T)1 - z));
                    ga[j] = dar; ga[H + j] = daz; ga[2 * H + j] = dan;
                    gcc[j] = dar; gcc[H + j] = daz; gcc[2 * H + j] = dan * r;
                    gnb[j] = g * z;
                }
            } else {
                const T* restrict cpb = cp + b * H;
                const T* restrict ctb = cs + (t * B + b) * H;
                T* restrict gcb = gc + b * H;
                for (long j = 0; j < H; ++j) {
                    const T g = ghb[j] + gy[j];
                    const T ig = sb[j], fg = sb[H + j], gg = sb[2 * H + j], og = sb[3 * H + j];
                    const T tc = FN(tanh)(ctb[j]);
                    const T gct = gcb[j] + g * og * ((T)1 - tc * tc);
                    const T dai = gct * gg * (ig * ((T)1 - ig));
                    const T daf = gct * cpb[j] * (fg * ((T)1 - fg));
                    const T dag = gct * ig * ((T)1 - gg * gg);
                    const T dao = g * tc * (og * ((T)1 - og));
                    gcb[j] = gct * fg;
                    ga[j] = dai; ga[H + j] = daf; ga[2 * H + j] = dag; ga[3 * H + j] = dao;
                    gcc[j] = dai; gcc[H + j] = daf; gcc[2 * H + j] = dag; gcc[3 * H + j] = dao;
                    gnb[j] = 0;
                }
            }
            T* restrict pmx = gmx + b * O;
            T* restrict pmh = gmh + b * O;
            for (long o = 0; o < O; ++o) { pmx[o] += ga[o]; pmh[o] += gcc[o]; }
            for (long o = 0; o < O; ++o) { gbi[o] += ga[o]; gbh[o] += gcc[o]; }
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
#undef TBITS
