/* The 16-bit rounder of round16.c, for C and C++ callers.
 *
 * Two users link the one source: rebel.device.rounding loads it with ctypes (the compiled-model
 * executor), and torch_rbln's C++ shim compiles it in (the eager device), so both round with the
 * same instructions. C linkage either way, so the names are the same whichever compiler built it.
 */
#ifndef RBLN_ROUND16_H
#define RBLN_ROUND16_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when this CPU can round FP16 here (F16C), else 0: the caller then uses torch. */
int rbln_has_f16c(void);
/* Round n float32 values in place to the nearest FP16 value (F16C; a no-op where
 * rbln_has_f16c() is 0). */
void rbln_round_half(float* p, int64_t n);
/* Round n float32 values in place to the nearest BF16 value (NaN: the canonical quiet NaN). */
void rbln_round_bfloat16(float* p, int64_t n);
/* The same roundings from src into dst (n float32 values each; dst == src is the in-place
 * case): a cast that must leave its input alone writes the rounded copy in one pass. */
void rbln_round_half_copy(const float* src, float* dst, int64_t n);
void rbln_round_bfloat16_copy(const float* src, float* dst, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
