// CPU launcher of sgld_step_: Philox noise in blocks, then the shared
// per-element update (csrc/sgld.h), parallel over element groups.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <type_traits>

#include "../checks.h"
#include "../philox.h"
#include "../sgld.h"
#include "cpu_level.h"

#if JEM_EXT_X86_LEVELS
#include <immintrin.h>
#endif

namespace jem_ext {
namespace {

// Element groups (of 4) per noise block: 1024 elements, 4 KiB of normals,
// small enough to stay in L1 between drawing and using them.
constexpr int64_t kBlockGroups = 256;

using Words = uint32_t[4][kBlockGroups];

// ---------------------------------------------------------------- portable loops
// The scalar definitions, inlined into one function per CPU level (the
// compiler auto-vectorises them for that level's instruction set).

// r[k][i] = word k of the Philox block of group first + i, for from <= i < count.
JEM_EXT_INLINE void philox_words_loop(Words& r, uint64_t seed, uint64_t offset, uint64_t first,
                                      int64_t from, int64_t count) {
  for (int64_t i = from; i < count; ++i) {
    const Uint4 b = philox_block(seed, offset, first + static_cast<uint64_t>(i));
    r[0][i] = b.x;
    r[1][i] = b.y;
    r[2][i] = b.z;
    r[3][i] = b.w;
  }
}

// z[4 * i + k] = normal k of the block words r[.][i], for from <= i < count.
JEM_EXT_INLINE void box_muller_loop(float* __restrict z, const Words& r, int64_t from,
                                    int64_t count) {
  for (int64_t i = from; i < count; ++i) {
    box_muller(r[0][i], r[1][i], &z[4 * i], &z[4 * i + 1]);
    box_muller(r[2][i], r[3][i], &z[4 * i + 2], &z[4 * i + 3]);
  }
}

template <typename scalar_t, typename acc_t>
JEM_EXT_INLINE void update_loop(scalar_t* __restrict x, const scalar_t* __restrict g,
                                const float* __restrict z, int64_t from, int64_t n_elems,
                                const SgldParams<acc_t>& p) {
  for (int64_t e = from; e < n_elems; ++e) {
    x[e] = static_cast<scalar_t>(
        sgld_update<acc_t>(static_cast<acc_t>(x[e]), static_cast<acc_t>(g[e]), z[e], p));
  }
}

// The per-level kernels of the noise and of the float32 update.
struct SgldKernels {
  void (*philox_words)(Words& r, uint64_t seed, uint64_t offset, uint64_t first, int64_t count);
  void (*box_muller)(float* __restrict z, const Words& r, int64_t count);
  void (*update_float)(float* __restrict x, const float* __restrict g, const float* __restrict z,
                       int64_t n_elems, const SgldParams<float>& p);
};

void philox_words_baseline(Words& r, uint64_t seed, uint64_t offset, uint64_t first,
                           int64_t count) {
  philox_words_loop(r, seed, offset, first, 0, count);
}

void box_muller_baseline(float* __restrict z, const Words& r, int64_t count) {
  box_muller_loop(z, r, 0, count);
}

void update_float_baseline(float* __restrict x, const float* __restrict g,
                           const float* __restrict z, int64_t n_elems, const SgldParams<float>& p) {
  update_loop<float, float>(x, g, z, 0, n_elems, p);
}

#if JEM_EXT_X86_LEVELS
// ---------------------------------------------------------------- AVX2
// Hand-written: compilers vectorise the 32x32->64-bit Philox products
// poorly. Each function evaluates exactly the float operations of its scalar
// definition (philox.h, sgld.h), fused multiply-adds where those call
// fma_f and nowhere else, so its results are bit-identical.

// The 64-bit products of the 32-bit lanes of c with the multiplier m
// (m32: m in every lane; m64: m in the even lanes): low and high halves.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void mul_wide_avx2(__m256i c, __m256i m32, __m256i m64,
                                                      __m256i* lo, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(c, m64);
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(c, 0xF5), m64);
  *lo = _mm256_mullo_epi32(c, m32);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256i set1_u32_avx2(uint32_t v) {
  return _mm256_set1_epi32(static_cast<int>(v));
}

// philox_words_loop, 8 groups per vector.
JEM_EXT_TARGET_AVX2 void philox_words_avx2(Words& r, uint64_t seed, uint64_t offset, uint64_t first,
                                           int64_t count) {
  using namespace philox_detail;
  const uint64_t step = offset / 4;
  const __m256i mul0_32 = set1_u32_avx2(kMul0), mul0_64 = _mm256_set1_epi64x(kMul0);
  const __m256i mul1_32 = set1_u32_avx2(kMul1), mul1_64 = _mm256_set1_epi64x(kMul1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = set1_u32_avx2(0x80000000u);
  // The round keys are the same for every group: broadcast them once.
  __m256i key0[kRounds], key1[kRounds];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round, k0 += kWeyl0, k1 += kWeyl1) {
    key0[round] = set1_u32_avx2(k0);
    key1[round] = set1_u32_avx2(k1);
  }
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const uint64_t g0 = first + static_cast<uint64_t>(i);
    const __m256i g_lo = set1_u32_avx2(static_cast<uint32_t>(g0));
    const __m256i g_hi = set1_u32_avx2(static_cast<uint32_t>(g0 >> 32));
    __m256i c0 = set1_u32_avx2(static_cast<uint32_t>(step));
    __m256i c1 = set1_u32_avx2(static_cast<uint32_t>(step >> 32));
    __m256i c2 = _mm256_add_epi32(g_lo, lane);
    // Carry into the high word in lanes whose low word wrapped around
    // (unsigned c2 < g_lo, compared as signed after flipping the sign bits).
    const __m256i wrapped =
        _mm256_cmpgt_epi32(_mm256_xor_si256(g_lo, sign), _mm256_xor_si256(c2, sign));
    __m256i c3 = _mm256_sub_epi32(g_hi, wrapped);  // wrapped lanes are -1
    for (int round = 0; round < kRounds; ++round) {
      __m256i lo0, hi0, lo1, hi1;
      mul_wide_avx2(c0, mul0_32, mul0_64, &lo0, &hi0);
      mul_wide_avx2(c2, mul1_32, mul1_64, &lo1, &hi1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), key0[round]);
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), key1[round]);
      c1 = lo1;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[0][i]), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[1][i]), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[2][i]), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[3][i]), c3);
  }
  philox_words_loop(r, seed, offset, first, i, count);
}

JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 fma_avx2(__m256 a, __m256 b, float c) {
  return _mm256_fmadd_ps(a, b, _mm256_set1_ps(c));
}

// log_positive, lane by lane.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 log_positive_avx2(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e =
      _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff)),
                       _mm256_set1_epi32(126));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, set1_u32_avx2(0x807fffffu)),
                                                 set1_u32_avx2(0x3f000000u)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // small lanes are -1
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = fma_avx2(p, m, -1.1514610310e-1f);
  p = fma_avx2(p, m, 1.1676998740e-1f);
  p = fma_avx2(p, m, -1.2420140846e-1f);
  p = fma_avx2(p, m, 1.4249322787e-1f);
  p = fma_avx2(p, m, -1.6668057665e-1f);
  p = fma_avx2(p, m, 2.0000714765e-1f);
  p = fma_avx2(p, m, -2.4999993993e-1f);
  p = fma_avx2(p, m, 3.3333331174e-1f);
  const __m256 ef = _mm256_cvtepi32_ps(e);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
  y = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// Flip the sign of the lanes of v whose `bit` (1 or 2) of n is set.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 negate_where_avx2(__m256 v, __m256i n) {
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(n, _mm256_set1_epi32(2)), 30);
  return _mm256_xor_ps(v, _mm256_castsi256_ps(sign));
}

