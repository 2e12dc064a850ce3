/*
 * cblas_sgemm that sends one-row and one-column products to cblas_sgemv.
 *
 * MLX's CPU backend does every fp32 matmul through cblas_sgemm. OpenBLAS's sgemm packs the whole
 * weight matrix even when the other operand is a single row, which is what every decode step is:
 * measured on the 2-core CI machine, the 262144x640 Gemma lm_head takes 121 ms through sgemm with
 * M=1 and 37 ms through sgemv. node.blas loads this library (globally, before OpenBLAS, so libmlx
 * binds this cblas_sgemm) and hands it OpenBLAS's sgemm and sgemv through node_blas_bind().
 */

enum { ROW_MAJOR = 101, COL_MAJOR = 102, NO_TRANS = 111, TRANS = 112 };
#define MAX_ROWS_AS_GEMV 2

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static long forwarded_calls;
static int forwarding = 1;

void node_blas_bind(sgemm_fn sgemm, sgemv_fn sgemv) {
    real_sgemm = sgemm;
    real_sgemv = sgemv;
}

long node_blas_forwarded_calls(void) { return forwarded_calls; }

/* Switch forwarding off and on at run time (benchmarks compare both in one process). */
void node_blas_set_forwarding(int on) { forwarding = on; }

/* Row-major C[MxN] = alpha * op(A)[MxK] * op(B)[KxN] + beta * C. */
static void row_major(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= MAX_ROWS_AS_GEMV) {
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

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    int rows = order == ROW_MAJOR ? M : N, cols = order == ROW_MAJOR ? N : M;
    int thin = rows <= MAX_ROWS_AS_GEMV || cols <= MAX_ROWS_AS_GEMV;
    if (!forwarding || real_sgemv == 0 || !thin || M == 0 || N == 0 || K == 0) {
        real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    forwarded_calls++;
    if (order == ROW_MAJOR)
        row_major(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else /* column-major C = A B is row-major C^T = B^T A^T */
        row_major(tb, ta, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}
