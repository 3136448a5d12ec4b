/* Kernel tails in one pass over memory: a bias, GELU, a layer or batch norm, and the 16-bit rounding.
 *
 * A device kernel's last ops and its rounding each walk the whole output through ATen: the bias
 * of a linear is copied into the output before the GEMM reads it back, GELU and the rounding are
 * one pass each, a residual add another before the norm. The output of a GEMM has left the core's
 * near caches by then, so on a transformer block those passes cost as much as the extra work
 * (measured on this 2-core Xeon, an encoder block's 8 roundings took 135 us of its 2.3 ms). Here
 * each tail reads its input once and writes the rounded result, row by row.
 *
 * The same functions compute the unfused ops (GELU alone, a bias alone, a norm alone), so the
 * interpreter, which runs op by op and rounds at the end, gets the fused result bit for bit.
 * Every element goes through the same vector code (masked at a row's end, no scalar tail), each
 * row's reductions run in one fixed order, and one thread computes each row, so results do not
 * depend on the thread count or on how the work is split. Build with -ffp-contract=off: a
 * product and a sum the compiler fuses in one inlining context and not in another would differ.
 *
 * GELU is x * Phi(x) with Phi from erfc (Numerical Recipes' Chebyshev fit, fractional error below
 * 1.2e-7 over the whole line, so the negative tail keeps its relative accuracy) and an exp of our
 * own (Cody-Waite reduction, degree-7 polynomial).
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { KEEP_FP32 = 0, ROUND_FP16 = 1, ROUND_BF16 = 2 };
enum { ACT_NONE = 0, ACT_GELU = 1 };

/* Below this many values one thread works: a parallel region costs about what a second thread
 * saves there (round16.c's threshold). */
#define RBLN_EPILOGUE_PARALLEL_MIN 32768

/* Whether `values` spread over `units` (rows, planes) are worth torch's OpenMP threads, and the
 * units [lo, hi) of this thread inside the region. Every entry point splits its work so. */
static inline int in_parallel(int64_t units, int64_t values) {
#ifdef _OPENMP
  return units > 1 && values >= RBLN_EPILOGUE_PARALLEL_MIN && omp_get_max_threads() > 1 && !omp_in_parallel();
#else
  (void)units; (void)values;
  return 0;
#endif
}

static inline void thread_range(int64_t units, int64_t* lo, int64_t* hi) {
#ifdef _OPENMP
  int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
#else
  int64_t threads = 1, t = 0;
#endif
  int64_t step = (units + threads - 1) / threads;
  *lo = t * step < units ? t * step : units;
  *hi = *lo + step < units ? *lo + step : units;
}

#if defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f")))

int rbln_has_epilogues(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

/* The lanes of a 16-wide step with `left` values to go (all of them from 16 on). */
static inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* v rounded to the nearest value of the 16-bit format (round to nearest even; BF16 NaN becomes
 * the canonical quiet NaN), as round16.c rounds. */
AVX512 static inline __m512 round16(__m512 v, int mode) {
  if (mode == ROUND_FP16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  if (mode == ROUND_BF16) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    bits = _mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(bits), nan, _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
  }
  return v;
}

/* e^a for a >= -87: a = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7
 * (error below 1e-8 there), scaled by 2^n. */
AVX512 static inline __m512 exp_ps(__m512 a) {
  a = _mm512_max_ps(a, _mm512_set1_ps(-87.0f));  /* e^-87 is still a normal float */
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), a);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/* GELU (erf form): x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2. Phi(-|x|) is taken as 0 beyond
 * |x| = 9 sqrt 2 (Phi is 2e-37 there), so that no step makes a subnormal: each of those costs a
 * microcode assist, 20x the whole pass when a GEMM's output has a long negative tail. */
