/* A linear layer over a few rows (a decode step's tokens) against weights in float32, FP16 or BF16.
 *
 * y[m, n] = bias[n] + sum_k x[m, k] * w[n, k], x and y float32, M <= RBLN_LINEAR_MAX_ROWS.
 * A decode step multiplies one to eight rows by every weight of the model, so it is bound by reading
 * the weights: MKL's sgemm reads float32 weights at about the memory rate for one row and at half of
 * it for four. The device holds its weights in 16 bits; read as such (FP16 converted by AVX-512,
 * BF16 shifted into the top half of a float32), a step reads half the bytes. Measured on this 2-core
 * Xeon, SmolLM2's 30 layers (210 products): 1 row 16.8 ms with MKL, 9.6 ms here; 4 rows 28.3 vs
 * 12.6 ms.
 *
 * Every output's sum is formed in one fixed order, whatever M, the weight's storage, the thread count
 * or how many weight rows a pass handles: two accumulators of 16 lanes over alternate 16-wide chunks
 * of K, added, then reduced across lanes. So a sequence gets the same values in every decode batch,
 * on a busy or an idle machine, and a 16-bit weight gives the float32 weight's result bit for bit
 * (16-bit values are exact in float32): the executor reading packed weights equals the interpreter.
 * Threads split N; one thread computes each output.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define RBLN_LINEAR_MAX_ROWS 8

enum { WEIGHT_F32 = 0, WEIGHT_F16 = 1, WEIGHT_BF16 = 2 };

#if defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* 16 weights from k on (`mask` of them) as float32. */
AVX512 static inline __m512 load_weights(const void* w, int64_t k, __mmask16 mask, int kind) {
  if (kind == WEIGHT_F32) return _mm512_maskz_loadu_ps(mask, (const float*)w + k);
  __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t*)w + k);
  if (kind == WEIGHT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

/* Weight rows n .. n + NB - 1 against all M input rows. */
AVX512 static inline __attribute__((always_inline)) void block(
    const float* x, const char* w, const float* bias, float* y, const int M, const int NB,
    int64_t N, int64_t K, int64_t n, int kind, int64_t row_bytes) {
  __m512 even[RBLN_LINEAR_MAX_ROWS][4], odd[RBLN_LINEAR_MAX_ROWS][4];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) even[m][j] = odd[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int j = 0; j < NB; ++j) {
      const char* row = w + (n + j) * row_bytes;
      const char* ahead = row + NB * row_bytes + k * (row_bytes / K);  /* the next pass's row */
      _mm_prefetch(ahead, _MM_HINT_T0);
      if (row_bytes / K == 4) _mm_prefetch(ahead + 64, _MM_HINT_T0);
      __m512 w0 = load_weights(row, k, 0xFFFF, kind), w1 = load_weights(row, k + 16, 0xFFFF, kind);
      for (int m = 0; m < M; ++m) {
        even[m][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w0, even[m][j]);
        odd[m][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16), w1, odd[m][j]);
      }
    }
  }
  for (; k < K; k += 16) {  /* at most two chunks left: an even one, then an odd one */
    __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    int is_odd = (int)((k / 16) & 1);
    for (int j = 0; j < NB; ++j) {
      __m512 wv = load_weights(w + (n + j) * row_bytes, k, mask, kind);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        if (is_odd) odd[m][j] = _mm512_fmadd_ps(xv, wv, odd[m][j]);
        else even[m][j] = _mm512_fmadd_ps(xv, wv, even[m][j]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    float b = bias ? bias[n + j] : 0.0f;
    for (int m = 0; m < M; ++m) y[m * N + n + j] = _mm512_reduce_add_ps(_mm512_add_ps(even[m][j], odd[m][j])) + b;
  }
}

/* Outputs n0 .. n1 - 1 for a fixed M, NB weight rows a pass: as many accumulators as registers hold. */
#define ROWS(M, NB)                                                                                  \
  AVX512 static void rows_##M(const float* x, const char* w, const float* bias, float* y, int64_t N,  \
                              int64_t K, int64_t n0, int64_t n1, int kind, int64_t row_bytes) {      \
    int64_t n = n0;                                                                                  \
    for (; n + NB <= n1; n += NB) block(x, w, bias, y, M, NB, N, K, n, kind, row_bytes);             \
    for (; n < n1; ++n) block(x, w, bias, y, M, 1, N, K, n, kind, row_bytes);                        \
  }
ROWS(1, 4) ROWS(2, 4) ROWS(3, 2) ROWS(4, 2) ROWS(5, 1) ROWS(6, 1) ROWS(7, 1) ROWS(8, 1)

typedef void (*rows_fn)(const float*, const char*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, int, int64_t);
static const rows_fn ROWS_OF[RBLN_LINEAR_MAX_ROWS + 1] = {0,      rows_1, rows_2, rows_3, rows_4,
                                                          rows_5, rows_6, rows_7, rows_8};
#endif

/* 1 when this CPU runs rbln_linear_rows (AVX-512 F, BW and VL), else 0: the caller uses torch. */
int rbln_has_linear_rows(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return 0;
#endif
}

int rbln_linear_max_rows(void) { return RBLN_LINEAR_MAX_ROWS; }

/* y [M, N] = x [M, K] w[N, K]^T + bias (bias may be NULL); w of `kind` (0 float32, 1 FP16, 2 BF16),
 * all contiguous. Returns 0, computing nothing, when M is out of range or the CPU lacks AVX-512. */
int rbln_linear_rows(const float* x, const void* w, int kind, const float* bias, float* y, int64_t M,
                     int64_t N, int64_t K) {
#if defined(__x86_64__)
  if (M < 1 || M > RBLN_LINEAR_MAX_ROWS || K < 1 || kind < 0 || kind > 2 || !rbln_has_linear_rows())
    return 0;
  rows_fn f = ROWS_OF[M];
  int64_t row_bytes = K * (kind == WEIGHT_F32 ? 4 : 2);
#ifdef _OPENMP
  if (N * K >= 65536 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
    {
      int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      int64_t step = ((N + threads - 1) / threads + 3) & ~(int64_t)3;
      int64_t lo = t * step, hi = lo + step < N ? lo + step : N;
      if (lo < hi) f(x, (const char*)w, bias, y, N, K, lo, hi, kind, row_bytes);
    }
    return 1;
  }
#endif
  f(x, (const char*)w, bias, y, N, K, 0, N, kind, row_bytes);
  return 1;
#else
  (void)x; (void)w; (void)kind; (void)bias; (void)y; (void)M; (void)N; (void)K;
  return 0;
#endif
}
