/* The merge kernel: W' = W + s * (B @ A) for a block of rows of a weight, in one pass.
 *
 * Bit-exact with PEFT's merge on CPU (torch: delta = (B @ A) * s in fp32, then `W += delta`):
 * - each element of B @ A is an in-order chain of fused multiply-adds over the rank, starting
 *   from zero, which is what torch's CPU sgemm (MKL) computes for ranks up to 128 and matrices
 *   of at least 16 x 16 (kernel.py keeps to those; the tests check it against torch);
 * - the product is multiplied by s (rounded to fp32), added to W in fp32 (no contraction into an
 *   FMA: build with -ffp-contract=off), and rounded once to W's dtype, to nearest even;
 * - with round_delta (PEFT's Embedding merge), the scaled product is first rounded to W's
 *   dtype, then added in fp32 and rounded again.
 * B and A are read through strides, so that an embedding's transposed delta (W[v, d] takes
 * lora_embedding_A[:, v] and lora_embedding_B[d, :]) needs no transposed copy; A is packed
 * once per tensor into the layout the inner loop reads.
 * A block whose fp32 sum is not finite is reported, so that the caller recomputes that tensor
 * with torch (whose NaN encodings this kernel does not reproduce).
 *
 * It also quantizes weights to 4 bits and back as bitsandbytes does (block_absmax, simulate_4bit), for merges
 * of QLoRA adapters "as trained", and dequantizes float8 rows (dequant_rows: code value * scale in fp32, rounded
 * once to the output dtype), for merges into FP8 bases.
 *
 * The arithmetic needs AVX2, FMA and F16C (x86-64 since 2013); available() says whether this CPU
 * has them. Everywhere else the module still builds and the caller uses torch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2, DT_F64 = 3 };

static size_t elem_size(int dt) { return dt == DT_F32 ? 4 : dt == DT_F64 ? 8 : 2; }

/* Non-finite values in a buffer of floats (for refusing broken adapters); portable C. */
static size_t count_nonfinite(const void *src, int dt, size_t n) {
    size_t bad = 0;
    if (dt == DT_BF16 || dt == DT_F16) {
        const uint16_t *p = src;
        uint16_t e = dt == DT_BF16 ? 0x7F80 : 0x7C00;
        for (size_t i = 0; i < n; i++) bad += (p[i] & e) == e;
    } else if (dt == DT_F32) {
        const uint32_t *p = src;
        for (size_t i = 0; i < n; i++) bad += (p[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint64_t *p = src;
        for (size_t i = 0; i < n; i++) bad += (p[i] & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
    }
    return bad;
}

/* The operands of one call: rows x n of W (dtype dt) and out; b[i][k] at b + i * b_row + k * b_col;
 * a (r x n) packed by pack_panels; out = W + s * (b @ a). */
typedef struct {
    const void *w;
    void *out;
    int dt, round_delta;
    const float *b, *panels;
    size_t b_row, b_col, rows, r, n;
    float s;
} Operands;

static size_t panels_size(size_t r, size_t n) { return (n + 31) / 32 * r * 32 * sizeof(float); }

/* a (r x n, element [k][j] at a + k * a_row + j * a_col) as panels of 32 columns, P[p][k][0..32),
 * zero padded: the kernel's inner loop then reads contiguous memory instead of r streams a row
 * apart (which alias in the L1 cache). Packed once per tensor. */
static void pack_panels(const float *a, size_t a_row, size_t a_col, size_t r, size_t n, float *P) {
    for (size_t p = 0; p * 32 < n; p++) {
        size_t j0 = p * 32, m = n - j0 < 32 ? n - j0 : 32;
        for (size_t k = 0; k < r; k++) {
            float *dst = P + (p * r + k) * 32;
            const float *src = a + k * a_row + j0 * a_col;
            for (size_t j = 0; j < m; j++) dst[j] = src[j * a_col];
            memset(dst + m, 0, (32 - m) * 4);
        }
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SIMD __attribute__((target("avx2,fma,f16c")))

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

SIMD static inline __m256 load8(const void *w, int dt, size_t j) {
    if (dt == DT_BF16) {
        __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + j)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    }
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + j)));
    return _mm256_loadu_ps((const float *)w + j);
}


/* A value rounded to dtype dt and back to fp32 (bf16: torch's round_to_nearest_even) */
SIMD static inline __m256 round_to(__m256 v, int dt) {
    if (dt == DT_BF16) {
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
    }
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return v;
}

/* out[j..j+8) = v rounded to dt (to nearest even) */
SIMD static inline void store8(__m256 v, int dt, void *out, size_t j) {
    if (dt == DT_BF16) {
        __m256i r = _mm256_srli_epi32(_mm256_castps_si256(round_to(v, DT_BF16)), 16);
        __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + j), p);
    } else if (dt == DT_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        _mm256_storeu_ps((float *)out + j, v);
    }
}

SIMD static inline float load1(const void *w, int dt, size_t j) {
    if (dt == DT_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[j] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    if (dt == DT_F16) return _cvtsh_ss(((const uint16_t *)w)[j]);
    return ((const float *)w)[j];
}

SIMD static inline float round1(float v, int dt) {
    return _mm256_cvtss_f32(round_to(_mm256_set1_ps(v), dt));
}

/* out[j..j+8) = round(acc * s + w[j..j+8)); returns a lane mask (4 bits per lane) of non-finite sums */
SIMD static inline int finish8(__m256 acc, const Operands *op, const void *w, size_t j, void *out) {
    __m256 delta = _mm256_mul_ps(acc, _mm256_set1_ps(op->s));
    if (op->round_delta) delta = round_to(delta, op->dt);
    __m256 v = _mm256_add_ps(delta, load8(w, op->dt, j));
    __m256i u = _mm256_castps_si256(v);
    const __m256i expo = _mm256_set1_epi32(0x7F800000);
    int bad = _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_and_si256(u, expo), expo));
    store8(v, op->dt, out, j);
    return bad;
}

/* Columns [j, j+32) of one row (fewer at the end of the row, through zero-padded staging);
 * returns 1 when one of their sums is not finite. */