AVX512 static inline __m512 gelu_ps(__m512 x) {
  __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  __mmask16 far = _mm512_cmp_ps_mask(z, _mm512_set1_ps(9.0f), _CMP_GT_OQ);
  z = _mm512_min_ps(z, _mm512_set1_ps(9.0f));
  /* t = 1 / (1 + z / 2): the 14-bit reciprocal and one Newton step (relative error ~2^-28), a
   * third of a division's time */
  __m512 d = _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(d);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
  static const float c[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                            -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 10; ++i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c[i]));
  /* erfc(z) = t exp(p - z^2); half of it is Phi(-|x|) */
  __m512 tail = _mm512_mul_ps(_mm512_mul_ps(t, exp_ps(_mm512_fnmadd_ps(z, z, p))), _mm512_set1_ps(0.5f));
  tail = _mm512_mask_mov_ps(tail, far, _mm512_setzero_ps());
  __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  __m512 phi = _mm512_mask_sub_ps(tail, positive, _mm512_set1_ps(1.0f), tail);
  return _mm512_mul_ps(x, phi);
}

/* dst[i] = round(act(src[i] + bias[i % n])) for i in [lo, hi), bias NULL for none. */
AVX512 static void bias_act_span(const float* src, const float* bias, float* dst, int64_t lo,
                                 int64_t hi, int64_t n, int act, int mode) {
  while (lo < hi) {
    int64_t col = bias ? lo % n : 0, end = bias ? lo - col + n : hi;
    if (end > hi) end = hi;
    for (int64_t i = lo; i < end; i += 16) {
      __mmask16 m = lanes(end - i);
      __m512 v = _mm512_maskz_loadu_ps(m, src + i);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + col + (i - lo)));
      if (act == ACT_GELU) v = gelu_ps(v);
      _mm512_mask_storeu_ps(dst + i, m, round16(v, mode));
    }
    lo = end;
  }
}

/* One row of a layer norm over n values (x, or x + res when res is given). */
AVX512 static void norm_row(const float* x, const float* res, const float* w, const float* b,
                            float* y, float* mean_out, float* rstd_out, int64_t n, float eps, int mode) {
  const float* src = x;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = lanes(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    if (res) {  /* the sum is kept in y for the second pass: the row is in L1 */
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res + i));
      _mm512_mask_storeu_ps(y + i, m, v);
    }
    acc = _mm512_add_ps(acc, v);
  }
  if (res) src = y;
  float mean = _mm512_reduce_add_ps(acc) / (float)n;
  __m512 mu = _mm512_set1_ps(mean);
  acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = lanes(n - i);
    __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, src + i), mu);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  float rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
  __m512 r = _mm512_set1_ps(rstd);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = lanes(n - i);
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, src + i), mu), r);
    if (w) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i));
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + i));
    _mm512_mask_storeu_ps(y + i, m, round16(v, mode));
  }
  if (mean_out) *mean_out = mean;
  if (rstd_out) *rstd_out = rstd;
}

/* dst = round(act(src + bias)) over rows x n float32 values (bias: n values or NULL; dst may be
 * src). Threads take whole rows when there is a bias, runs of 16 values otherwise. */
void rbln_bias_act(const float* src, const float* bias, float* dst, int64_t rows, int64_t n, int act,
                   int mode) {
  int64_t total = rows * n, unit = bias ? n : 16, units = (total + unit - 1) / unit;
  if (in_parallel(units, total)) {
#pragma omp parallel
    {
      int64_t lo, hi;
      thread_range(units, &lo, &hi);
      hi = hi * unit < total ? hi * unit : total;
      if (lo * unit < hi) bias_act_span(src, bias, dst, lo * unit, hi, n, act, mode);
    }
    return;
  }
  bias_act_span(src, bias, dst, 0, total, n, act, mode);
}

AVX512 static void norm_rows(const float* x, const float* res, const float* w, const float* b, float* y,
                             float* mean, float* rstd, int64_t lo, int64_t hi, int64_t n, float eps, int mode) {
  for (int64_t r = lo; r < hi; ++r)
    norm_row(x + r * n, res ? res + r * n : 0, w, b, y + r * n, mean ? mean + r : 0, rstd ? rstd + r : 0,
             n, eps, mode);
}

