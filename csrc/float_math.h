// Float helpers shared by the CPU and CUDA math headers (philox.h, energy.h):
// bit casts, an explicit fused multiply-add and a branch-free log, each the
// same float operations on both devices.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/macros/Macros.h>

// Force inlining: the CPU loops are compiled once per instruction set
// (csrc/cpu/cpu_level.h), and a helper left out of line would be compiled
// only for the baseline (a libm call for every fma, no vectorisation).
#if defined(__CUDACC__)
#define JEM_EXT_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define JEM_EXT_INLINE inline __attribute__((always_inline))
#else
#define JEM_EXT_INLINE inline
#endif

namespace jem_ext {

C10_HOST_DEVICE JEM_EXT_INLINE float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

C10_HOST_DEVICE JEM_EXT_INLINE uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

C10_HOST_DEVICE JEM_EXT_INLINE float fma_f(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Natural log of a positive normal float, ~1 ulp (Box-Muller feeds it
// [2^-24, 1], the energy row sums [1, C]); no NaN/inf/zero handling.
// Cephes-style: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), then a degree-9
// polynomial in (m - 1).
C10_HOST_DEVICE JEM_EXT_INLINE float log_positive(float x) {
  const uint32_t bits = float_to_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;
  float m = bits_to_float((bits & 0x807fffffu) | 0x3f000000u);  // [0.5, 1)
  // m < sqrt(1/2): use 2m and e - 1. Written as arithmetic, not a branch.
  const bool small = m < 0.707106781186547524f;
  e -= static_cast<int32_t>(small);
  m = (m + (small ? m : 0.0f)) - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = fma_f(p, m, -1.1514610310e-1f);
  p = fma_f(p, m, 1.1676998740e-1f);
  p = fma_f(p, m, -1.2420140846e-1f);
  p = fma_f(p, m, 1.4249322787e-1f);
  p = fma_f(p, m, -1.6668057665e-1f);
  p = fma_f(p, m, 2.0000714765e-1f);
  p = fma_f(p, m, -2.4999993993e-1f);
  p = fma_f(p, m, 3.3333331174e-1f);
  const float ef = static_cast<float>(e);
  float y = (p * m) * z;
  y = fma_f(ef, -2.12194440e-4f, y);
  y = fma_f(z, -0.5f, y);
  return fma_f(ef, 0.693359375f, m + y);
}

// Branch-free float exp (Cephes-style, ~1 ulp) so that the CPU loops
// auto-vectorise: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7
// polynomial, 2^n through the exponent bits. Results below 2^-126 flush to 0
// (softmax terms that small vanish next to the row maximum, which is 1).
C10_HOST_DEVICE JEM_EXT_INLINE float exp_float(float x) {
  float xc = x < -87.33654f ? -87.33654f : x;  // one select per line: GCC if-converts
  xc = xc > 88.37626f ? 88.37626f : xc;        // these, not nested ternaries
  xc = x != x ? 0.0f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = fma_f(n, -0.693359375f, xc);
  r = fma_f(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fma_f(p, r, 1.3981999507e-3f);
  p = fma_f(p, r, 8.3334519073e-3f);
  p = fma_f(p, r, 4.1665795894e-2f);
  p = fma_f(p, r, 1.6666665459e-1f);
  p = fma_f(p, r, 5.0000001201e-1f);
  const float er = fma_f(p * r, r, r) + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  float y = er * scale;
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

}  // namespace jem_ext