SIMD static inline int finish32(__m256 c0, __m256 c1, __m256 c2, __m256 c3, const Operands *op, const char *wi,
                                size_t j, char *oi) {
    const size_t es = elem_size(op->dt), n = op->n;
    if (j + 32 <= n)
        return (finish8(c0, op, wi, j, oi) | finish8(c1, op, wi, j + 8, oi) | finish8(c2, op, wi, j + 16, oi) |
                finish8(c3, op, wi, j + 24, oi)) != 0;
    const size_t m = n - j;
    float w_tail[32] = {0}, o_tail[32];
    memcpy(w_tail, wi + j * es, m * es);
    int masks[4] = {finish8(c0, op, w_tail, 0, o_tail), finish8(c1, op, w_tail, 8, o_tail),
                    finish8(c2, op, w_tail, 16, o_tail), finish8(c3, op, w_tail, 24, o_tail)};
    int bad = 0;
    for (size_t q = 0; q * 8 < m; q++) {
        size_t lanes = m - q * 8 < 8 ? m - q * 8 : 8;
        uint32_t real = lanes == 8 ? 0xFFFFFFFFu : (1u << (4 * lanes)) - 1u;
        bad |= ((uint32_t)masks[q] & real) != 0;
    }
    memcpy(oi + j * es, o_tail, m * es);
    return bad;
}

/* Returns the number of 32-column groups holding a non-finite sum. */
SIMD static size_t merge_rows(const Operands *op) {
    const size_t es = elem_size(op->dt), n = op->n, r = op->r, panels = (n + 31) / 32;
    const float *P = op->panels;
    size_t bad = 0;
    for (size_t i = 0; i < op->rows; i++) {
        const float *b = op->b + i * op->b_row;
        const char *wi = (const char *)op->w + i * n * es;
        char *oi = (char *)op->out + i * n * es;
        for (size_t p = 0; p < panels; p++) {
            const float *a = P + p * r * 32;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (size_t k = 0; k < r; k++, a += 32) { /* k in order: the same rounding as sgemm */
                const __m256 x = _mm256_set1_ps(b[k * op->b_col]);
                c0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(a), c0);
                c1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(a + 8), c1);
                c2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(a + 16), c2);
                c3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(a + 24), c3);
            }
            bad += finish32(c0, c1, c2, c3, op, wi, p * 32, oi);
        }
    }
    return bad;
}

/* bf16 / fp16 / fp32 -> fp32 (exact) */
SIMD static void widen(const void *src, int dt, size_t n, float *dst) {
    size_t i = 0;
    if (dt == DT_F32) {
        memcpy(dst, src, n * 4);
        return;
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src, dt, i));
    for (; i < n; i++) {
        uint16_t h = ((const uint16_t *)src)[i];
        if (dt == DT_BF16) {
            uint32_t u = (uint32_t)h << 16;
            memcpy(dst + i, &u, 4);
        } else {
            dst[i] = _cvtsh_ss(h);
        }
    }
}

/* out[i][j] = round_dt(lut[q[i][j]] * scale), scale = scales[j] (per_row 0) or scales[i] (per_row 1), the product in
 * fp32: torch's float32(q) * scale, then .to(dtype). Returns the number of non-finite results (then use torch). */
/* e4m3fn codes (8 lanes of int32) as fp32: normal ones by their bits, subnormal ones as mantissa * 2^-9, NaN codes
 * (S.1111.111) as NaN */
SIMD static inline __m256 e4m3_values(__m256i c) {
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
    __m256i e = _mm256_and_si256(_mm256_srli_epi32(c, 3), _mm256_set1_epi32(15)), m = _mm256_and_si256(c, _mm256_set1_epi32(7));
    __m256i normal = _mm256_or_si256(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(120)), 23),
                                     _mm256_slli_epi32(m, 20));
    __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(1.0f / 512.0f));
    __m256i zero_e = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
    __m256i bits = _mm256_blendv_epi8(normal, _mm256_castps_si256(sub), zero_e);
    __m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x7F)), _mm256_set1_epi32(0x7F));
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC00000), nan);
    return _mm256_castsi256_ps(_mm256_or_si256(bits, sign));
}

SIMD static size_t dequant_rows(const uint8_t *q, const float *lut, const float *scales, int per_row, size_t rows,
                                size_t cols, int dt, void *out) {
    size_t bad = 0;
    const int e4m3 = lut[0x38] == 1.0f && lut[0x7E] == 448.0f; /* the table is e4m3fn's: decode without it */
    for (size_t i = 0; i < rows; i++) {
        const uint8_t *row = q + i * cols;
        char *dst = (char *)out + i * cols * elem_size(dt);
        size_t j = 0;
        for (; j + 8 <= cols; j += 8) {
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j)));
            __m256 v = e4m3 ? e4m3_values(idx) : _mm256_i32gather_ps(lut, idx, 4);
            __m256 s = per_row ? _mm256_set1_ps(scales[i]) : _mm256_loadu_ps(scales + j);
            v = _mm256_mul_ps(v, s);
            __m256i u = _mm256_castps_si256(v);
            const __m256i expo = _mm256_set1_epi32(0x7F800000);
            bad += _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_and_si256(u, expo), expo)) != 0;
            store8(v, dt, dst, 0);
            dst += 8 * elem_size(dt);
        }
        for (; j < cols; j++) {
            float v = lut[row[j]] * (per_row ? scales[i] : scales[j]);
            uint32_t u;
            memcpy(&u, &v, 4);
            bad += (u & 0x7F800000u) == 0x7F800000u;
            if (dt == DT_F32) {
                memcpy(dst, &v, 4);
            } else if (dt == DT_F16) {
                uint16_t h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                memcpy(dst, &h, 2);
            } else {
                uint16_t h = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
                memcpy(dst, &h, 2);
            }
            dst += elem_size(dt);
        }
    }
    return bad;
}

/* MXFP4 rows: out[i][g * 32 + 2k (+1)] = e2m1 value of the low (high) nibble of blocks[i][g][k] times
 * 2^(scales[i][g] - 127), in fp32, rounded once to dt (transformers' lookup in the model dtype and ldexp: exact but
 * at the range's ends, where the caller checks against torch). Returns the number of non-finite results. */