/* Layer norm of rows x n float32 values over the last n (x + res when res is not NULL; w, b:
 * n values or NULL), rounded; mean and rstd (one per row) may be NULL. */
void rbln_layer_norm(const float* x, const float* res, const float* w, const float* b, float* y,
                     float* mean, float* rstd, int64_t rows, int64_t n, float eps, int mode) {
  if (in_parallel(rows, rows * n)) {
#pragma omp parallel
    {
      int64_t lo, hi;
      thread_range(rows, &lo, &hi);
      norm_rows(x, res, w, b, y, mean, rstd, lo, hi, n, eps, mode);
    }
    return;
  }
  norm_rows(x, res, w, b, y, mean, rstd, 0, rows, n, eps, mode);
}

/* Batch norm at inference over x [N, C, S] (contiguous float32): per channel y = x a + b with
 * a = w / sqrt(var + eps) and b = bias - mean a (w, bias may be NULL), then ReLU when asked (as
 * ATen's: a negative value becomes +0, -0 and NaN stay), then rounded to out_mode. in_mode rounds
 * x as it is read: the previous kernel's output rounding, when nothing else reads that output.
 * Threads take whole channel planes. */
AVX512 static void norm_planes(const float* x, float* y, const float* w, const float* b, const float* mean,
                               const float* var, int64_t lo, int64_t hi, int64_t C, int64_t S, float eps,
                               int relu, int in_mode, int out_mode) {
  for (int64_t p = lo; p < hi; ++p) {
    int64_t c = p % C;
    float invstd = 1.0f / sqrtf(var[c] + eps);
    float a = w ? w[c] * invstd : invstd;
    float shift = (b ? b[c] : 0.0f) - mean[c] * a;
    __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(shift), zero = _mm512_setzero_ps();
    const float* src = x + p * S;
    float* dst = y + p * S;
    for (int64_t i = 0; i < S; i += 16) {
      __mmask16 m = lanes(S - i);
      __m512 v = _mm512_add_ps(_mm512_mul_ps(round16(_mm512_maskz_loadu_ps(m, src + i), in_mode), va), vb);
      if (relu) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
      _mm512_mask_storeu_ps(dst + i, m, round16(v, out_mode));
    }
  }
}

void rbln_batch_norm(const float* x, float* y, const float* w, const float* b, const float* mean,
                     const float* var, int64_t N, int64_t C, int64_t S, float eps, int relu, int in_mode,
                     int out_mode) {
  int64_t planes = N * C;
  if (in_parallel(planes, planes * S)) {
#pragma omp parallel
    {
      int64_t lo, hi;
      thread_range(planes, &lo, &hi);
      norm_planes(x, y, w, b, mean, var, lo, hi, C, S, eps, relu, in_mode, out_mode);
    }
    return;
  }
  norm_planes(x, y, w, b, mean, var, 0, planes, C, S, eps, relu, in_mode, out_mode);
}

#else
int rbln_has_epilogues(void) { return 0; }
void rbln_batch_norm(const float* x, float* y, const float* w, const float* b, const float* mean,
                     const float* var, int64_t N, int64_t C, int64_t S, float eps, int relu, int in_mode,
                     int out_mode) {
  (void)x; (void)y; (void)w; (void)b; (void)mean; (void)var; (void)N; (void)C; (void)S; (void)eps;
  (void)relu; (void)in_mode; (void)out_mode;
}
void rbln_bias_act(const float* src, const float* bias, float* dst, int64_t rows, int64_t n, int act,
                   int mode) {
  (void)src; (void)bias; (void)dst; (void)rows; (void)n; (void)act; (void)mode;
}
void rbln_layer_norm(const float* x, const float* res, const float* w, const float* b, float* y,
                     float* mean, float* rstd, int64_t rows, int64_t n, float eps, int mode) {
  (void)x; (void)res; (void)w; (void)b; (void)y; (void)mean; (void)rstd; (void)rows; (void)n;
  (void)eps; (void)mode;
}
#endif
