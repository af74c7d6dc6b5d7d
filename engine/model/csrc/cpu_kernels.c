/*
 * CPU kernels for the kv engine's decode step (engine/cpu_kernels.py compiles this file on first use).
 *
 * a3po_decode_attention: softmax attention of one new query per row (and query head) over the rows'
 * cached keys and values, in one pass over the position-major cache. On the embedded model torch's
 * route for this (a batched product, a softmax, a batched product) spends most of its time on
 * per-matrix overhead: each row and head is a 1 x D by D x L product, hundreds of them per layer and
 * step. Here the cache is read once, position by position, as the contiguous block the engine stores
 * it in.
 *
 * a3po_rope_append: the step's rotary embedding of queries and keys and the cache write of keys and
 * values, one pass (torch: a dozen view, complex-product and copy kernels per layer).
 *
 * a3po_rmsnorm, a3po_silu_mul: a decoder layer's RMSNorm and its gated MLP activation, each one pass
 * over the rows. In torch they are chains of small element-wise kernels (six for the norm, three for
 * the activation), and at decode sizes (tens of rows of 128-384 floats) every link costs more in
 * dispatch than in arithmetic.
 *
 * Float32 only, AVX2 + FMA (x86-64); row sizes (head size, hidden size, MLP width) must be multiples of
 * 8. Sums accumulate in float32 like torch's (in a different order: results agree to float32 rounding).
 * The exponential is a degree-6 polynomial after the usual range reduction (relative error below 2e-7,
 * about one float32 ulp), and exp(-inf) is exactly 0, so masked positions carry no weight at all.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

/* 1 when this CPU can run the kernels (the library itself is built with -mavx2 -mfma). */
int a3po_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Lane i of the result: the sum of the lanes of a_i (eight dot products finished at once). */
static inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    /* u0 holds rows 0-3 twice (low and high 128-bit halves, one partial sum each), u1 rows 4-7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Eight partial sums of q . k over D (a multiple of 8) floats. */
static inline __m256 dot_lanes(const float *q, const float *k, long D) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    for (long d = 8; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    return acc;
}

static inline float hsum(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(h);
}

/* e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 6
 * (truncation error |r|^7 / 7! < 1.2e-7), times 2^n built in the exponent bits. Below -87 the
 * result would leave float32's normal range; it is clamped there (e^-87 ~ 1.6e-38) and -inf gives 0. */
static inline __m256 exp_nonpositive(__m256 x) {
    __m256 c = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln2 in two parts (Cody-Waite), so that c - n ln2 loses no bits */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), c);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ), y);
}

/*
 * out[r] = softmax_l(scale * q[r] . k[l, r / m] + bias[r / (KV m), l]) @ v[l, r / m], for the R = N KV m
 * query rows r (row n, key/value head h, query head j of that head's group: r = (n KV + h) m + j).
 *
 *   q     (R, D) contiguous
 *   k, v  position l, row n, head h at  base + l * pos_stride + (n KV + h) D  (D contiguous floats)
 *   bias  (N, >= L) additive mask, row stride bias_stride: 0 attends, -inf hides a position; every row
 *         must attend somewhere
 *   out   (R, D) contiguous
 *   work  (L + 2) R floats of scratch
 *
 * Three passes, each streaming the cache position by position: scores (eight rows per step, so the
 * dot products' sums finish together), the softmax's maxima and exponentials, the weighted values.
 */