SIMD static size_t dequant_mxfp4(const uint8_t *blocks, const uint8_t *scales, size_t rows, size_t groups, int dt,
                                 void *out) {
    static const float e2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    const size_t es = elem_size(dt);
    size_t bad = 0;
    for (size_t i = 0; i < rows; i++) {
        for (size_t g = 0; g < groups; g++) {
            const uint8_t *bytes = blocks + (i * groups + g) * 16;
            uint32_t bits = (uint32_t)scales[i * groups + g] << 23; /* 2^(s - 127) as fp32 (s = 0: 0, s = 255: inf) */
            float scale;
            memcpy(&scale, &bits, 4);
            if (scales[i * groups + g] == 0) scale = 5.877471754111438e-39f; /* 2^-127: subnormal */
            bad += scales[i * groups + g] == 255;
            const __m256 vs = _mm256_set1_ps(scale);
            char *dst = (char *)out + (i * groups + g) * 32 * es;
            for (int half = 0; half < 4; half++) { /* 4 bytes -> 8 values */
                float v[8];
                for (int k = 0; k < 4; k++) {
                    uint8_t b = bytes[half * 4 + k];
                    v[2 * k] = e2m1[b & 0x0F], v[2 * k + 1] = e2m1[b >> 4];
                }
                store8(_mm256_mul_ps(_mm256_loadu_ps(v), vs), dt, dst + half * 8 * es, 0);
            }
        }
    }
    return bad;
}

/* The requantization measure, 8 lanes at a time: squares of start, of dequantized - m and of m - start summed in fp32
 * lanes (a row of a block at most), then added into double lanes (add_squares), then into sums[3] (store_squares). */
typedef struct { __m256 w, e, d; } Squares32;
typedef struct { __m256d w, e, d; } Squares64;

SIMD static inline void square_lanes(Squares32 *f, __m256 deq, __m256 m, __m256 start) {
    __m256 e = _mm256_sub_ps(deq, m), d = _mm256_sub_ps(m, start);
    f->e = _mm256_add_ps(f->e, _mm256_mul_ps(e, e));
    f->d = _mm256_add_ps(f->d, _mm256_mul_ps(d, d));
    f->w = _mm256_add_ps(f->w, _mm256_mul_ps(start, start));
}

SIMD static inline __m256d widen_add(__m256d acc, __m256 f) {
    return _mm256_add_pd(acc, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)),
                                            _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))));
}

SIMD static inline void add_squares(Squares64 *acc, Squares32 f) {
    acc->w = widen_add(acc->w, f.w), acc->e = widen_add(acc->e, f.e), acc->d = widen_add(acc->d, f.d);
}

SIMD static inline void store_squares(Squares64 acc, double *sums) {
    double w[4], e[4], d[4];
    _mm256_storeu_pd(w, acc.w), _mm256_storeu_pd(e, acc.e), _mm256_storeu_pd(d, acc.d);
    for (int k = 0; k < 4; k++) sums[0] += w[k], sums[1] += e[k], sums[2] += d[k];
}

/* MXFP4 quantization of rows (out, in) of a merged expert, groups of 32 inputs (downcast_to_mxfp_torch, scales
 * rounded up): amax / 6 in fp32 rounded up to a power of two (its exponent byte is the scale), each value times
 * 1 / that, to the nearest e2m1 code with its sign, two per byte (low nibble first). With start, the sums |start|^2,
 * |dequantized - m|^2 (dequantized rounded to dt), |m - start|^2. Returns the number of non-finite values in m. */
SIMD static size_t quantize_mxfp4_rows(const void *m, const void *start, size_t rows, size_t cols, int dt,
                                       uint8_t *blocks, uint8_t *scales, double *sums) {
    const size_t groups = cols / 32, es = elem_size(dt);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 table = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    /* code = (m > .25) + (m >= .75) + (m > 1.25) + (m >= 1.75) + (m > 2.5) + (m >= 3.5) + (m > 5): ties to even */
    const float bounds[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    const int strict[7] = {1, 0, 1, 0, 1, 0, 1};
    Squares64 acc = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (size_t i = 0; i < rows; i++) {
        const char *row = (const char *)m + i * cols * es;
        const char *srow = start ? (const char *)start + i * cols * es : NULL;
        Squares32 f = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (size_t g = 0; g < groups; g++) {
            __m256 x[4], vmax = _mm256_setzero_ps();
            for (int h = 0; h < 4; h++) {
                x[h] = load8(row, dt, g * 32 + h * 8);
                __m256i u = _mm256_castps_si256(x[h]);
                const __m256i expo = _mm256_set1_epi32(0x7F800000);
                if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_and_si256(u, expo), expo))) return 1;
                vmax = _mm256_max_ps(vmax, _mm256_and_ps(x[h], absmask));
            }
            float lanes[8], amax = 0.0f;
            _mm256_storeu_ps(lanes, vmax);
            for (int k = 0; k < 8; k++) amax = lanes[k] > amax ? lanes[k] : amax;
            float ds = amax / 6.0f, rounded;
            uint32_t bits;
            memcpy(&bits, &ds, 4);
            bits = (bits + 0x007FFFFFu) & 0x7F800000u;
            memcpy(&rounded, &bits, 4);
            scales[i * groups + g] = (uint8_t)(bits >> 23);
            const __m256 step = _mm256_set1_ps(rounded == 0.0f ? 0.0f : 1.0f / rounded), vr = _mm256_set1_ps(rounded);
            uint8_t *out = blocks + (i * groups + g) * 16;
            for (int h = 0; h < 4; h++) {
                __m256 q = _mm256_mul_ps(x[h], step), mag = _mm256_and_ps(q, absmask);
                __m256i code = _mm256_setzero_si256();
                for (int t = 0; t < 7; t++) {
                    __m256 bound = _mm256_set1_ps(bounds[t]);
                    __m256 hit = strict[t] ? _mm256_cmp_ps(mag, bound, _CMP_GT_OQ) : _mm256_cmp_ps(mag, bound, _CMP_GE_OQ);
                    code = _mm256_sub_epi32(code, _mm256_castps_si256(hit));
                }
                __m256i sign = _mm256_srli_epi32(_mm256_castps_si256(q), 31);
                uint32_t c[8], sg[8];
                _mm256_storeu_si256((__m256i *)c, code);
                _mm256_storeu_si256((__m256i *)sg, sign);
                for (int k = 0; k < 4; k++)
                    out[h * 4 + k] = (uint8_t)((c[2 * k] | (sg[2 * k] << 3)) | ((c[2 * k + 1] | (sg[2 * k + 1] << 3)) << 4));
                if (srow) {
                    __m256 mag_deq = _mm256_permutevar8x32_ps(table, code);
                    __m256 signed_deq = _mm256_or_ps(mag_deq, _mm256_castsi256_ps(_mm256_slli_epi32(sign, 31)));
                    __m256 deq = round_to(_mm256_mul_ps(signed_deq, vr), dt);
                    square_lanes(&f, deq, x[h], load8(srow, dt, g * 32 + h * 8));
                }
            }
        }
        if (srow) add_squares(&acc, f);
    }
    if (start) store_squares(acc, sums);
    return 0;
}

