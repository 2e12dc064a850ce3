/*
 * cblas_sgemm for thin products: decode steps multiply a few activation rows by a weight matrix.
 *
 * MLX's CPU backend does every fp32 matmul through cblas_sgemm, and OpenBLAS's sgemm packs the
 * whole weight matrix even when the other operand has one or a few rows. Measured on the 2-core
 * CI machine for the 262144x640 Gemma lm_head (x @ W^T): sgemm takes 95-135 ms for 1 to 8 rows;
 * sgemv takes 37 ms for one row; the threaded kernel below reads W once for up to 8 rows
 * (45-75 ms). node.model.blas compiles this file once, loads it globally before OpenBLAS (so libmlx
 * binds this cblas_sgemm) and hands it OpenBLAS's sgemm and sgemv through node_blas_bind().
 *
 *   3-8 rows times W^T (W >= 64K floats), or 2 rows times a W past the L3 cache
 *                                            -> few_rows_nt (W read once, one span per CPU)
 *   otherwise 1-2 rows or 1-2 columns        -> cblas_sgemv per row or column
 *   anything else                            -> OpenBLAS sgemm
 */

#include <pthread.h>
#include <unistd.h>

enum { ROW_MAJOR = 101, COL_MAJOR = 102, NO_TRANS = 111, TRANS = 112 };
enum { MAX_GEMV_ROWS = 2, MAX_FEW_ROWS = 8, MAX_THREADS = 8 };
#define MIN_FEW_ROWS_WEIGHTS (1L << 16)
#define MIN_FEW_ROWS_WEIGHTS_FOR_TWO (1L << 23) /* two sgemv calls win until W spills the L3 cache */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define VECTOR_CLONES
#endif

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static long thin_calls;
static int enabled = 1;

void node_blas_bind(sgemm_fn sgemm, sgemv_fn sgemv) {
    real_sgemm = sgemm;
    real_sgemv = sgemv;
}

long node_blas_thin_calls(void) { return thin_calls; }

/* Switch the thin paths off and on at run time (benchmarks compare both in one process). */
void node_blas_set_thin(int on) { enabled = on; }

/* The most threads the few-row kernel uses (0: one per online CPU). Nodes that share a machine
 * divide its cores; more threads than cores each call would only oversubscribe them. */
static int thread_limit;
void node_blas_set_threads(int threads) { thread_limit = threads; }

/* out[m] = dot(row m of A, b) for m < M, four rows per pass over b (a short last block repeats
 * its last row rather than running narrower loops, which measured slower). */
VECTOR_CLONES
static void dot_rows(int M, int K, const float *A, long lda, const float *b, float *out) {
    for (int m = 0; m < M; m += 4) {
        const float *a[4];
        for (int i = 0; i < 4; i++) a[i] = A + (m + i < M ? m + i : M - 1) * lda;
        const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int k = 0; k < K; k++) {
            float x = b[k];
            s0 += a0[k] * x;
            s1 += a1[k] * x;
            s2 += a2[k] * x;
            s3 += a3[k] * x;
        }
        float s[4] = {s0, s1, s2, s3};
        for (int i = 0; i < 4 && m + i < M; i++) out[m + i] = s[i];
    }
}

typedef struct {
    int M, n0, n1, K;
    float alpha, beta;
    const float *A, *B;
    float *C;
    long lda, ldb, ldc;
} span_t;

static void *run_span(void *arg) {
    const span_t *s = arg;
    float acc[MAX_FEW_ROWS];
    for (int n = s->n0; n < s->n1; n++) {
        dot_rows(s->M, s->K, s->A, s->lda, s->B + n * s->ldb, acc);
        for (int m = 0; m < s->M; m++) {
            float *c = s->C + m * s->ldc + n;
            *c = s->beta == 0.0f ? s->alpha * acc[m] : s->alpha * acc[m] + s->beta * *c;
        }
    }
    return 0;
}

/* Row-major C[MxN] = alpha * A[MxK] * B[NxK]^T + beta * C, columns split across CPUs. */
static void few_rows_nt(int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                        int ldb, float beta, float *C, int ldc) {
    long cpus = thread_limit > 0 ? thread_limit : sysconf(_SC_NPROCESSORS_ONLN);
    int threads = cpus < 1 ? 1 : cpus > MAX_THREADS ? MAX_THREADS : (int)cpus;
    span_t spans[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        int n0 = (int)((long)N * t / threads), n1 = (int)((long)N * (t + 1) / threads);
        spans[t] = (span_t){M, n0, n1, K, alpha, beta, A, B, C, lda, ldb, ldc};
        if (t > 0) started[t] = pthread_create(&ids[t], 0, run_span, &spans[t]) == 0;
    }
    for (int t = 0; t < threads; t++)
        if (!started[t]) run_span(&spans[t]); /* span 0, and any thread that did not start */
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], 0);
}

/* Row-major C[MxN] = alpha * op(A)[MxK] * op(B)[KxN] + beta * C with M or N <= MAX_GEMV_ROWS. */
static void as_gemv(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= MAX_GEMV_ROWS) {
        /* Row m of C is op(B)^T times row m of op(A). */
        for (int m = 0; m < M; m++) {
            const float *a = ta == NO_TRANS ? A + (long)m * lda : A + m;
            int inc_a = ta == NO_TRANS ? 1 : lda;
            if (tb == NO_TRANS)
                real_sgemv(ROW_MAJOR, TRANS, K, N, alpha, B, ldb, a, inc_a, beta, C + (long)m * ldc, 1);
            else
                real_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, a, inc_a, beta, C + (long)m * ldc, 1);
        }
    } else {
        /* Column n of C is op(A) times column n of op(B). */
        for (int n = 0; n < N; n++) {
            const float *b = tb == NO_TRANS ? B + n : B + (long)n * ldb;
            int inc_b = tb == NO_TRANS ? ldb : 1;
            if (ta == NO_TRANS)
                real_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, b, inc_b, beta, C + n, ldc);
            else
                real_sgemv(ROW_MAJOR, TRANS, K, M, alpha, A, lda, b, inc_b, beta, C + n, ldc);
        }
    }
}

/* Row-major dispatch; returns 0 where OpenBLAS's sgemm should do the work. */
static int thin_row_major(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                          const float *B, int ldb, float beta, float *C, int ldc) {
    long weights = (long)N * K;
    int few = M > MAX_GEMV_ROWS ? weights >= MIN_FEW_ROWS_WEIGHTS : M == 2 && weights >= MIN_FEW_ROWS_WEIGHTS_FOR_TWO;
    if (few && M <= MAX_FEW_ROWS && ta == NO_TRANS && tb == TRANS) {
        few_rows_nt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return 1;
    }
    if (M <= MAX_GEMV_ROWS || N <= MAX_GEMV_ROWS) {
        as_gemv(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return 1;
    }
    return 0;
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    int thin = enabled && real_sgemv != 0 && M > 0 && N > 0 && K > 0;
    if (thin && order == ROW_MAJOR)
        thin = thin_row_major(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else if (thin) /* column-major C = A B is row-major C^T = B^T A^T */
        thin = thin_row_major(tb, ta, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
    if (thin)
        thin_calls++;
    else
        real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
