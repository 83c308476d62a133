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

#undef MM

/* this body's parameters end here, so the next instantiation can define them anew */
#undef T
#undef SUF
#undef VT
#undef LANES
#undef PS