// sincos_turn, lane by lane.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void sincos_turn_avx2(__m256 t, __m256* s_out, __m256* c_out) {
  const __m256 t4 = _mm256_mul_ps(t, _mm256_set1_ps(4.0f));
  const __m256i q = _mm256_cvttps_epi32(_mm256_add_ps(t4, _mm256_set1_ps(0.5f)));
  const __m256 a =
      _mm256_mul_ps(_mm256_sub_ps(t4, _mm256_cvtepi32_ps(q)), _mm256_set1_ps(1.57079632679489662f));
  const __m256 z = _mm256_mul_ps(a, a);
  __m256 sp = _mm256_set1_ps(-1.9515295891e-4f);
  sp = fma_avx2(sp, z, 8.3321608736e-3f);
  sp = fma_avx2(sp, z, -1.6666654611e-1f);
  const __m256 sa = _mm256_fmadd_ps(_mm256_mul_ps(sp, z), a, a);
  __m256 cp = _mm256_set1_ps(2.443315711809948e-5f);
  cp = fma_avx2(cp, z, -1.388731625493765e-3f);
  cp = fma_avx2(cp, z, 4.166664568298827e-2f);
  const __m256 ca =
      _mm256_fmadd_ps(_mm256_mul_ps(cp, z), z, fma_avx2(z, _mm256_set1_ps(-0.5f), 1.0f));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256 swap = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, one), one));
  *s_out = negate_where_avx2(_mm256_blendv_ps(sa, ca, swap), q);
  *c_out = negate_where_avx2(_mm256_blendv_ps(ca, sa, swap), _mm256_add_epi32(q, one));
}

// box_muller of the words r0, r1 of 8 groups, lane by lane.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void box_muller_avx2(__m256i r0, __m256i r1, __m256* z0,
                                                        __m256* z1) {
  const __m256 scale = _mm256_set1_ps(5.9604644775390625e-8f);
  const __m256 u0 = _mm256_mul_ps(
      _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_srli_epi32(r0, 8), _mm256_set1_epi32(1))), scale);
  const __m256 u1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r1, 8)), scale);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_positive_avx2(u0)));
  __m256 s, c;
  sincos_turn_avx2(u1, &s, &c);
  *z0 = _mm256_mul_ps(radius, c);
  *z1 = _mm256_mul_ps(radius, s);
}

JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256i load_words_avx2(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Store normals k = 0..3 of 8 consecutive groups (vector k, lane i) in group
// order: z[4 * i + k].
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void store_groups_avx2(float* z, __m256 n0, __m256 n1, __m256 n2,
                                                          __m256 n3) {
  const __m256d a = _mm256_castps_pd(_mm256_unpacklo_ps(n0, n1));  // groups 0 1 | 4 5
  const __m256d b = _mm256_castps_pd(_mm256_unpackhi_ps(n0, n1));  // groups 2 3 | 6 7
  const __m256d c = _mm256_castps_pd(_mm256_unpacklo_ps(n2, n3));
  const __m256d d = _mm256_castps_pd(_mm256_unpackhi_ps(n2, n3));
  const __m256 g04 = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));  // group 0 | group 4
  const __m256 g15 = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
  const __m256 g26 = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
  const __m256 g37 = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
  _mm256_storeu_ps(z, _mm256_permute2f128_ps(g04, g15, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(g26, g37, 0x20));
  _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(g04, g15, 0x31));
  _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(g26, g37, 0x31));
}

// box_muller_loop, 8 groups per vector.
JEM_EXT_TARGET_AVX2 void box_muller_block_avx2(float* __restrict z, const Words& r, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    __m256 n0, n1, n2, n3;
    box_muller_avx2(load_words_avx2(&r[0][i]), load_words_avx2(&r[1][i]), &n0, &n1);
    box_muller_avx2(load_words_avx2(&r[2][i]), load_words_avx2(&r[3][i]), &n2, &n3);
    store_groups_avx2(z + 4 * i, n0, n1, n2, n3);
  }
  box_muller_loop(z, r, i, count);
}

