/* Sparse-input products for one scalar type (a layer whose input is mostly zeros: spikes,
   events, one-hot tokens): included by sparse_input.c and lif_body.h with T, SUF and CLONES
   defined (and sparse_input.h included before). Names: sp_csr_f32, sp_mm_f32, sp_mm_t_f32. */
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
long FN(sp_csr)(const T* x, long R, long K, long max_nnz, long* ptr, int* col, T* val, int* binary) {
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
CLONES void FN(sp_mm)(const long* ptr, const int* col, const T* val, const T* wt, const T* bias, long R, long H,
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
CLONES void FN(sp_mm_t)(const long* ptr, const int* col, const T* val, const T* d, long R, long K, long H,
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