/* float32 -> float8 e4m3fn, round to nearest even, for |y| <= 448 (torch's conversion on clamped values) */
static inline uint32_t to_e4m3(uint32_t u) {
    uint32_t sign = (u >> 24) & 0x80, a = u & 0x7FFFFFFFu;
    if (a >= 0x3C800000u) { /* 2^-6 and up: normal, 3 mantissa bits kept */
        uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
        return sign | (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
    }
    float f;
    memcpy(&f, &a, 4);
    return sign | (uint32_t)nearbyintf(f * 512.0f); /* subnormal steps of 2^-9; 8 is 2^-6, code 8 */
}

/* transformers' Fp8Quantize on a band of `rows` rows (one block row) of a merged weight m (dtype dt), blocks of bc
 * columns: amax per block (fp32); scale = 448 * (1 / amax) (1 for 0; torch's 448 / tensor); inv = fp32(1 / scale); mode 1 (ue8m0): inv =
 * 2^ceil(log2(inv)), mode 2 (a bf16 scale): inv = bf16(inv), and then scale = 1 / inv; codes = e4m3(clamp(v * scale,
 * -448, 448)). inv_out: one fp32 per block. sums (double): |start|^2, |fp32(code) * inv rounded to dt - m|^2,
 * |m - start|^2 (start may be NULL: no sums). Returns the number of non-finite values in m (then use torch). */
SIMD static size_t quantize_fp8_band(const void *m, const void *start, size_t rows, size_t cols, size_t bc, int dt,
                                     int mode, const float *lut, uint8_t *codes, float *inv_out, double *sums) {
    const size_t es = elem_size(dt), blocks = (cols + bc - 1) / bc;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 hi = _mm256_set1_ps(448.0f), lo = _mm256_set1_ps(-448.0f);
    size_t bad = 0;
    double w2 = 0.0, e2 = 0.0, d2 = 0.0;
    Squares64 acc = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (size_t b = 0; b < blocks; b++) {
        const size_t c0 = b * bc, c1 = c0 + bc < cols ? c0 + bc : cols;
        __m256 vmax = _mm256_setzero_ps();
        float amax = 0.0f;
        for (size_t i = 0; i < rows; i++) {
            const char *row = (const char *)m + i * cols * es;
            size_t j = c0;
            for (; j + 8 <= c1; j += 8) {
                __m256 v = load8(row, dt, j);
                __m256i u = _mm256_castps_si256(v);
                const __m256i expo = _mm256_set1_epi32(0x7F800000);
                bad += _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_and_si256(u, expo), expo)) != 0;
                vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
            }
            for (; j < c1; j++) {
                float v = load1(row, dt, j);
                uint32_t u;
                memcpy(&u, &v, 4);
                bad += (u & 0x7F800000u) == 0x7F800000u;
                float a = v < 0 ? -v : v;
                amax = a > amax ? a : amax;
            }
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, vmax);
        for (int k = 0; k < 8; k++) amax = lanes[k] > amax ? lanes[k] : amax;
        if (bad) return bad;
        /* torch computes python_float / tensor as tensor.reciprocal() * python_float: two roundings */
        float scale = amax > 0.0f ? 448.0f * (1.0f / amax) : 1.0f;
        float inv = 1.0f / scale;
        if (mode == 1) { /* ue8m0: pow(2, ceil(log2(max(inv, the smallest normal)))), as transformers computes it */
            inv = exp2f(ceilf(log2f(inv > 1.17549435e-38f ? inv : 1.17549435e-38f)));
            scale = 1.0f / inv;
        } else if (mode == 2) { /* a bf16 scale: the scale taken back from the stored value */
            inv = round1(inv, DT_BF16);
            scale = 1.0f / inv;
        }
        inv_out[b] = inv;
        const __m256 vs = _mm256_set1_ps(scale), vinv = _mm256_set1_ps(inv);
        for (size_t i = 0; i < rows; i++) {
            const char *row = (const char *)m + i * cols * es;
            const char *srow = start ? (const char *)start + i * cols * es : NULL;
            uint8_t *crow = codes + i * cols;
            size_t j = c0;
            Squares32 f = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (; j + 8 <= c1; j += 8) {
                __m256 v = load8(row, dt, j);
                __m256 y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, vs), lo), hi);
                /* to_e4m3, 8 lanes: normal values by integer rounding, subnormal ones by cvtps (nearest even) */
                __m256i u = _mm256_castps_si256(y), a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
                __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
                __m256i r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7FFFF)),
                                             _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1)));
                __m256i normal = _mm256_or_si256(
                    _mm256_slli_epi32(_mm256_sub_epi32(_mm256_srli_epi32(r, 23), _mm256_set1_epi32(120)), 3),
                    _mm256_and_si256(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(7)));
                __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(512.0f)));
                __m256i is_normal = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x3C7FFFFF));
                __m256i code = _mm256_or_si256(sign, _mm256_blendv_epi8(sub, normal, is_normal));
                uint32_t cb[8];
                _mm256_storeu_si256((__m256i *)cb, code);
                for (int k = 0; k < 8; k++) crow[j + k] = (uint8_t)cb[k];
                if (srow) {
                    __m256 q = _mm256_i32gather_ps(lut, code, 4);
                    square_lanes(&f, round_to(_mm256_mul_ps(q, vinv), dt), v, load8(srow, dt, j));
                }
            }
            if (srow) add_squares(&acc, f);
            for (; j < c1; j++) {
                float v = load1(row, dt, j), y = v * scale;
                y = y < -448.0f ? -448.0f : (y > 448.0f ? 448.0f : y);
                uint32_t u;
                memcpy(&u, &y, 4);
                uint32_t c = to_e4m3(u);
                crow[j] = (uint8_t)c;
                if (srow) {
                    float deq = round1(lut[c] * inv, dt), s0 = load1(srow, dt, j);
                    e2 += (double)(deq - v) * (deq - v), d2 += (double)(v - s0) * (v - s0), w2 += (double)s0 * s0;
                }
            }
        }
    }
    store_squares(acc, sums);
    sums[0] += w2, sums[1] += e2, sums[2] += d2;
    return 0;
}

