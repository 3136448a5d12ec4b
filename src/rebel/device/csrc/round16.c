/* In-place rounding of float32 buffers to the values a 16-bit format holds (FP16 or BF16).
 *
 * The virtual NPU keeps device tensors as float32 holding 16-bit values; every kernel output is
 * rounded. Through ATen that is two casts and two allocations per tensor; these loops do it in
 * place. Both are bit-identical to torch's own conversions (IEEE round to nearest even): FP16 uses
 * the F16C instructions ATen's vectorised conversion uses, BF16 the rounding-bias trick of
 * c10::BFloat16 (NaN becomes the canonical quiet NaN there too).
 * Plain C with no torch headers, so it builds in a fraction of a second wherever a C compiler is;
 * it is also valid C++, as which torch_rbln's shim compiles it in (round16.h gives C linkage).
 *
 * Built with OpenMP (rebel's own build), a large buffer is rounded by all of the process's OpenMP
 * threads: loaded after torch, the library binds to torch's libgomp (same soname), so these are
 * torch's intra-op threads, still spinning from the kernel that wrote the buffer, and their count is
 * torch.get_num_threads(). Measured here: 2^20 values in 137 us on one thread, 72 us on two, so a
 * transformer block's outputs round in about half the time. Elementwise: the values are the same.
 */
#include "round16.h"

#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this many values one thread rounds: a parallel region costs about what a second thread saves
 * there (ATen's own grain size). */
#define RBLN_PARALLEL_MIN 32768

typedef void (*rounding_loop)(const float* src, float* dst, int64_t n);

/* f over [0, n), one run of whole 64-byte lines per OpenMP thread. No num_threads clause: as in ATen,
 * a region of another size makes GNU OpenMP rebuild its thread pool. */
static void in_parallel(rounding_loop f, const float* src, float* dst, int64_t n) {
#ifdef _OPENMP
  if (n >= RBLN_PARALLEL_MIN && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
    {
      int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      int64_t step = ((n + threads - 1) / threads + 15) & ~(int64_t)15;
      int64_t lo = t * step, hi = lo + step < n ? lo + step : n;
      if (lo < hi) f(src + lo, dst + lo, hi - lo);
    }
    return;
  }
#endif
  f(src, dst, n);
}

#if defined(__x86_64__)
#include <immintrin.h>
__attribute__((target("avx,f16c"))) static void half_f16c(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT));
}
#endif

int rbln_has_f16c(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#else
  return 0;
#endif
}

void rbln_round_half_copy(const float* src, float* dst, int64_t n) {
#if defined(__x86_64__)
  in_parallel(half_f16c, src, dst, n);
#else
  (void)src; (void)dst; (void)n;
#endif
}

void rbln_round_half(float* p, int64_t n) { rbln_round_half_copy(p, p, n); }

static void bfloat16_loop(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    memcpy(&bits, src + i, 4);
    if (src[i] != src[i]) {
      bits = 0x7FC00000u;
    } else {
      bits += 0x7FFFu + ((bits >> 16) & 1u);
      bits &= 0xFFFF0000u;
    }
    memcpy(dst + i, &bits, 4);
  }
}

void rbln_round_bfloat16_copy(const float* src, float* dst, int64_t n) {
  in_parallel(bfloat16_loop, src, dst, n);
}

void rbln_round_bfloat16(float* p, int64_t n) { rbln_round_bfloat16_copy(p, p, n); }
