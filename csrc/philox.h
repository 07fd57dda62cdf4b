// Counter-based random numbers shared by the CPU and CUDA kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) maps a 128-bit counter and a 64-bit key to four independent 32-bit
// words. We lay out the counter exactly as curand and PyTorch's CUDA kernels
// do for `curand_init(seed, subsequence, offset)`:
//   key     = seed
//   counter = {offset / 4 (low 64 bits), subsequence (high 64 bits)}
// so a (seed, offset) pair reserved from a torch Generator through
// `philox_cuda_state(increment)` never overlaps the numbers other PyTorch ops
// draw from the same generator.
//
// Normal variates come from Box-Muller with our own branch-free log and
// sin/cos written with explicit fused multiply-adds: the CPU build and the
// CUDA build evaluate the very same float operations, so the same
// (seed, offset) gives bit-identical noise on both devices, and the CPU loops
// auto-vectorise.
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/macros/Macros.h>

#include "float_math.h"  // JEM_EXT_INLINE, fma_f, bits_to_float, log_positive

namespace jem_ext {

struct Uint4 {
  uint32_t x, y, z, w;
};

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;  // the "-10" of Philox4x32-10
}  // namespace philox_detail

// One Philox4x32-10 block: counter (c0..c3) and key (k0, k1) -> 4 words.
C10_HOST_DEVICE JEM_EXT_INLINE Uint4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                   uint32_t c3, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Uint4{c0, c1, c2, c3};
}

// The block that element group `group` draws at generator offset `offset`.
C10_HOST_DEVICE JEM_EXT_INLINE Uint4 philox_block(uint64_t seed, uint64_t offset, uint64_t group) {
  const uint64_t step = offset / 4;
  return philox4x32_10(static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                       static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// sin and cos of 2*pi*t for t in [0, 1]: reduce to [-pi/4, pi/4] by quarter
// turns, evaluate minimax polynomials, rotate by the quadrant.
C10_HOST_DEVICE JEM_EXT_INLINE void sincos_turn(float t, float* s_out, float* c_out) {
  const float t4 = t * 4.0f;
  const int32_t q = static_cast<int32_t>(t4 + 0.5f);  // t4 >= 0: trunc == floor
  const float a = (t4 - static_cast<float>(q)) * 1.57079632679489662f;
  const float z = a * a;
  float sp = -1.9515295891e-4f;
  sp = fma_f(sp, z, 8.3321608736e-3f);
  sp = fma_f(sp, z, -1.6666654611e-1f);
  const float sa = fma_f(sp * z, a, a);
  float cp = 2.443315711809948e-5f;
  cp = fma_f(cp, z, -1.388731625493765e-3f);
  cp = fma_f(cp, z, 4.166664568298827e-2f);
  const float ca = fma_f(cp * z, z, fma_f(z, -0.5f, 1.0f));
  const bool swap = (q & 1) != 0;
  const float s = swap ? ca : sa;
  const float c = swap ? sa : ca;
  *s_out = (q & 2) ? -s : s;
  *c_out = ((q + 1) & 2) ? -c : c;
}

// 24-bit uniforms: (0, 1] for the log and [0, 1) for the angle. The values
// fit in int32, whose conversion to float vectorises (unsigned does not).
C10_HOST_DEVICE JEM_EXT_INLINE float uniform_open0(uint32_t r) {
  return static_cast<float>(static_cast<int32_t>(r >> 8) + 1) * 5.9604644775390625e-8f;
}
C10_HOST_DEVICE JEM_EXT_INLINE float uniform_open1(uint32_t r) {
  return static_cast<float>(static_cast<int32_t>(r >> 8)) * 5.9604644775390625e-8f;
}

// Two standard normals from two 32-bit words (Box-Muller).
C10_HOST_DEVICE JEM_EXT_INLINE void box_muller(uint32_t r0, uint32_t r1, float* z0, float* z1) {
  const float radius = std::sqrt(-2.0f * log_positive(uniform_open0(r0)));
  float s, c;
  sincos_turn(uniform_open1(r1), &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

// The four normals of element group `group` (elements 4*group .. 4*group+3).
C10_HOST_DEVICE JEM_EXT_INLINE void normal4(uint64_t seed, uint64_t offset, uint64_t group,
                                            float z[4]) {
  const Uint4 r = philox_block(seed, offset, group);
  box_muller(r.x, r.y, &z[0], &z[1]);
  box_muller(r.z, r.w, &z[2], &z[3]);
}

}  // namespace jem_ext
