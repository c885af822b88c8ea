// The vector operations the library's kernels are written in, one definition per ISA: AVX-512 (16 lanes), AVX2 +
// FMA (8 lanes) or scalar code (1 lane). Each lane's arithmetic is the same on all three (fma is a fused multiply-
// add, exactly rounded; mul, sub and add are single roundings), so a kernel whose sums keep their order across lanes
// gives the same bits on every x86 ISA. bf16 values are widened to fp32 exactly (their bits shifted up).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace qwen_kernels {

using bf16 = uint16_t;

inline float to_f32(float v) { return v; }
inline float to_f32(bf16 v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512F__)
constexpr int kWidth = 16;
using Vec = __m512;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec broadcast(float a) { return _mm512_set1_ps(a); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kWidth = 8;
using Vec = __m256;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec broadcast(float a) { return _mm256_set1_ps(a); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec zero() { return _mm256_setzero_ps(); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#else
constexpr int kWidth = 1;
using Vec = float;
inline Vec load(const float* p) { return *p; }
inline Vec load(const bf16* p) { return to_f32(*p); }
inline Vec broadcast(float a) { return a; }
inline Vec mul(Vec a, Vec b) { return a * b; }
inline Vec sub(Vec a, Vec b) { return a - b; }
inline Vec fma(Vec a, Vec b, Vec c) { return std::fmaf(a, b, c); }
inline Vec zero() { return 0.0f; }
inline void store(float* p, Vec v) { *p = v; }
#endif

}  // namespace qwen_kernels