/* bitsandbytes' 4-bit blockwise quantization, pass 1: absmax[b] = max |x| over each block of `bs` elements
 * (n a multiple of bs); returns the number of non-finite elements (then the caller uses torch). */
SIMD static size_t block_absmax(const void *w, int dt, size_t n, size_t bs, float *absmax) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i expo = _mm256_set1_epi32(0x7F800000);
    size_t bad = 0;
    for (size_t b = 0; b * bs < n; b++) {
        __m256 m = _mm256_setzero_ps();
        int nonfinite = 0;
        for (size_t j = b * bs; j < (b + 1) * bs; j += 8) {
            __m256 x = _mm256_and_ps(load8(w, dt, j), sign);
            nonfinite |= _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), expo), expo));
            m = _mm256_max_ps(m, x);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, m);
        float best = lanes[0];
        for (int k = 1; k < 8; k++) best = lanes[k] > best ? lanes[k] : best;
        absmax[b] = best;
        bad += nonfinite != 0;
    }
    return bad;
}

/* Pass 2, for n elements starting at block `first`: the code of x * (1 / max(absmax, 1e-38)) is the number
 * of midpoints below it (torch.bucketize against the sorted code), and the value code[index] * scale[b] (fp32),
 * rounded once to dt: bitsandbytes' quantize_4bit then dequantize_4bit. */
SIMD static void simulate_4bit(const void *w, int dt, size_t n, size_t bs, size_t first, const float *absmax,
                               const float *scale, const float *code, const float *mid, void *out) {
    const __m256 lo = _mm256_loadu_ps(code), hi = _mm256_loadu_ps(code + 8), m7 = _mm256_set1_ps(mid[7]);
    __m256 low[7], high[7];
    for (int k = 0; k < 7; k++) low[k] = _mm256_set1_ps(mid[k]), high[k] = _mm256_set1_ps(mid[8 + k]);
    for (size_t b = 0; b * bs < n; b++) {
        const float a = absmax[first + b] > 1e-38f ? absmax[first + b] : 1e-38f;
        const __m256 inv = _mm256_set1_ps(1.0f / a), s = _mm256_set1_ps(scale[first + b]);
        for (size_t j = b * bs; j < (b + 1) * bs; j += 8) {
            const __m256 v = _mm256_mul_ps(load8(w, dt, j), inv);
            /* the number of midpoints below v: mid[7] < v picks the upper half (8 more), then the 7 midpoints of
             * that half are counted (masks of -1), in two independent chains */
            const __m256 upper = _mm256_cmp_ps(m7, v, _CMP_LT_OQ);
            __m256i c0 = _mm256_and_si256(_mm256_castps_si256(upper), _mm256_set1_epi32(-8)), c1 = _mm256_setzero_si256();
            for (int k = 0; k < 7; k++) {
                const __m256 bound = _mm256_blendv_ps(low[k], high[k], upper);
                const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(bound, v, _CMP_LT_OQ));
                if (k & 1) c1 = _mm256_add_epi32(c1, below); else c0 = _mm256_add_epi32(c0, below);
            }
            const __m256i index = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_add_epi32(c0, c1));
            const __m256 value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, index),
                                                  _mm256_permutevar8x32_ps(hi, index), upper);
            store8(_mm256_mul_ps(value, s), dt, out, j);
        }
    }
}

#define SIMD512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

static int cpu_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

SIMD512 static inline __m512 load16(const void *w, int dt, size_t j) {
    if (dt == DT_BF16) {
        __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + j)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    }
    if (dt == DT_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + j)));
    return _mm512_loadu_ps((const float *)w + j);
}

SIMD512 static inline void store16(__m512 v, int dt, void *out, size_t j) {
    if (dt == DT_BF16) { /* round to nearest even, as round_to */
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + j), _mm512_cvtepi32_epi16(r));
    } else if (dt == DT_F16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + j), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        _mm512_storeu_ps((float *)out + j, v);
    }
}

/* simulate_4bit with 16 lanes: the same operations (fp32 multiply, the count of midpoints below, code * scale,
 * one rounding), so the same bits. */
