/* The GRU and LSTM gate kernels for one scalar type: included by rnn.c with T (the C type), SUF
   (the name suffix) and TBITS defined, after cmath.h (exp, sigm, tanh). */

/* GRU step: gi, gh [B, 3H] (r z n), h [B, H] -> hout [B, H]; s [B, 4H] (r z n gh_n) if save */
INL void FN(gru_fwd_loop)(const T* restrict gi, const T* restrict gh, const T* restrict h,
                          const long B, const long H, T* restrict hout, T* restrict s, const int save) {
    for (long b = 0; b < B; ++b) {
        const T* p_gi = gi + b * 3 * H; const T* p_gh = gh + b * 3 * H; const T* p_h = h + b * H;
        T* p_o = hout + b * H; T* p_s = s + b * 4 * H;
        for (long j = 0; j < H; ++j) {
            const T b_r = FN(sigm)(p_gi[j] + p_gh[j]);
            const T b_z = FN(sigm)(p_gi[H + j] + p_gh[H + j]);
            const T b_n = FN(tanh)(p_gi[2 * H + j] + b_r * p_gh[2 * H + j]);
            p_o[j] = b_n + b_z * (p_h[j] - b_n);
            if (save) { p_s[j] = b_r; p_s[H + j] = b_z; p_s[2 * H + j] = b_n; p_s[3 * H + j] = p_gh[2 * H + j]; }
        }
    }
}
CLONES void FN(gru_fwd)(const T* gi, const T* gh, const T* h, long B, long H, T* hout, T* s) {
    if (s) FN(gru_fwd_loop)(gi, gh, h, B, H, hout, s, 1);
    else FN(gru_fwd_loop)(gi, gh, h, B, H, hout, s, 0);
}
/* GRU step backward: s [B, 4H], h = h_{t-1} [B, H], dy [B, H] or NULL, dh = dL/dh_t from later
   steps [B, H] -> dgi, dgh [B, 3H], dhd [B, H] (the gradient of h_{t-1} past W_hh) */
INL void FN(gru_bwd_loop)(const T* restrict s, const T* restrict h, const T* restrict dy,
                          const T* restrict dh, const long B, const long H, T* restrict dgi,
                          T* restrict dgh, T* restrict dhd, const int has_dy) {
    for (long b = 0; b < B; ++b) {
        const T* p_s = s + b * 4 * H; const T* p_h = h + b * H; const T* p_dh = dh + b * H;
        const T* p_dy = dy + b * H * has_dy;
        T* p_dgi = dgi + b * 3 * H; T* p_dgh = dgh + b * 3 * H; T* p_dhd = dhd + b * H;
        for (long j = 0; j < H; ++j) {
            const T b_g = has_dy ? p_dh[j] + p_dy[j] : p_dh[j];
            const T b_r = p_s[j], b_z = p_s[H + j], b_n = p_s[2 * H + j], b_hn = p_s[3 * H + j];
            const T b_dan = b_g * ((T)1 - b_z) * ((T)1 - b_n * b_n);
            const T b_dar = b_dan * b_hn * (b_r * ((T)1 - b_r));
            const T b_daz = b_g * (p_h[j] - b_n) * (b_z * ((T)1 - b_z));
            p_dgi[j] = b_dar; p_dgi[H + j] = b_daz; p_dgi[2 * H + j] = b_dan;
            p_dgh[j] = b_dar; p_dgh[H + j] = b_daz; p_dgh[2 * H + j] = b_dan * b_r;
            p_dhd[j] = b_g * b_z;
        }
    }
}
CLONES void FN(gru_bwd)(const T* s, const T* h, const T* dy, const T* dh, long B, long H,
                        T* dgi, T* dgh, T* dhd) {
    if (dy) FN(gru_bwd_loop)(s, h, dy, dh, B, H, dgi, dgh, dhd, 1);
    else FN(gru_bwd_loop)(s, h, dh, dh, B, H, dgi, dgh, dhd, 0);
}
/* the hidden states h_{t-1} of a segment, recomputed from the saved gates: hs [L, B, H] gets h0,
   then h_t = n_t + z_t (h_{t-1} - n_t), the forward's operations in its order (bitwise equal) */
CLONES void FN(gru_hist)(const T* s, const T* h0, long L, long B, long H, T* hs) {
    memcpy(hs, h0, sizeof(T) * B * H);
    for (long t = 1; t < L; ++t) {
        for (long b = 0; b < B; ++b) {
            const T* restrict p_s = s + ((t - 1) * B + b) * 4 * H;
            const T* restrict p_h = hs + ((t - 1) * B + b) * H;
            T* restrict p_o = hs + (t * B + b) * H;
            for (long j = 0; j < H; ++j) {
                const T b_z = p_s[H + j], b_n = p_s[2 * H + j];
                p_o[j] = b_n + b_z * (p_h[j] - b_n);
            }
        }
    }
}

