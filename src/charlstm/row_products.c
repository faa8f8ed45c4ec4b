/* Matrix products whose every row comes out the same whatever other rows are computed with it.
 *
 * Sampling many sequences at once multiplies a batch of rows by a layer's weights each step.
 * BLAS picks its kernel and its order of summation by the shape of the whole product, so a
 * row's result can change in its last bits with the number of rows beside it, and a sample
 * would then depend on its company. Here every output element is one chain of fused
 * multiply-adds over k in order, starting from zero, whatever the number of rows, the group a
 * row falls in, or the vector width: the AVX-512 and AVX2 paths give the same bits. Rows are
 * computed in groups that share each load of the weights, which is what makes many rows
 * cheaper than as many matrix-vector products.
 *
 * Layouts: x rows of K fp32 at a stride of x_stride floats; the weights [K, N] packed as
 * [N / 64][K][64] fp32 (N padded with zero columns to a multiple of 64), so that a group of
 * rows streams one 64-column panel from start to end; out rows of N fp32 at out_stride.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define PANEL 64 /* columns per panel of packed weights */

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define HAVE_X86_BUILD 0
#endif

#if HAVE_X86_BUILD

#define TARGET_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#define TARGET_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

/* R rows (a constant per instantiation) of one panel: R x 4 accumulators of 16 lanes. */
static TARGET_AVX512 void panel_avx512(const float *x, size_t x_stride, int K, const float *w,
                                       float *out, size_t out_stride, const int R) {
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const float *row = w + (size_t)k * PANEL;
        const __m512 w0 = _mm512_loadu_ps(row), w1 = _mm512_loadu_ps(row + 16),
                     w2 = _mm512_loadu_ps(row + 32), w3 = _mm512_loadu_ps(row + 48);
        for (int r = 0; r < R; r++) {
            const __m512 a = _mm512_set1_ps(x[r * x_stride + k]);
            acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(a, w2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(a, w3, acc[r][3]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(out + r * out_stride + 16 * v, acc[r][v]);
}

/* The same for AVX2: 2 rows x 4 vectors of 8 lanes per half panel keep within 16 registers. */
static TARGET_AVX2 void half_panel_avx2(const float *x, size_t x_stride, int K, const float *w,
                                        float *out, size_t out_stride, const int R) {
    __m256 acc[2][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const float *row = w + (size_t)k * PANEL;
        const __m256 w0 = _mm256_loadu_ps(row), w1 = _mm256_loadu_ps(row + 8),
                     w2 = _mm256_loadu_ps(row + 16), w3 = _mm256_loadu_ps(row + 24);
        for (int r = 0; r < R; r++) {
            const __m256 a = _mm256_set1_ps(x[r * x_stride + k]);
            acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(a, w2, acc[r][2]);
            acc[r][3] = _mm256_fmadd_ps(a, w3, acc[r][3]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(out + r * out_stride + 8 * v, acc[r][v]);
}

__attribute__((target("avx512f"))) static void products_avx512(
    const float *x, size_t x_stride, int rows, int K, const float *w, int N, float *out,
    size_t out_stride) {
    for (int p = 0; p < N / PANEL; p++) {
        const float *panel = w + (size_t)p * K * PANEL;
        float *o = out + (size_t)p * PANEL;
        int r = 0;
        for (; r + 4 <= rows; r += 4)
            panel_avx512(x + r * x_stride, x_stride, K, panel, o + r * out_stride, out_stride, 4);
        for (; r < rows; r++)
            panel_avx512(x + r * x_stride, x_stride, K, panel, o + r * out_stride, out_stride, 1);
    }
}

__attribute__((target("avx2,fma"))) static void products_avx2(const float *x, size_t x_stride,
                                                              int rows, int K, const float *w,
                                                              int N, float *out,
                                                              size_t out_stride) {
    for (int p = 0; p < N / PANEL; p++)
        for (int half = 0; half < 2; half++) {
            const float *panel = w + (size_t)p * K * PANEL + 32 * half;
            float *o = out + (size_t)p * PANEL + 32 * half;
            int r = 0;
            for (; r + 2 <= rows; r += 2)
                half_panel_avx2(x + r * x_stride, x_stride, K, panel, o + r * out_stride,
                                out_stride, 2);
            for (; r < rows; r++)
                half_panel_avx2(x + r * x_stride, x_stride, K, panel, o + r * out_stride,
                                out_stride, 1);
        }
}

/* One call's product over panels [begin, end). */
typedef struct {
    const float *x, *w;
    float *out;
    size_t x_stride, out_stride;
    int rows, K, N, path, begin, end;
} job;

static void run(const job *j) {
    const size_t skip = (size_t)j->begin * PANEL;
    const float *w = j->w + skip * j->K;
    const int N = (j->end - j->begin) * PANEL;
    if (j->path == 2)
        products_avx512(j->x, j->x_stride, j->rows, j->K, w, N, j->out + skip, j->out_stride);
    else
        products_avx2(j->x, j->x_stride, j->rows, j->K, w, N, j->out + skip, j->out_stride);
}

/* A second thread takes the upper half of the panels: a product of one row is too small for
 * the cost of waking a sleeping thread, so the helper spins a while after each job (the
 * sampling loop calls again within microseconds) and only then sleeps. Which thread computes
 * an element does not change its bits. */
#define SPIN_NS 50000
static job posted_job;
static atomic_uint posted, finished;
static atomic_int sleeping;
static int helper_started;
static pthread_mutex_t calls = PTHREAD_MUTEX_INITIALIZER; /* one product at a time */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ll + t.tv_nsec;
}

static void *helper(void *first_seen) {
    unsigned seen = (unsigned)(uintptr_t)first_seen;
    for (;;) {
        const long long until = now_ns() + SPIN_NS;
        for (int spins = 0; atomic_load(&posted) == seen; spins++) {
            _mm_pause();
            if ((spins & 255) || now_ns() < until) continue;
            pthread_mutex_lock(&lock);
            atomic_store(&sleeping, 1);
            while (atomic_load(&posted) == seen) pthread_cond_wait(&wake, &lock);
            atomic_store(&sleeping, 0);
            pthread_mutex_unlock(&lock);
        }
        seen = atomic_load(&posted);
        run(&posted_job);
        atomic_store(&finished, seen);
    }
    return NULL;
}

/* Fork between products only; the child has no helper thread and starts its own. */
static void before_fork(void) { pthread_mutex_lock(&calls); }
static void after_fork_in_parent(void) { pthread_mutex_unlock(&calls); }
static void after_fork_in_child(void) {
    helper_started = 0;
    atomic_store(&sleeping, 0);
    pthread_mutex_unlock(&calls);
}

static int start_helper(void) {
    if (helper_started) return 1;
    pthread_t thread;
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    const uintptr_t seen = atomic_load(&posted); /* before this call posts its job */
    helper_started = pthread_create(&thread, &attributes, helper, (void *)seen) == 0;
    pthread_attr_destroy(&attributes);
    return helper_started;
}

/* The whole product, split with the helper where asked and there are panels to split. */
static void run_split(job whole, int split) {
    const int panels = whole.end;
    if (!split || panels < 2 || !start_helper()) {
        run(&whole);
        return;
    }
    job upper = whole, lower = whole;
    lower.end = upper.begin = panels / 2;
    posted_job = upper;
    const unsigned number = atomic_fetch_add(&posted, 1) + 1;
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&lock);
        pthread_cond_signal(&wake);
        pthread_mutex_unlock(&lock);
    }
    run(&lower);
    while (atomic_load(&finished) != number) _mm_pause();
}

#endif /* HAVE_X86_BUILD */

/* The vector paths this CPU and OS run, as bits: 2 for AVX-512, 1 for AVX2 with FMA. */
static int usable_paths(void) {
#if HAVE_X86_BUILD
    static int found = -1;
    if (found < 0) {
        __builtin_cpu_init();
        found = (__builtin_cpu_supports("avx512f") ? 2 : 0) |
                (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0);
    }
    return found;
#else
    return 0;
#endif
}

static PyObject *py_paths(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    const int found = usable_paths();
    if (found == 3) return Py_BuildValue("(ss)", "avx512", "avx2");
    if (found) return Py_BuildValue("(s)", found == 2 ? "avx512" : "avx2");
    return PyTuple_New(0);
}

/* products(x, x_stride, x_bytes, rows, K, w, w_bytes, N, out, out_stride, out_bytes, split,
 * path): addresses and sizes of buffers the caller keeps alive (every access is checked against
 * the sizes), whether to share the work with a second thread, and the path ("avx512" or "avx2";
 * both give the same bits). */
static PyObject *py_products(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, out, x_bytes, w_bytes, out_bytes;
    Py_ssize_t x_stride, out_stride;
    int rows, K, N, split;
    const char *name;
    if (!PyArg_ParseTuple(args, "KnKiiKKiKnKps", &x, &x_stride, &x_bytes, &rows, &K, &w,
                          &w_bytes, &N, &out, &out_stride, &out_bytes, &split, &name))
        return NULL;
    const int path = !strcmp(name, "avx512") ? 2 : !strcmp(name, "avx2") ? 1 : 0;
    if (!(usable_paths() & path)) {
        PyErr_Format(PyExc_RuntimeError, "this CPU cannot run the row products on '%s'", name);
        return NULL;
    }
    if (rows < 0 || K <= 0 || N <= 0 || N % PANEL || x_stride < K || out_stride < N) {
        PyErr_SetString(PyExc_ValueError, "row products: bad shape");
        return NULL;
    }
    if (rows == 0) Py_RETURN_NONE;
    const unsigned long long last = (unsigned long long)(rows - 1);
    if (x_bytes < 4 * (last * x_stride + K) || w_bytes < 4ull * K * N ||
        out_bytes < 4 * (last * out_stride + N)) {
        PyErr_SetString(PyExc_ValueError, "row products: a buffer is smaller than its shape");
        return NULL;
    }
#if HAVE_X86_BUILD
    const job whole = {(const float *)(uintptr_t)x, (const float *)(uintptr_t)w,
                       (float *)(uintptr_t)out, x_stride, out_stride, rows, K, N, path, 0,
                       N / PANEL};
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&calls);
    run_split(whole, split);
    pthread_mutex_unlock(&calls);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"paths", py_paths, METH_NOARGS, "The vector paths this CPU runs, fastest first."},
    {"products", py_products, METH_VARARGS, "Row-independent products with packed weights."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_row_products",
    .m_doc = "Matrix products whose rows do not depend on one another's presence.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__row_products(void) {
#if HAVE_X86_BUILD
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "PANEL", PANEL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