SIMD512 static void simulate_4bit_512(const void *w, int dt, size_t n, size_t bs, size_t first, const float *absmax,
                                      const float *scale, const float *code, const float *mid, void *out) {
    const __m512 table = _mm512_loadu_ps(code), m7 = _mm512_set1_ps(mid[7]);
    const __m512i one = _mm512_set1_epi32(1), eight = _mm512_set1_epi32(8);
    __m512 low[7], high[7];
    for (int k = 0; k < 7; k++) low[k] = _mm512_set1_ps(mid[k]), high[k] = _mm512_set1_ps(mid[8 + k]);
    for (size_t b = 0; b * bs < n; b++) {
        const float a = absmax[first + b] > 1e-38f ? absmax[first + b] : 1e-38f;
        const __m512 inv = _mm512_set1_ps(1.0f / a), s = _mm512_set1_ps(scale[first + b]);
        for (size_t j = b * bs; j < (b + 1) * bs; j += 16) {
            const __m512 v = _mm512_mul_ps(load16(w, dt, j), inv);
            /* mid[7] < v picks the upper half (8 more), then the 7 midpoints of that half are counted */
            const __mmask16 upper = _mm512_cmp_ps_mask(m7, v, _CMP_LT_OQ);
            __m512i c0 = _mm512_maskz_mov_epi32(upper, eight), c1 = _mm512_setzero_si512();
            for (int k = 0; k < 7; k++) {
                const __mmask16 below = _mm512_cmp_ps_mask(_mm512_mask_blend_ps(upper, low[k], high[k]), v, _CMP_LT_OQ);
                if (k & 1) c1 = _mm512_mask_add_epi32(c1, below, c1, one); else c0 = _mm512_mask_add_epi32(c0, below, c0, one);
            }
            store16(_mm512_mul_ps(_mm512_permutexvar_ps(_mm512_add_epi32(c0, c1), table), s), dt, out, j);
        }
    }
}

/* sums[0] += sum w^2, sums[1] += sum (q - w)^2, sums[2] += sum (m - q)^2 (m may be NULL): how far quantization
 * moved a weight, against how far the merge moved it (for the merge report, a statistic: fp32 sums per call,
 * one call per block of rows, added up in double). */
SIMD static void quant_norms(const void *w, const void *q, const void *m, int dt, size_t n, double *sums) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0;
    for (size_t j = 0; j + 8 <= n; j += 8) {
        const __m256 a = load8(w, dt, j), b = load8(q, dt, j), e = _mm256_sub_ps(b, a);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(e, e, s1);
        if (m) {
            const __m256 d = _mm256_sub_ps(load8(m, dt, j), b);
            s2 = _mm256_fmadd_ps(d, d, s2);
        }
    }
    float lanes[8];
    __m256 acc[3] = {s0, s1, s2};
    for (int i = 0; i < 3; i++) {
        _mm256_storeu_ps(lanes, acc[i]);
        for (int k = 0; k < 8; k++) sums[i] += lanes[k];
    }
}

#else
static int cpu_ok(void) { return 0; }
static void quant_norms(const void *w, const void *q, const void *m, int dt, size_t n, double *sums) {}
static size_t merge_rows(const Operands *op) { return 0; }
static size_t dequant_rows(const uint8_t *q, const float *lut, const float *scales, int per_row, size_t rows,
                           size_t cols, int dt, void *out) { return 0; }
static size_t quantize_fp8_band(const void *m, const void *start, size_t rows, size_t cols, size_t bc, int dt,
                                int mode, const float *lut, uint8_t *codes, float *inv_out, double *sums) { return 0; }
static size_t dequant_mxfp4(const uint8_t *blocks, const uint8_t *scales, size_t rows, size_t groups, int dt,
                            void *out) { return 0; }
static size_t quantize_mxfp4_rows(const void *m, const void *start, size_t rows, size_t cols, int dt,
                                  uint8_t *blocks, uint8_t *scales, double *sums) { return 0; }
static void widen(const void *src, int dt, size_t n, float *dst) {}
static size_t block_absmax(const void *w, int dt, size_t n, size_t bs, float *absmax) { return 0; }
static void simulate_4bit(const void *w, int dt, size_t n, size_t bs, size_t first, const float *absmax,
                          const float *scale, const float *code, const float *mid, void *out) {}
static int cpu_avx512(void) { return 0; }
static void simulate_4bit_512(const void *w, int dt, size_t n, size_t bs, size_t first, const float *absmax,
                              const float *scale, const float *code, const float *mid, void *out) {}
#endif

static PyObject *py_available(PyObject *self, PyObject *args) { return PyBool_FromLong(cpu_ok()); }

static int check_dtype(int dt, int allow_f64) {
    if (dt < DT_BF16 || dt > (allow_f64 ? DT_F64 : DT_F32)) {
        PyErr_SetString(PyExc_ValueError, "unsupported dtype code");
        return 0;
    }
    return 1;
}

static PyObject *py_pack(PyObject *self, PyObject *args) {
    Py_buffer a;
    Py_ssize_t a_row, a_col, r, n;
    if (!PyArg_ParseTuple(args, "y*nnnn", &a, &a_row, &a_col, &r, &n)) return NULL;
    PyObject *result = NULL;
    if (r < 1 || n < 1 || a_row < 0 || a_col < 0 || a.len < ((r - 1) * a_row + (n - 1) * a_col + 1) * 4) {
        PyErr_SetString(PyExc_ValueError, "buffer too small for the given shape and strides");
    } else {
        result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)panels_size((size_t)r, (size_t)n));
        if (result) {
            float *P = (float *)PyByteArray_AS_STRING(result);
            Py_BEGIN_ALLOW_THREADS
            pack_panels(a.buf, (size_t)a_row, (size_t)a_col, (size_t)r, (size_t)n, P);
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&a);
    return result;
}