/* LSTM step: gi, gh [B, 4H] (i f g o), c [B, H] -> hout, cout [B, H]; s [B, 4H] activations if save */
INL void FN(lstm_fwd_loop)(const T* restrict gi, const T* restrict gh, const T* restrict c,
                           const long B, const long H, T* restrict hout, T* restrict cout,
                           T* restrict s, const int save) {
    for (long b = 0; b < B; ++b) {
        const T* p_gi = gi + b * 4 * H; const T* p_gh = gh + b * 4 * H; const T* p_c = c + b * H;
        T* p_h = hout + b * H; T* p_co = cout + b * H; T* p_s = s + b * 4 * H;
        for (long j = 0; j < H; ++j) {
            const T b_i = FN(sigm)(p_gi[j] + p_gh[j]);
            const T b_f = FN(sigm)(p_gi[H + j] + p_gh[H + j]);
            const T b_g = FN(tanh)(p_gi[2 * H + j] + p_gh[2 * H + j]);
            const T b_o = FN(sigm)(p_gi[3 * H + j] + p_gh[3 * H + j]);
            const T b_c = b_f * p_c[j] + b_i * b_g;
            p_co[j] = b_c;
            p_h[j] = b_o * FN(tanh)(b_c);
            if (save) { p_s[j] = b_i; p_s[H + j] = b_f; p_s[2 * H + j] = b_g; p_s[3 * H + j] = b_o; }
        }
    }
}
CLONES void FN(lstm_fwd)(const T* gi, const T* gh, const T* c, long B, long H, T* hout,
                         T* cout, T* s) {
    if (s) FN(lstm_fwd_loop)(gi, gh, c, B, H, hout, cout, s, 1);
    else FN(lstm_fwd_loop)(gi, gh, c, B, H, hout, cout, s, 0);
}
/* LSTM step backward: s [B, 4H], c = c_t, cp = c_{t-1} [B, H], dy [B, H] or NULL, dh, dc =
   dL/dh_t, dL/dc_t from later steps -> dg [B, 4H] (gate pre-activations), dcp = dL/dc_{t-1} */
INL void FN(lstm_bwd_loop)(const T* restrict s, const T* restrict c, const T* restrict cp,
                           const T* restrict dy, const T* restrict dh, const T* restrict dc,
                           const long B, const long H, T* restrict dg, T* restrict dcp,
                           const int has_dy) {
    for (long b = 0; b < B; ++b) {
        const T* p_s = s + b * 4 * H; const T* p_c = c + b * H; const T* p_cp = cp + b * H;
        const T* p_dy = dy + b * H * has_dy; const T* p_dh = dh + b * H; const T* p_dc = dc + b * H;
        T* p_dg = dg + b * 4 * H; T* p_dcp = dcp + b * H;
        for (long j = 0; j < H; ++j) {
            const T b_gh = has_dy ? p_dh[j] + p_dy[j] : p_dh[j];
            const T b_i = p_s[j], b_f = p_s[H + j], b_g = p_s[2 * H + j], b_o = p_s[3 * H + j];
            const T b_tc = FN(tanh)(p_c[j]);
            const T b_dc = p_dc[j] + b_gh * b_o * ((T)1 - b_tc * b_tc);
            p_dg[j] = b_dc * b_g * (b_i * ((T)1 - b_i));
            p_dg[H + j] = b_dc * p_cp[j] * (b_f * ((T)1 - b_f));
            p_dg[2 * H + j] = b_dc * b_i * ((T)1 - b_g * b_g);
            p_dg[3 * H + j] = b_gh * b_tc * (b_o * ((T)1 - b_o));
            p_dcp[j] = b_dc * b_f;
        }
    }
}
CLONES void FN(lstm_bwd)(const T* s, const T* c, const T* cp, const T* dy, const T* dh,
                         const T* dc, long B, long H, T* dg, T* dcp) {
    if (dy) FN(lstm_bwd_loop)(s, c, cp, dy, dh, dc, B, H, dg, dcp, 1);
    else FN(lstm_bwd_loop)(s, c, cp, dh, dh, dc, B, H, dg, dcp, 0);
}
/* hs [L, B, H] gets h0, then h_t = o_t tanh(c_t) from the saved gates and cell states (bitwise
   equal to the forward's) */
CLONES void FN(lstm_hist)(const T* s, const T* cs, const T* h0, long L, long B, long H, T* hs) {
    memcpy(hs, h0, sizeof(T) * B * H);
    for (long t = 1; t < L; ++t) {
        for (long b = 0; b < B; ++b) {
            const T* restrict p_s = s + ((t - 1) * B + b) * 4 * H;
            const T* restrict p_c = cs + ((t - 1) * B + b) * H;
            T* restrict p_o = hs + (t * B + b) * H;
            for (long j = 0; j < H; ++j) p_o[j] = p_s[3 * H + j] * FN(tanh)(p_c[j]);
        }
    }
}

/* this body's parameters end here, so the next instantiation can define them anew */
#undef T
#undef SUF
#undef TBITS