void a3po_decode_attention(const float *q, const float *k, const float *v, const float *bias, float *out, float *work,
                           long N, long KV, long m, long D, long L, long pos_stride, long bias_stride, float scale) {
    const long R = N * KV * m, per_row = KV * m;
    float *s = work, *mx = work + L * R, *sum = mx + R;
    for (long l = 0; l < L; l++) {
        const float *kl = k + l * pos_stride;
        float *sl = s + l * R;
        long r = 0;
        for (; r + 8 <= R; r += 8) {
            __m256 a[8];
            if (m == 1) {
                for (int i = 0; i < 8; i++) a[i] = dot_lanes(q + (r + i) * D, kl + (r + i) * D, D);
            } else {
                for (int i = 0; i < 8; i++) a[i] = dot_lanes(q + (r + i) * D, kl + ((r + i) / m) * D, D);
            }
            _mm256_storeu_ps(sl + r, sum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
        }
        for (; r < R; r++) sl[r] = hsum(dot_lanes(q + r * D, kl + (r / m) * D, D));
        for (long n = 0; n < N; n++) {
            const float b = bias[n * bias_stride + l];
            float *sn = sl + n * per_row;
            for (long j = 0; j < per_row; j++) sn[j] = sn[j] * scale + b;
        }
    }
    for (long r = 0; r < R; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    for (long l = 0; l < L; l++) {
        const float *sl = s + l * R;
        for (long r = 0; r < R; r++) mx[r] = sl[r] > mx[r] ? sl[r] : mx[r];
    }
    for (long l = 0; l < L; l++) {
        float *sl = s + l * R;
        long r = 0;
        for (; r + 8 <= R; r += 8) {
            __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sl + r), _mm256_loadu_ps(mx + r)));
            _mm256_storeu_ps(sl + r, e);
            _mm256_storeu_ps(sum + r, _mm256_add_ps(_mm256_loadu_ps(sum + r), e));
        }
        for (; r < R; r++) {
            float e = sl[r] == -INFINITY ? 0.0f : expf(sl[r] - mx[r]);
            sl[r] = e;
            sum[r] += e;
        }
    }
    memset(out, 0, sizeof(float) * R * D);
    for (long l = 0; l < L; l++) {
        const float *vl = v + l * pos_stride;
        const float *sl = s + l * R;
        for (long r = 0; r < R; r++) {
            const float *vr = vl + (m == 1 ? r : r / m) * D;
            float *o = out + r * D;
            const __m256 p = _mm256_set1_ps(sl[r]);
            for (long d = 0; d < D; d += 8)
                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(o + d)));
        }
    }
    for (long r = 0; r < R; r++) {
        const __m256 inv = _mm256_set1_ps(1.0f / sum[r]);
        float *o = out + r * D;
        for (long d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), inv));
    }
}

/* out[i] = x[i] * (1 / sqrt(mean(x[i]^2) + eps)) * w for the n rows of C floats (transformers' RMSNorm in
 * float32: normalise, then scale). x and out may be the same memory. */
void a3po_rmsnorm(const float *x, const float *w, float *out, long n, long C, float eps) {
    for (long i = 0; i < n; i++) {
        const float *xi = x + i * C;
        float *oi = out + i * C;
        __m256 acc = _mm256_setzero_ps();
        for (long c = 0; c < C; c += 8) {
            const __m256 a = _mm256_loadu_ps(xi + c);
            acc = _mm256_fmadd_ps(a, a, acc);
        }
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum(acc) / (float)C + eps));
        for (long c = 0; c < C; c += 8)
            _mm256_storeu_ps(oi + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xi + c), r), _mm256_loadu_ps(w + c)));
    }
}

/* out[i] = silu(g) * u for the n rows of gu, each [g (I floats), u (I floats)] (the stacked gate/up
 * product): silu(g) = g / (1 + e^-g), computed as g / (1 + e) for g >= 0 and g e / (1 + e) for g < 0
 * with e = e^-|g|, so the exponential never overflows. */
void a3po_silu_mul(const float *gu, float *out, long n, long I) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (long i = 0; i < n; i++) {
        const float *g = gu + i * 2 * I, *u = g + I;
        float *o = out + i * I;
        for (long c = 0; c < I; c += 8) {
            const __m256 x = _mm256_loadu_ps(g + c);
            const __m256 e = exp_nonpositive(_mm256_or_ps(x, sign));
            const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), x); /* picks x e where x's sign bit is set */
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + c)));
        }
    }
}

/*
 * One decode step's new keys and values into the cache, and its rotated queries: for each of the N rows,
 * qkv holds H query heads, KV key heads and KV value heads of D floats (the stacked q/k/v product, q and
 * k in rotate-half pair order: dims 2i and 2i + 1 turn together), rot the row's D / 2 rotations as
 * (cos, sin) pairs. Queries and keys are turned like torch's complex product,
 * (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos); the keys and the values go to position n of the
 * position-major cache (the same addressing as a3po_decode_attention), the queries to q_out (N H, D).
 */
void a3po_rope_append(const float *qkv, const float *rot, float *q_out, float *k, float *v, long N, long H, long KV,
                      long D, long pos_stride, long n) {
    const long heads = H + 2 * KV;
    float *kn = k + n * pos_stride, *vn = v + n * pos_stride;
    for (long i = 0; i < N; i++) {
        const float *row = qkv + i * heads * D, *ri = rot + i * D;
        for (long h = 0; h < H + KV; h++) {
            const float *x = row + h * D;
            float *o = h < H ? q_out + (i * H + h) * D : kn + (i * KV + h - H) * D;
            for (long d = 0; d < D; d += 2) {
                const float c = ri[d], s = ri[d + 1];
                o[d] = x[d] * c - x[d + 1] * s;
                o[d + 1] = x[d] * s + x[d + 1] * c;
            }
        }
        memcpy(vn + i * KV * D, row + (H + KV) * D, sizeof(float) * KV * D);
    }
}