static PyObject *py_merge_rows(PyObject *self, PyObject *args) {
    Py_buffer w, b, panels, out;
    Operands op;
    Py_ssize_t b_row, b_col, rows, r, n;
    if (!PyArg_ParseTuple(args, "y*iy*nny*nnnfpw*", &w, &op.dt, &b, &b_row, &b_col, &panels, &rows, &r, &n, &op.s,
                          &op.round_delta, &out))
        return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(op.dt, 0)) {
        Py_ssize_t es = (Py_ssize_t)elem_size(op.dt);
        if (rows < 1 || r < 1 || n < 1 || b_row < 0 || b_col < 0 || w.len < rows * n * es || out.len < rows * n * es ||
            b.len < ((rows - 1) * b_row + (r - 1) * b_col + 1) * 4 || panels.len < (Py_ssize_t)panels_size((size_t)r, (size_t)n)) {
            PyErr_SetString(PyExc_ValueError, "buffer too small for the given shape and strides");
        } else {
            op.w = w.buf;
            op.out = out.buf;
            op.b = b.buf;
            op.panels = panels.buf;
            op.b_row = (size_t)b_row, op.b_col = (size_t)b_col;
            op.rows = (size_t)rows, op.r = (size_t)r, op.n = (size_t)n;
            size_t bad;
            Py_BEGIN_ALLOW_THREADS
            bad = merge_rows(&op);
            Py_END_ALLOW_THREADS
            result = PyLong_FromSize_t(bad);
        }
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&b);
    PyBuffer_Release(&panels);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_widen(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int dt;
    if (!PyArg_ParseTuple(args, "y*iw*", &src, &dt, &dst)) return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t n = (size_t)src.len / elem_size(dt);
        if ((size_t)dst.len < n * 4 || (size_t)src.len % elem_size(dt)) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        } else {
            Py_BEGIN_ALLOW_THREADS
            widen(src.buf, dt, n, dst.buf);
            Py_END_ALLOW_THREADS
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *py_dequant_rows(PyObject *self, PyObject *args) {
    Py_buffer q, lut, scales, out;
    int per_row, dt;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "y*y*y*inniw*", &q, &lut, &scales, &per_row, &rows, &cols, &dt, &out)) return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t n = (size_t)rows * (size_t)cols;
        if (rows < 0 || cols < 0 || (size_t)q.len < n || lut.len < 256 * 4 || (size_t)out.len < n * elem_size(dt) ||
            (size_t)scales.len < (per_row ? (size_t)rows : (size_t)cols) * 4) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        } else {
            size_t bad;
            Py_BEGIN_ALLOW_THREADS
            bad = dequant_rows(q.buf, lut.buf, scales.buf, per_row, (size_t)rows, (size_t)cols, dt, out.buf);
            Py_END_ALLOW_THREADS
            result = PyLong_FromSize_t(bad);
        }
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_quantize_fp8_band(PyObject *self, PyObject *args) {
    Py_buffer m, start, lut, codes, inv;
    int have_start, dt, mode;
    Py_ssize_t rows, cols, bc;
    if (!PyArg_ParseTuple(args, "y*y*innniiy*w*w*", &m, &start, &have_start, &rows, &cols, &bc, &dt, &mode, &lut,
                          &codes, &inv)) return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t n = (size_t)rows * (size_t)cols, blocks = bc > 0 ? ((size_t)cols + (size_t)bc - 1) / (size_t)bc : 0;
        if (rows < 0 || cols < 0 || bc <= 0 || (size_t)m.len < n * elem_size(dt) || lut.len < 256 * 4 ||
            (have_start && (size_t)start.len < n * elem_size(dt)) || (size_t)codes.len < n ||
            (size_t)inv.len < blocks * 4) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        } else {
            double sums[3] = {0.0, 0.0, 0.0};
            size_t bad;
            Py_BEGIN_ALLOW_THREADS
            bad = quantize_fp8_band(m.buf, have_start ? start.buf : NULL, (size_t)rows, (size_t)cols, (size_t)bc, dt,
                                    mode, lut.buf, codes.buf, inv.buf, sums);
            Py_END_ALLOW_THREADS
            result = Py_BuildValue("n(ddd)", (Py_ssize_t)bad, sums[0], sums[1], sums[2]);
        }
    }
    PyBuffer_Release(&m);
    PyBuffer_Release(&start);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&inv);
    return result;
}

static PyObject *py_dequant_mxfp4(PyObject *self, PyObject *args) {
    Py_buffer blocks, scales, out;
    Py_ssize_t rows, groups;
    int dt;
    if (!PyArg_ParseTuple(args, "y*y*nniw*", &blocks, &scales, &rows, &groups, &dt, &out)) return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t n = (size_t)rows * (size_t)groups;
        if (rows < 0 || groups < 0 || (size_t)blocks.len < n * 16 || (size_t)scales.len < n ||
            (size_t)out.len < n * 32 * elem_size(dt)) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        } else {
            size_t bad;
            Py_BEGIN_ALLOW_THREADS
            bad = dequant_mxfp4(blocks.buf, scales.buf, (size_t)rows, (size_t)groups, dt, out.buf);
            Py_END_ALLOW_THREADS
            result = PyLong_FromSize_t(bad);
        }
    }
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_quantize_mxfp4_rows(PyObject *self, PyObject *args) {
    Py_buffer m, start, blocks, scales;
    int have_start, dt;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "y*y*inniw*w*", &m, &start, &have_start, &rows, &cols, &dt, &blocks, &scales))
        return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t n = (size_t)rows * (size_t)cols;
        if (rows < 0 || cols < 0 || cols % 32 || (size_t)m.len < n * elem_size(dt) ||
            (have_start && (size_t)start.len < n * elem_size(dt)) || (size_t)blocks.len < n / 2 ||
            (size_t)scales.len < n / 32) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        } else {
            double sums[3] = {0.0, 0.0, 0.0};
            size_t bad;
            Py_BEGIN_ALLOW_THREADS
            bad = quantize_mxfp4_rows(m.buf, have_start ? start.buf : NULL, (size_t)rows, (size_t)cols, dt, blocks.buf,
                                      scales.buf, sums);
            Py_END_ALLOW_THREADS
            result = Py_BuildValue("n(ddd)", (Py_ssize_t)bad, sums[0], sums[1], sums[2]);
        }
    }
    PyBuffer_Release(&m);
    PyBuffer_Release(&start);
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&scales);
    return result;
}

static PyObject *py_count_nonfinite(PyObject *self, PyObject *args) {
    Py_buffer src;
    int dt;
    if (!PyArg_ParseTuple(args, "y*i", &src, &dt)) return NULL;
    PyObject *result = NULL;
    if (check_dtype(dt, 1)) {
        size_t n = (size_t)src.len / elem_size(dt), bad;
        Py_BEGIN_ALLOW_THREADS
        bad = count_nonfinite(src.buf, dt, n);
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(bad);
    }
    PyBuffer_Release(&src);
    return result;
}

