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
 * The arithmetic needs AVX2, FMA and F16C (x86-64 since 2013); available() says whether this CPU
 * has them. Everywhere else the module still builds and the caller uses torch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

/* out[j..j+8) = round(acc * s + w[j..j+8)); returns a lane mask (4 bits per lane) of non-finite sums */
SIMD static inline int finish8(__m256 acc, const Operands *op, const void *w, size_t j, void *out) {
    __m256 delta = _mm256_mul_ps(acc, _mm256_set1_ps(op->s));
    if (op->round_delta) delta = round_to(delta, op->dt);
    __m256 v = _mm256_add_ps(delta, load8(w, op->dt, j));
    __m256i u = _mm256_castps_si256(v);
    const __m256i expo = _mm256_set1_epi32(0x7F800000);
    int bad = _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_and_si256(u, expo), expo));
    if (op->dt == DT_BF16) {
        __m256i r = _mm256_srli_epi32(_mm256_castps_si256(round_to(v, DT_BF16)), 16);
        __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + j), p);
    } else if (op->dt == DT_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        _mm256_storeu_ps((float *)out + j, v);
    }
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
#else
static int cpu_ok(void) { return 0; }
static size_t merge_rows(const Operands *op) { return 0; }
static void widen(const void *src, int dt, size_t n, float *dst) {}
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

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "available() -> bool: this CPU can run merge_rows and widen."},
    {"merge_rows", py_merge_rows, METH_VARARGS,
     "merge_rows(w, dtype, b, b_row, b_col, panels, rows, r, n, scale, round_delta, out)\n"
     "-> groups with a non-finite sum. out = round(w + scale * (b @ a)); w, out: rows x n (dtype 0 bf16, 1 f16,\n"
     "2 f32); b (rows x r): fp32 with strides in elements; panels: a (r x n) as pack() returns it."},
    {"pack", py_pack, METH_VARARGS,
     "pack(a, a_row, a_col, r, n) -> bytearray: a (r x n fp32, strides in elements) in merge_rows' layout."},
    {"widen", py_widen, METH_VARARGS, "widen(src, dtype, dst): bf16/f16/f32 -> fp32, exactly."},
    {"count_nonfinite", py_count_nonfinite, METH_VARARGS,
     "count_nonfinite(src, dtype) -> number of NaN/Inf values (dtype 0 bf16, 1 f16, 2 f32, 3 f64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", "rslora-tools' fused merge kernel.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
