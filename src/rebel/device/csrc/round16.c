/* In-place rounding of float32 buffers to the values a 16-bit format holds (FP16 or BF16).
 *
 * The virtual NPU keeps device tensors as float32 holding 16-bit values; every kernel output is
 * rounded. Through ATen that is two casts and two allocations per tensor; these loops do it in
 * place. Both are bit-identical to torch's own conversions (IEEE round to nearest even): FP16 uses
 * the F16C instructions ATen's vectorised conversion uses, BF16 the rounding-bias trick of
 * c10::BFloat16 (NaN becomes the canonical quiet NaN there too).
 * Plain C with no torch headers, so it builds in a fraction of a second wherever a C compiler is;
 * it is also valid C++, as which torch_rbln's shim compiles it in (round16.h gives C linkage).
 */
#include "round16.h"

#include <string.h>

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
  half_f16c(src, dst, n);
#else
  (void)src; (void)dst; (void)n;
#endif
}

void rbln_round_half(float* p, int64_t n) { rbln_round_half_copy(p, p, n); }

void rbln_round_bfloat16_copy(const float* src, float* dst, int64_t n) {
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

void rbln_round_bfloat16(float* p, int64_t n) { rbln_round_bfloat16_copy(p, p, n); }