static PyObject *py_block_absmax(PyObject *self, PyObject *args) {
    Py_buffer w, absmax;
    int dt;
    Py_ssize_t bs;
    if (!PyArg_ParseTuple(args, "y*inw*", &w, &dt, &bs, &absmax)) return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t es = elem_size(dt), n = (size_t)w.len / es;
        if (bs < 8 || bs % 8 || (size_t)w.len % es || n % (size_t)bs || (size_t)absmax.len < n / (size_t)bs * 4) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not fit the blocksize");
        } else {
            size_t bad;
            Py_BEGIN_ALLOW_THREADS
            bad = block_absmax(w.buf, dt, n, (size_t)bs, absmax.buf);
            Py_END_ALLOW_THREADS
            result = PyLong_FromSize_t(bad);
        }
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&absmax);
    return result;
}

static PyObject *py_simulate_4bit(PyObject *self, PyObject *args) {
    Py_buffer w, absmax, scale, code, mid, out;
    int dt, use_avx512 = 1;
    Py_ssize_t bs, first;
    if (!PyArg_ParseTuple(args, "y*inny*y*y*y*w*|p", &w, &dt, &bs, &first, &absmax, &scale, &code, &mid, &out,
                          &use_avx512))
        return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t es = elem_size(dt), n = (size_t)w.len / es;
        size_t blocks = bs > 0 ? n / (size_t)bs : 0;
        if (bs < 8 || bs % 8 || (size_t)w.len % es || n % (size_t)bs || first < 0 || out.len < w.len ||
            (size_t)absmax.len < ((size_t)first + blocks) * 4 || (size_t)scale.len < ((size_t)first + blocks) * 4 ||
            code.len < 16 * 4 || mid.len < 15 * 4) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not fit the blocksize");
        } else {
            int wide = use_avx512 && cpu_avx512();
            Py_BEGIN_ALLOW_THREADS
            if (wide)
                simulate_4bit_512(w.buf, dt, n, (size_t)bs, (size_t)first, absmax.buf, scale.buf, code.buf, mid.buf, out.buf);
            else
                simulate_4bit(w.buf, dt, n, (size_t)bs, (size_t)first, absmax.buf, scale.buf, code.buf, mid.buf, out.buf);
            Py_END_ALLOW_THREADS
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&absmax);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&code);
    PyBuffer_Release(&mid);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_quant_norms(PyObject *self, PyObject *args) {
    Py_buffer w, q, m;
    int dt, have_m;
    if (!PyArg_ParseTuple(args, "y*y*y*ip", &w, &q, &m, &dt, &have_m)) return NULL;
    PyObject *result = NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU cannot run the merge kernel");
    } else if (check_dtype(dt, 0)) {
        size_t es = elem_size(dt), n = (size_t)w.len / es;
        if (q.len < w.len || (have_m && m.len < w.len) || n % 8) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        } else {
            double sums[3] = {0, 0, 0};
            Py_BEGIN_ALLOW_THREADS
            quant_norms(w.buf, q.buf, have_m ? m.buf : NULL, dt, n, sums);
            Py_END_ALLOW_THREADS
            result = Py_BuildValue("(ddd)", sums[0], sums[1], sums[2]);
        }
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&q);
    PyBuffer_Release(&m);
    return result;
}

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "available() -> bool: this CPU can run merge_rows and widen."},
    {"merge_rows", py_merge_rows, METH_VARARGS,
     "merge_rows(w, dtype, b, b_row, b_col, panels, rows, r, n, scale, round_delta, out)\n"
     "-> groups with a non-finite sum. out = round(w + scale * (b @ a)); w, out: rows x n (dtype 0 bf16, 1 f16,\n"
     "2 f32); b (rows x r): fp32 with strides in elements; panels: a (r x n) as pack() returns it."},
    {"pack", py_pack, METH_VARARGS,
     "pack(a, a_row, a_col, r, n) -> bytearray: a (r x n fp32, strides in elements) in merge_rows' layout."},
    {"widen", py_widen, METH_VARARGS, "widen(src, dtype, dst): bf16/f16/f32 -> fp32, exactly."},
    {"block_absmax", py_block_absmax, METH_VARARGS,
     "block_absmax(w, dtype, blocksize, absmax) -> non-finite elements; absmax (fp32) = max |w| per block."},
    {"simulate_4bit", py_simulate_4bit, METH_VARARGS,
     "simulate_4bit(w, dtype, blocksize, first_block, absmax, scale, code, midpoints, out, use_avx512=True):\n"
     "bitsandbytes' 4-bit quantization of w (blocks from first_block), dequantized with `scale`, rounded to dtype."},
    {"quant_norms", py_quant_norms, METH_VARARGS,
     "quant_norms(w, q, m, dtype, have_m) -> (sum w^2, sum (q - w)^2, sum (m - q)^2) in double."},
    {"dequant_rows", py_dequant_rows, METH_VARARGS,
     "dequant_rows(q, lut, scales, per_row, rows, cols, dtype, out) -> non-finite results. out = round(lut[q] *\n"
     "scale) with one fp32 scale per column (per_row 0) or per row (per_row 1); q: rows x cols bytes."},
    {"quantize_fp8_band", py_quantize_fp8_band, METH_VARARGS,
     "quantize_fp8_band(m, start, have_start, rows, cols, block_cols, dtype, mode, lut, codes, inv)\n"
     "-> (non-finite values, (|start|^2, |dequantized - m|^2, |m - start|^2)). transformers' Fp8Quantize of a block row;\n"
     "mode 0: fp32 scales, 1: ue8m0, 2: bf16."},
    {"dequant_mxfp4", py_dequant_mxfp4, METH_VARARGS,
     "dequant_mxfp4(blocks, scales, rows, groups, dtype, out) -> non-finite results: MXFP4 rows, 32 values a group."},
    {"quantize_mxfp4_rows", py_quantize_mxfp4_rows, METH_VARARGS,
     "quantize_mxfp4_rows(m, start, have_start, rows, cols, dtype, blocks, scales) -> (non-finite, sums)."},
    {"count_nonfinite", py_count_nonfinite, METH_VARARGS,
     "count_nonfinite(src, dtype) -> number of NaN/Inf values (dtype 0 bf16, 1 f16, 2 f32, 3 f64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", "rslora-tools' fused merge kernel.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