// v < lo ? lo : v, then v > hi ? hi : v (a NaN stays NaN).
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 bound_avx2(__m256 v, __m256 lo, __m256 hi) {
  v = _mm256_blendv_ps(v, lo, _mm256_cmp_ps(v, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(v, hi, _mm256_cmp_ps(v, hi, _CMP_GT_OQ));
}

// update_loop<float, float>, 8 elements per vector.
JEM_EXT_TARGET_AVX2 void update_float_avx2(float* __restrict x, const float* __restrict g,
                                           const float* __restrict z, int64_t n_elems,
                                           const SgldParams<float>& p) {
  const __m256 step = _mm256_set1_ps(p.step_size);
  const __m256 std_ = _mm256_set1_ps(p.noise_std);
  const __m256 clip_lo = _mm256_set1_ps(-p.grad_clip);
  const __m256 clip_hi = _mm256_set1_ps(p.grad_clip);
  const __m256 lo = _mm256_set1_ps(p.clamp_min);
  const __m256 hi = _mm256_set1_ps(p.clamp_max);
  int64_t e = 0;
  for (; e + 8 <= n_elems; e += 8) {
    const __m256 gc = bound_avx2(_mm256_loadu_ps(g + e), clip_lo, clip_hi);
    const __m256 moved = _mm256_sub_ps(_mm256_loadu_ps(x + e), _mm256_mul_ps(step, gc));
    const __m256 v = _mm256_add_ps(moved, _mm256_mul_ps(std_, _mm256_loadu_ps(z + e)));
    _mm256_storeu_ps(x + e, bound_avx2(v, lo, hi));
  }
  update_loop<float, float>(x, g, z, e, n_elems, p);
}

// ---------------------------------------------------------------- AVX-512
// philox_words_loop, 16 groups per vector (as philox_words_avx2).
JEM_EXT_TARGET_AVX512 void philox_words_avx512(Words& r, uint64_t seed, uint64_t offset,
                                               uint64_t first, int64_t count) {
  using namespace philox_detail;
  const uint64_t step = offset / 4;
  const __m512i mul0 = _mm512_set1_epi64(kMul0);
  const __m512i mul1 = _mm512_set1_epi64(kMul1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr __mmask16 kOdd = 0xAAAA;
  // The round keys are the same for every group: broadcast them once.
  __m512i key0[kRounds], key1[kRounds];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round, k0 += kWeyl0, k1 += kWeyl1) {
    key0[round] = _mm512_set1_epi32(static_cast<int>(k0));
    key1[round] = _mm512_set1_epi32(static_cast<int>(k1));
  }
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const uint64_t g0 = first + static_cast<uint64_t>(i);
    const __m512i g_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0)));
    const __m512i g_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0 >> 32)));
    __m512i c0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(step)));
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(step >> 32)));
    __m512i c2 = _mm512_add_epi32(g_lo, lane);
    // Carry into the high word in lanes whose low word wrapped around.
    const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c2, g_lo);
    __m512i c3 = _mm512_mask_add_epi32(g_hi, wrapped, g_hi, _mm512_set1_epi32(1));
    for (int round = 0; round < kRounds; ++round) {
      const __m512i e0 = _mm512_mul_epu32(c0, mul0);  // products of the even lanes
      const __m512i o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), mul0);  // odd lanes
      const __m512i e1 = _mm512_mul_epu32(c2, mul1);
      const __m512i o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), mul1);
      const __m512i lo0 = _mm512_mask_blend_epi32(kOdd, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi0 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo1 = _mm512_mask_blend_epi32(kOdd, e1, _mm512_slli_epi64(o1, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e1, 32), o1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), key0[round]);
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), key1[round]);
      c1 = lo1;
      c3 = lo0;
    }
    _mm512_storeu_si512(&r[0][i], c0);
    _mm512_storeu_si512(&r[1][i], c1);
    _mm512_storeu_si512(&r[2][i], c2);
    _mm512_storeu_si512(&r[3][i], c3);
  }
  philox_words_loop(r, seed, offset, first, i, count);
}

// The auto-vectorised scalar definitions, 16 lanes wide.
JEM_EXT_TARGET_AVX512 void box_muller_block_avx512(float* __restrict z, const Words& r,
                                                   int64_t count) {
  box_muller_loop(z, r, 0, count);
}

JEM_EXT_TARGET_AVX512 void update_float_avx512(float* __restrict x, const float* __restrict g,
                                               const float* __restrict z, int64_t n_elems,
                                               const SgldParams<float>& p) {
  update_loop<float, float>(x, g, z, 0, n_elems, p);
}
#endif  // JEM_EXT_X86_LEVELS

const SgldKernels& sgld_kernels(CpuLevel level) {
  static constexpr SgldKernels kBaseline{philox_words_baseline, box_muller_baseline,
                                         update_float_baseline};
#if JEM_EXT_X86_LEVELS
  static constexpr SgldKernels kAvx2{philox_words_avx2, box_muller_block_avx2, update_float_avx2};
  static constexpr SgldKernels kAvx512{philox_words_avx512, box_muller_block_avx512,
                                       update_float_avx512};
  return for_level(level, kBaseline, kAvx2, kAvx512);
#else
  return for_level(level, kBaseline, kBaseline, kBaseline);
#endif
}

// z[4 * i + k] = normal k of group first + i, for i < count.
void fill_normals(const SgldKernels& k, float* z, uint64_t seed, uint64_t offset, uint64_t first,
                  int64_t count) {
  alignas(64) Words r;
  k.philox_words(r, seed, offset, first, count);
  k.box_muller(z, r, count);
}

template <typename scalar_t, typename acc_t>
void sgld_cpu_kernel(scalar_t* x, const scalar_t* g, int64_t n, const SgldParams<acc_t>& p,
                     uint64_t seed, uint64_t offset) {
  const int64_t n_groups = (n + 3) / 4;
  const int64_t n_blocks = (n_groups + kBlockGroups - 1) / kBlockGroups;
  const SgldKernels& k = sgld_kernels(cpu_level());
  // ~16k elements per task: below that, threads cost more than they save.
  at::parallel_for(0, n_blocks, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float z[4 * kBlockGroups];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first_group = blk * kBlockGroups;
      const int64_t groups = std::min(kBlockGroups, n_groups - first_group);
      const int64_t first_elem = first_group * 4;
      const int64_t elems = std::min(groups * 4, n - first_elem);
      if (p.noise_std != acc_t(0)) {
        fill_normals(k, z, seed, offset, static_cast<uint64_t>(first_group), groups);
      } else {
        std::fill(z, z + 4 * kBlockGroups, 0.0f);
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        k.update_float(x + first_elem, g + first_elem, z, elems, p);
      } else {
        update_loop<scalar_t, acc_t>(x + first_elem, g + first_elem, z, 0, elems, p);
      }
    }
  });
}

void sgld_cpu(at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
              c10::optional<double> clamp_min, c10::optional<double> clamp_max,
              c10::optional<double> grad_clip, uint64_t seed, uint64_t offset) {
  // Work on contiguous storage; the noise of element i (in row-major logical
  // order) then never depends on x's memory layout.
  at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const at::Tensor gc = grad.contiguous();
  const int64_t n = xc.numel();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "sgld_step_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const auto p =
              make_sgld_params<acc_t>(step_size, noise_std, clamp_min, clamp_max, grad_clip);
          sgld_cpu_kernel<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), n, p,
                                           seed, offset);
        });
  }
  if (!xc.is_same(x)) {
    x.copy_(xc);
  }
}

void sgld_step_cpu(at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
                   c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                   c10::optional<double> grad_clip, c10::optional<at::Generator> generator) {
  check_sgld_inputs("sgld_step_", x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip);
  TORCH_CHECK(x.device().is_cpu(), "sgld_step_: expected CPU tensors, got ", x.device());
  // The CPU generator (Mersenne twister) has no Philox offset: we draw a
  // fresh 64-bit Philox key from it instead. Same generator state -> same
  // noise; consecutive calls -> fresh keys.
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  sgld_cpu(x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip, seed, 0);
}

void sgld_step_philox_cpu(at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
                          c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                          c10::optional<double> grad_clip, int64_t seed, int64_t offset) {
  check_sgld_inputs("_sgld_step_philox_", x, grad, step_size, noise_std, clamp_min, clamp_max,
                    grad_clip);
  TORCH_CHECK(x.device().is_cpu(), "_sgld_step_philox_: expected CPU tensors, got ", x.device());
  TORCH_CHECK(offset >= 0 && offset % 4 == 0,
              "_sgld_step_philox_: offset must be a non-negative multiple of 4, got ", offset);
  sgld_cpu(x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip,
           static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

}  // namespace
}  // namespace jem_ext

TORCH_LIBRARY_IMPL(jem_ext, CPU, m) {
  m.impl("sgld_step_", &jem_ext::sgld_step_cpu);
  m.impl("_sgld_step_philox_", &jem_ext::sgld_step_philox_cpu);
}
