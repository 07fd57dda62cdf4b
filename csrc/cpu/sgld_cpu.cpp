// CPU launcher of sgld_step_: Philox noise and the shared per-element update
// (csrc/sgld.h), block by block, parallel over blocks; hand-vectorised per CPU
// level (cpu_level.h), the float32 step with the noise kept in registers.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
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

// Element groups (of 4) per block: 1024 elements. A block is the unit of
// parallel work and, where the noise goes through memory, 4 KiB of normals
// that stay in L1 between drawing and using them.
constexpr int64_t kBlockGroups = 256;

using Words = uint32_t[4][kBlockGroups];

// ---------------------------------------------------------------- portable loops
// The scalar definitions, inlined into one function per CPU level.

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

// x and g carry no __restrict: the op allows grad to be x itself (each element's reads come
// before its write, so that is well defined without the qualifier).
template <typename scalar_t, typename acc_t>
JEM_EXT_INLINE void update_loop(scalar_t* x, const scalar_t* g, const float* __restrict z,
                                int64_t from, int64_t n_elems, const SgldParams<acc_t>& p) {
  for (int64_t e = from; e < n_elems; ++e) {
    x[e] = static_cast<scalar_t>(
        sgld_update<acc_t>(static_cast<acc_t>(x[e]), static_cast<acc_t>(g[e]), z[e], p));
  }
}

// The per-level kernels. `normals` writes z[4 * i + k] = normal k of group
// first + i for i < count, and may write normals of further groups up to
// the next multiple of 16 groups (z holds 4 * kBlockGroups floats).
// `step_float` is the whole float32 step of the n_elems (<= 4 * kBlockGroups)
// elements of one block whose first group is `first`, noise included.
struct SgldKernels {
  void (*normals)(float* __restrict z, uint64_t seed, uint64_t offset, uint64_t first,
                  int64_t count);
  void (*step_float)(float* x, const float* g, int64_t n_elems, uint64_t seed, uint64_t offset,
                     uint64_t first, const SgldParams<float>& p);
  void (*update_float)(float* x, const float* g, const float* __restrict z, int64_t n_elems,
                       const SgldParams<float>& p);
};

void normals_baseline(float* __restrict z, uint64_t seed, uint64_t offset, uint64_t first,
                      int64_t count) {
  alignas(64) Words r;
  philox_words_loop(r, seed, offset, first, 0, count);
  box_muller_loop(z, r, 0, count);
}

void update_float_baseline(float* x, const float* g, const float* __restrict z, int64_t n_elems,
                           const SgldParams<float>& p) {
  update_loop<float, float>(x, g, z, 0, n_elems, p);
}

void step_float_baseline(float* x, const float* g, int64_t n_elems, uint64_t seed, uint64_t offset,
                         uint64_t first, const SgldParams<float>& p) {
  alignas(64) float z[4 * kBlockGroups];
  normals_baseline(z, seed, offset, first, (n_elems + 3) / 4);
  update_loop<float, float>(x, g, z, 0, n_elems, p);
}

#if JEM_EXT_X86_LEVELS
// ---------------------------------------------------------------- vector levels
// Hand-written: compilers vectorise the 32x32->64-bit Philox products and
// the per-group layout of the normals poorly. Each function evaluates the
// integer and float operations of its scalar definition (philox.h,
// float_math.h, sgld.h), fused multiply-adds where those call fma_f, or in a
// few places other operations that give the same bits whatever the input
// (each says why), so its results are bit-identical (tests/test_cpu_levels.py).
//
// Philox runs with one group per 64-bit lane: _mm*_mul_epu32 multiplies the
// low 32-bit halves into the full 64-bit product, whose low half is the next
// c1 (c3) as it stands and whose high half, shifted down, enters c0 (c2).
// Only the low halves carry state; the high halves hold leftovers that no
// instruction reads. The words of two such vectors are then packed into one
// vector of 32-bit lanes for Box-Muller. Which group each lane draws is
// chosen (kGroupsA/B below) so that the 4 x 4 transposition of the normals
// into element order ends inside 128-bit lanes: 8 unpacks, no lane crossing.

// Philox's first two rounds when the offset (c0, c1) and the group's high
// word (c3) are the same in every lane: round 0's first product and round
// 1's second are then lane-independent, and what remains per lane is
//   round 0: p1 = M1 * c2;  c0 = hi(p1) ^ r0_c0;  c1 = p1
//   round 1: p0 = M0 * c0;  c0 = c1 ^ r1_c0;  c1 = r1_c1;  c2 = hi(p0) ^ r1_c2;  c3 = p0
// (7 vector operations in place of 12; philox4x32_10 in philox.h is the definition).
// The vector levels draw a block's noise this way when all its groups share
// their high word (every tensor under 2^34 elements), the scalar loops otherwise.
struct PhiloxHead {
  uint32_t r0_c0, r1_c0, r1_c1, r1_c2;
};

inline PhiloxHead philox_head(uint64_t seed, uint64_t offset, uint32_t group_hi) {
  using namespace philox_detail;
  const uint64_t step = offset / 4;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t p0 = static_cast<uint64_t>(kMul0) * static_cast<uint32_t>(step);
  const uint32_t c2 = static_cast<uint32_t>(p0 >> 32) ^ group_hi ^ k1;  // after round 0
  const uint32_t c3 = static_cast<uint32_t>(p0);
  const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;  // round 1
  return PhiloxHead{static_cast<uint32_t>(step >> 32) ^ k0,
                    static_cast<uint32_t>(p1 >> 32) ^ (k0 + kWeyl0), static_cast<uint32_t>(p1),
                    c3 ^ (k1 + kWeyl1)};
}

// Whether the `count` groups from `first` share their high word.
inline bool same_group_hi(uint64_t first, int64_t count) {
  return (first >> 32) == ((first + static_cast<uint64_t>(count) - 1) >> 32);
}

// ---------------------------------------------------------------- AVX-512
// Groups of the 64-bit lanes of the two Philox vectors of a 16-group chunk:
// the packed 32-bit lane l = 4 L + j then holds group 4 j + L.
constexpr int64_t kGroupsA512[8] = {0, 4, 8, 12, 1, 5, 9, 13};
constexpr int64_t kGroupsB512[8] = {2, 6, 10, 14, 3, 7, 11, 15};

struct Philox512 {
  __m512i key0[philox_detail::kRounds], key1[philox_detail::kRounds];
  __m512i r0_c0, r1_c0, r1_c1, r1_c2, groups_a, groups_b;
};

// For groups whose high word is group_hi.
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void philox_setup_avx512(Philox512& s, uint64_t seed,
                                                              uint64_t offset, uint32_t group_hi) {
  using namespace philox_detail;
  // The round keys are the same for every group: broadcast them once.
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round, k0 += kWeyl0, k1 += kWeyl1) {
    s.key0[round] = _mm512_set1_epi32(static_cast<int>(k0));
    s.key1[round] = _mm512_set1_epi32(static_cast<int>(k1));
  }
  const PhiloxHead h = philox_head(seed, offset, group_hi);
  s.r0_c0 = _mm512_set1_epi32(static_cast<int>(h.r0_c0));
  s.r1_c0 = _mm512_set1_epi32(static_cast<int>(h.r1_c0));
  s.r1_c1 = _mm512_set1_epi32(static_cast<int>(h.r1_c1));
  s.r1_c2 = _mm512_set1_epi32(static_cast<int>(h.r1_c2));
  s.groups_a = _mm512_loadu_si512(kGroupsA512);
  s.groups_b = _mm512_loadu_si512(kGroupsB512);
}

// Philox4x32-10 of the 8 groups in the 64-bit lanes of each of group[0..NV):
// words in the low halves of w[v][0..3]. The NV vectors go through each
// round together: a round's products take 5 cycles, and independent chains
// keep the multiplier busy meanwhile.
template <int NV>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void philox8_avx512(const Philox512& s, const __m512i* group,
                                                         __m512i (*w)[4]) {
  using namespace philox_detail;
  const __m512i mul0 = _mm512_set1_epi64(kMul0);
  const __m512i mul1 = _mm512_set1_epi64(kMul1);
  __m512i c0[NV], c1[NV], c2[NV], c3[NV];
  for (int v = 0; v < NV; ++v) {  // rounds 0 and 1 (PhiloxHead)
    const __m512i p1 = _mm512_mul_epu32(group[v], mul1);
    const __m512i p0 = _mm512_mul_epu32(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), s.r0_c0), mul0);
    c0[v] = _mm512_xor_si512(p1, s.r1_c0);
    c1[v] = s.r1_c1;
    c2[v] = _mm512_xor_si512(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), s.r1_c2);
    c3[v] = p0;
  }
  // Unrolled: as a loop, each round copies every chain's c1 and c3 from the
  // last round's products into fresh registers (12 moves per round at NV 6).
#pragma GCC unroll 8
  for (int round = 2; round < kRounds; ++round) {
    for (int v = 0; v < NV; ++v) {
      const __m512i p0 = _mm512_mul_epu32(c0[v], mul0);
      const __m512i p1 = _mm512_mul_epu32(c2[v], mul1);
      // hi ^ c ^ key in one instruction (0x96: three-way xor); the high
      // half comes down by a shift in one word and a dword swap in the
      // other, which run on different ports.
      c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[v], s.key0[round], 0x96);
      c2[v] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), c3[v],
                                        s.key1[round], 0x96);
      c1[v] = p1;
      c3[v] = p0;
    }
  }
  for (int v = 0; v < NV; ++v) {
    w[v][0] = c0[v];
    w[v][1] = c1[v];
    w[v][2] = c2[v];
    w[v][3] = c3[v];
  }
}

JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE __m512 fma_avx512(__m512 a, __m512 b, float c) {
  return _mm512_fmadd_ps(a, b, _mm512_set1_ps(c));
}

// The Box-Muller functions below take N independent vectors and write each
// step for all N side by side: the long dependency chains of the
// polynomials (and of the square root) then overlap within the out-of-order
// window instead of one after the other.

// -2 log_positive(x2 / 2), lane by lane, for x2 / 2 > 0 and normal: 2x has the
// mantissa bits of x, and its exponent is one more (one addition saved). The
// radius's factor -2 rides on the constants and the last operation: scaling
// by 2 is exact unless a result leaves the normal range, which none here can
// (|m| >= 2^-24 or m = 0, so every product is 0 or above 2^-80), and keeps the
// sign of a zero, so fma(2 a, b, 2 c) is 2 fma(a, b, c) bit for bit, 2 (m + y)
// is fma(m, 2, 2 y), and fnmsub(a, b, c) = -(a b + c), rounded once, is the
// scalar -2 * log to the last bit, the -0 of log(1) = +0 included (sqrt(-0)
// is the radius -0 there).
template <int N>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void minus2_log_half_avx512(const __m512* x2, __m512* out) {
  __m512 m[N], ef[N], z[N], p[N];
  for (int i = 0; i < N; ++i) {
    const __m512i bits = _mm512_castps_si512(x2[i]);
    // (bits & 0x807fffff) | 0x3f000000 in one instruction.
    m[i] = _mm512_castsi512_ps(
        _mm512_ternarylogic_epi32(bits, _mm512_set1_epi32(static_cast<int>(0x807fffffu)),
                                  _mm512_set1_epi32(0x3f000000), 0xEA));
  }
  for (int i = 0; i < N; ++i) {
    const __mmask16 small =
        _mm512_cmp_ps_mask(m[i], _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    // float(e) with e = x's biased exponent - 126 - small, from getexp
    // (2x's unbiased exponent, as a float: every step exact).
    const __m512 e1 = _mm512_getexp_ps(x2[i]);
    ef[i] = _mm512_mask_sub_ps(e1, small, e1, _mm512_set1_ps(1.0f));
    // m + (small ? m : 0) - 1: adding 0 to a positive m leaves it as it is.
    m[i] = _mm512_sub_ps(_mm512_mask_add_ps(m[i], small, m[i], m[i]), _mm512_set1_ps(1.0f));
    z[i] = _mm512_mul_ps(m[i], m[i]);
    p[i] = _mm512_set1_ps(2.0f * 7.0376836292e-2f);
  }
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    for (int i = 0; i < N; ++i) {
      p[i] = fma_avx512(p[i], m[i], 2.0f * c);
    }
  }
  for (int i = 0; i < N; ++i) {
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p[i], m[i]), z[i]);
    y = _mm512_fmadd_ps(ef[i], _mm512_set1_ps(2.0f * -2.12194440e-4f), y);
    y = _mm512_sub_ps(y, z[i]);  // fma(z, 2 * -0.5, y): z times 1 is exact
    out[i] = _mm512_fnmsub_ps(ef[i], _mm512_set1_ps(2.0f * 0.693359375f),
                              _mm512_fmadd_ps(m[i], _mm512_set1_ps(2.0f), y));
  }
}

// v with its sign flipped in the lanes where bit 31 of w is set (a ^ (b & c)).
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE __m512 negate_where_avx512(__m512 v, __m512i w) {
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      _mm512_castps_si512(v), w, _mm512_set1_epi32(static_cast<int>(0x80000000u)), 0x78));
}

// sincos_turn of t = uniform_open1(r), lane by lane, with the quarter turns
// taken from the word's bits instead of float conversions (the same bits).
template <int N>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void sincos_word_avx512(const __m512i* r, __m512* s_out,
                                                             __m512* c_out) {
  __m512i v[N];
  __m512 a[N], z[N], sp[N], cp[N];
  for (int i = 0; i < N; ++i) {
    // The scalar steps are exact: with k = r >> 8, t4 = 4 t = k 2^-22, and
    // q = trunc(t4 + 0.5) = (k + 2^21) >> 22. t4 - q = d 2^-22, d the low 22
    // bits of k read as a signed number (bits 8..29 of r: (r << 2) >> 10,
    // arithmetic); fl((t4 - q) P) = fl(d (P 2^-22)) since 2^-22 only moves
    // the exponent (d = 0: +0 either way).
    a[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(r[i], 2), 10)),
                         _mm512_set1_ps(1.57079632679489662f * 2.384185791015625e-7f));
    // Only q mod 4 is used: bits 30 and 31 of r + 2^29 (= (k + 2^21) 2^8 + (r & 0xff)).
    v[i] = _mm512_add_epi32(r[i], _mm512_set1_epi32(1 << 29));
    z[i] = _mm512_mul_ps(a[i], a[i]);
    sp[i] = fma_avx512(_mm512_set1_ps(-1.9515295891e-4f), z[i], 8.3321608736e-3f);
    cp[i] = fma_avx512(_mm512_set1_ps(2.443315711809948e-5f), z[i], -1.388731625493765e-3f);
  }
  for (int i = 0; i < N; ++i) {
    sp[i] = fma_avx512(sp[i], z[i], -1.6666654611e-1f);
    cp[i] = fma_avx512(cp[i], z[i], 4.166664568298827e-2f);
  }
  for (int i = 0; i < N; ++i) {
    const __m512 sa = _mm512_fmadd_ps(_mm512_mul_ps(sp[i], z[i]), a[i], a[i]);
    const __m512 ca = _mm512_fmadd_ps(_mm512_mul_ps(cp[i], z[i]), z[i],
                                      fma_avx512(z[i], _mm512_set1_ps(-0.5f), 1.0f));
    // q & 1: bit 30 of v; q & 2: bit 31 of v. With sa and ca negated where
    // q & 2: q even gives (sa, ca), q odd (ca, -sa), since (q + 1) & 2 is
    // q & 2 for even q and its opposite for odd q.
    const __mmask16 swap = _mm512_test_epi32_mask(v[i], _mm512_set1_epi32(1 << 30));
    const __m512 sn = negate_where_avx512(sa, v[i]), cn = negate_where_avx512(ca, v[i]);
    s_out[i] = _mm512_mask_blend_ps(swap, sn, cn);
    c_out[i] = _mm512_mask_xor_ps(cn, swap, sn, _mm512_set1_ps(-0.0f));
  }
}

// box_muller of the words r0[i], r1[i], lane by lane.
template <int N>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void box_muller_avx512(const __m512i* r0, const __m512i* r1,
                                                            __m512* z0, __m512* z1) {
  __m512 u0x2[N], lg[N], s[N], c[N];
  for (int i = 0; i < N; ++i) {
    // 2 uniform_open0: 2 (k + 1) 2^-24 == k 2^-23 + 2^-23, exact either way (k < 2^24).
    u0x2[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(r0[i], 8)),
                              _mm512_set1_ps(1.1920928955078125e-7f),
                              _mm512_set1_ps(1.1920928955078125e-7f));
  }
  minus2_log_half_avx512<N>(u0x2, lg);
  for (int i = 0; i < N; ++i) {
    lg[i] = _mm512_sqrt_ps(lg[i]);  // the radius
  }
  sincos_word_avx512<N>(r1, s, c);
  for (int i = 0; i < N; ++i) {
    z0[i] = _mm512_mul_ps(lg[i], c[i]);
    z1[i] = _mm512_mul_ps(lg[i], s[i]);
  }
}

// The Philox words of the NC chunks of 16 groups from `first`: r[c][k] holds
// word k of chunk c's groups, lane l = 4 L + j holding group 4 j + L.
template <int NC>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void words16_avx512(const Philox512& s, uint64_t first,
                                                         __m512i (*r)[4]) {
  const __m512i base = _mm512_set1_epi64(static_cast<long long>(first));
  __m512i group[2 * NC], w[2 * NC][4];
  for (int c = 0; c < NC; ++c) {
    const __m512i chunk = _mm512_add_epi64(base, _mm512_set1_epi64(16 * c));
    group[2 * c] = _mm512_add_epi64(chunk, s.groups_a);
    group[2 * c + 1] = _mm512_add_epi64(chunk, s.groups_b);
  }
  philox8_avx512<2 * NC>(s, group, w);
  // The low halves of a's lanes, then of b's.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int c = 0; c < NC; ++c) {
    for (int k = 0; k < 4; ++k) {
      r[c][k] = _mm512_permutex2var_epi32(w[2 * c][k], even, w[2 * c + 1][k]);
    }
  }
}

// The normals of NC chunks' words r, in element order: out[c][j] holds
// elements 16 j .. 16 j + 15 of chunk c (its groups 4 j .. 4 j + 3).
template <int NC>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void normals_of_words_avx512(const __m512i (*r)[4],
                                                                  __m512 (*out)[4]) {
  // Pairs (word 0, word 1) and (word 2, word 3) of every chunk.
  __m512i r0[2 * NC], r1[2 * NC];
  __m512 z0[2 * NC], z1[2 * NC];
  for (int c = 0; c < NC; ++c) {
    r0[2 * c] = r[c][0];
    r1[2 * c] = r[c][1];
    r0[2 * c + 1] = r[c][2];
    r1[2 * c + 1] = r[c][3];
  }
  box_muller_avx512<2 * NC>(r0, r1, z0, z1);
  for (int c = 0; c < NC; ++c) {
    // Lane l = 4 L + j holds group 4 j + L: two rounds of unpacks gather
    // each group's 4 normals into 128-bit lane L of vector j.
    const __m512 n0 = z0[2 * c], n1 = z1[2 * c], n2 = z0[2 * c + 1], n3 = z1[2 * c + 1];
    const __m512d a = _mm512_castps_pd(_mm512_unpacklo_ps(n0, n1));
    const __m512d b = _mm512_castps_pd(_mm512_unpackhi_ps(n0, n1));
    const __m512d cc = _mm512_castps_pd(_mm512_unpacklo_ps(n2, n3));
    const __m512d d = _mm512_castps_pd(_mm512_unpackhi_ps(n2, n3));
    out[c][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, cc));
    out[c][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, cc));
    out[c][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    out[c][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
}

JEM_EXT_TARGET_AVX512 void normals_avx512(float* __restrict z, uint64_t seed, uint64_t offset,
                                          uint64_t first, int64_t count) {
  if (!same_group_hi(first, (count + 15) / 16 * 16)) {
    normals_baseline(z, seed, offset, first, count);
    return;
  }
  Philox512 s;
  philox_setup_avx512(s, seed, offset, static_cast<uint32_t>(first >> 32));
  for (int64_t i = 0; i < count; i += 16) {
    __m512i r[1][4];
    __m512 n[1][4];
    words16_avx512<1>(s, first + static_cast<uint64_t>(i), r);
    normals_of_words_avx512<1>(r, n);
    for (int j = 0; j < 4; ++j) {
      _mm512_storeu_ps(z + 4 * i + 16 * j, n[0][j]);
    }
  }
}

// sgld_update<float>, lane by lane. max(lo, v) is v < lo ? lo : v and
// min(hi, v) is v > hi ? hi : v, NaN v included (the second operand comes
// back when a comparison fails).
struct Update512 {
  __m512 step, std_, clip_lo, clip_hi, lo, hi;
};

JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE Update512 update_setup_avx512(const SgldParams<float>& p) {
  return Update512{_mm512_set1_ps(p.step_size),  _mm512_set1_ps(p.noise_std),
                   _mm512_set1_ps(-p.grad_clip), _mm512_set1_ps(p.grad_clip),
                   _mm512_set1_ps(p.clamp_min),  _mm512_set1_ps(p.clamp_max)};
}

// kClip / kClamp false: the bounds are infinite, and the max and min that
// would leave every value (NaN too) as it is are left out.
template <bool kClip = true, bool kClamp = true>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE __m512 update_avx512(const Update512& u, __m512 x, __m512 g,
                                                          __m512 z) {
  if (kClip) {
    g = _mm512_min_ps(u.clip_hi, _mm512_max_ps(u.clip_lo, g));
  }
  const __m512 moved = _mm512_sub_ps(x, _mm512_mul_ps(u.step, g));
  const __m512 v = _mm512_add_ps(moved, _mm512_mul_ps(u.std_, z));
  return kClamp ? _mm512_min_ps(u.hi, _mm512_max_ps(u.lo, v)) : v;
}

JEM_EXT_TARGET_AVX512 void update_float_avx512(float* x, const float* g, const float* __restrict z,
                                               int64_t n_elems, const SgldParams<float>& p) {
  const Update512 u = update_setup_avx512(p);
  for (int64_t e = 0; e < n_elems; e += 16) {
    const __mmask16 m =
        n_elems - e >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n_elems - e)) - 1);
    const __m512 v =
        update_avx512(u, _mm512_maskz_loadu_ps(m, x + e), _mm512_maskz_loadu_ps(m, g + e),
                      _mm512_maskz_loadu_ps(m, z + e));
    _mm512_mask_storeu_ps(x + e, m, v);
  }
}

// The noise of each 16-group chunk goes from registers straight into the
// update: no round trip of the normals through memory.
template <bool kClip, bool kClamp>
JEM_EXT_TARGET_AVX512 void step_float_avx512_t(float* x, const float* g, int64_t n_elems,
                                               uint64_t seed, uint64_t offset, uint64_t first,
                                               const SgldParams<float>& p) {
  Philox512 s;
  philox_setup_avx512(s, seed, offset, static_cast<uint32_t>(first >> 32));
  const Update512 u = update_setup_avx512(p);
  // Three chunks of 16 groups per iteration: Philox's 6 independent vectors
  // per round keep the multiplier busy through its 5-cycle latency, and 6
  // Box-Muller chains overlap (2 and 4 chunks measured slower or no faster).
  constexpr int kChunks = 3;
  int64_t e = 0;
  for (; e + 64 * kChunks <= n_elems; e += 64 * kChunks) {
    __m512i r[kChunks][4];
    words16_avx512<kChunks>(s, first + static_cast<uint64_t>(e / 4), r);
    __m512 n[kChunks][4];
    normals_of_words_avx512<kChunks>(r, n);
    for (int c = 0; c < kChunks; ++c) {
      for (int j = 0; j < 4; ++j) {
        float* xj = x + e + 64 * c + 16 * j;
        const float* gj = g + e + 64 * c + 16 * j;
        _mm512_storeu_ps(
            xj, update_avx512<kClip, kClamp>(u, _mm512_loadu_ps(xj), _mm512_loadu_ps(gj), n[c][j]));
      }
    }
  }
  for (; e < n_elems; e += 64) {  // the last chunks, the final one partial: masked
    __m512i r[1][4];
    __m512 n[1][4];
    words16_avx512<1>(s, first + static_cast<uint64_t>(e / 4), r);
    normals_of_words_avx512<1>(r, n);
    for (int j = 0; j < 4; ++j) {
      const int64_t left = n_elems - e - 16 * j;
      if (left <= 0) {
        break;
      }
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      float* xj = x + e + 16 * j;
      const __m512 v = update_avx512<kClip, kClamp>(
          u, _mm512_maskz_loadu_ps(m, xj), _mm512_maskz_loadu_ps(m, g + e + 16 * j), n[0][j]);
      _mm512_mask_storeu_ps(xj, m, v);
    }
  }
}

JEM_EXT_TARGET_AVX512 void step_float_avx512(float* x, const float* g, int64_t n_elems,
                                             uint64_t seed, uint64_t offset, uint64_t first,
                                             const SgldParams<float>& p) {
  if (!same_group_hi(first, (n_elems + 63) / 64 * 16)) {
    step_float_baseline(x, g, n_elems, seed, offset, first, p);
    return;
  }
  constexpr float inf = std::numeric_limits<float>::infinity();
  const bool clip = p.grad_clip != inf;
  const bool clamp = p.clamp_min != -inf || p.clamp_max != inf;
  if (clip && clamp) {
    step_float_avx512_t<true, true>(x, g, n_elems, seed, offset, first, p);
  } else if (clip) {
    step_float_avx512_t<true, false>(x, g, n_elems, seed, offset, first, p);
  } else if (clamp) {
    step_float_avx512_t<false, true>(x, g, n_elems, seed, offset, first, p);
  } else {
    step_float_avx512_t<false, false>(x, g, n_elems, seed, offset, first, p);
  }
}

// ---------------------------------------------------------------- AVX2
// As AVX-512 with 4 groups per Philox vector and 8 per packed vector: packed
// lane 2 i holds lane i of vector a, 2 i + 1 lane i of b, and lane l = 4 L + j
// then group 2 j + L.
constexpr int64_t kGroupsA256[4] = {0, 4, 1, 5};
constexpr int64_t kGroupsB256[4] = {2, 6, 3, 7};

struct Philox256 {
  __m256i key0[philox_detail::kRounds], key1[philox_detail::kRounds];
  __m256i r0_c0, r1_c0, r1_c1, r1_c2, groups_a, groups_b;
};

JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256i set1_u32_avx2(uint32_t v) {
  return _mm256_set1_epi32(static_cast<int>(v));
}

// For groups whose high word is group_hi.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void philox_setup_avx2(Philox256& s, uint64_t seed,
                                                          uint64_t offset, uint32_t group_hi) {
  using namespace philox_detail;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round, k0 += kWeyl0, k1 += kWeyl1) {
    s.key0[round] = set1_u32_avx2(k0);
    s.key1[round] = set1_u32_avx2(k1);
  }
  const PhiloxHead h = philox_head(seed, offset, group_hi);
  s.r0_c0 = set1_u32_avx2(h.r0_c0);
  s.r1_c0 = set1_u32_avx2(h.r1_c0);
  s.r1_c1 = set1_u32_avx2(h.r1_c1);
  s.r1_c2 = set1_u32_avx2(h.r1_c2);
  s.groups_a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kGroupsA256));
  s.groups_b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kGroupsB256));
}

// Philox4x32-10 of the 4 groups in the 64-bit lanes of each of group[0..NV):
// words in the low halves of w[v][0..3] (as philox8_avx512).
template <int NV>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void philox4_avx2(const Philox256& s, const __m256i* group,
                                                     __m256i (*w)[4]) {
  using namespace philox_detail;
  const __m256i mul0 = _mm256_set1_epi64x(kMul0);
  const __m256i mul1 = _mm256_set1_epi64x(kMul1);
  __m256i c0[NV], c1[NV], c2[NV], c3[NV];
  for (int v = 0; v < NV; ++v) {  // rounds 0 and 1 (PhiloxHead)
    const __m256i p1 = _mm256_mul_epu32(group[v], mul1);
    const __m256i p0 = _mm256_mul_epu32(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), s.r0_c0), mul0);
    c0[v] = _mm256_xor_si256(p1, s.r1_c0);
    c1[v] = s.r1_c1;
    c2[v] = _mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xB1), s.r1_c2);
    c3[v] = p0;
  }
#pragma GCC unroll 8  // as philox8_avx512: no register copies between rounds
  for (int round = 2; round < kRounds; ++round) {
    for (int v = 0; v < NV; ++v) {
      const __m256i p0 = _mm256_mul_epu32(c0[v], mul0);
      const __m256i p1 = _mm256_mul_epu32(c2[v], mul1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[v]), s.key0[round]);
      c2[v] =
          _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xB1), c3[v]), s.key1[round]);
      c1[v] = p1;
      c3[v] = p0;
    }
  }
  for (int v = 0; v < NV; ++v) {
    w[v][0] = c0[v];
    w[v][1] = c1[v];
    w[v][2] = c2[v];
    w[v][3] = c3[v];
  }
}

JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 fma_avx2(__m256 a, __m256 b, float c) {
  return _mm256_fmadd_ps(a, b, _mm256_set1_ps(c));
}

// The Box-Muller functions take N independent vectors, each step written
// for all N side by side (as at AVX-512).

// log_positive, lane by lane, for x > 0 (the sign bit is then clear).
template <int N>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void log_positive_avx2(const __m256* x, __m256* out) {
  __m256 m[N], ef[N], z[N], p[N];
  for (int i = 0; i < N; ++i) {
    const __m256i bits = _mm256_castps_si256(x[i]);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
    m[i] = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, set1_u32_avx2(0x807fffffu)),
                                               set1_u32_avx2(0x3f000000u)));
    const __m256 small = _mm256_cmp_ps(m[i], _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // small lanes are -1
    ef[i] = _mm256_cvtepi32_ps(e);
    m[i] = _mm256_sub_ps(_mm256_add_ps(m[i], _mm256_and_ps(small, m[i])), _mm256_set1_ps(1.0f));
    z[i] = _mm256_mul_ps(m[i], m[i]);
    p[i] = _mm256_set1_ps(7.0376836292e-2f);
  }
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    for (int i = 0; i < N; ++i) {
      p[i] = fma_avx2(p[i], m[i], c);
    }
  }
  for (int i = 0; i < N; ++i) {
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p[i], m[i]), z[i]);
    y = _mm256_fmadd_ps(ef[i], _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fmadd_ps(z[i], _mm256_set1_ps(-0.5f), y);
    out[i] = _mm256_fmadd_ps(ef[i], _mm256_set1_ps(0.693359375f), _mm256_add_ps(m[i], y));
  }
}

// v with its sign flipped in the lanes where bit 31 of w is set.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 negate_where_avx2(__m256 v, __m256i w) {
  return _mm256_xor_ps(v, _mm256_and_ps(_mm256_castsi256_ps(w), _mm256_set1_ps(-0.0f)));
}

// sincos_turn of t = uniform_open1(r), lane by lane, the quarter turns from
// the word's bits (as sincos_word_avx512, which says why the bits agree).
template <int N>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void sincos_word_avx2(const __m256i* r, __m256* s_out,
                                                         __m256* c_out) {
  __m256i v[N];
  __m256 a[N], z[N], sp[N], cp[N];
  for (int i = 0; i < N; ++i) {
    a[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(r[i], 2), 10)),
                         _mm256_set1_ps(1.57079632679489662f * 2.384185791015625e-7f));
    v[i] = _mm256_add_epi32(r[i], _mm256_set1_epi32(1 << 29));  // q mod 4 in bits 30, 31
    z[i] = _mm256_mul_ps(a[i], a[i]);
    sp[i] = fma_avx2(_mm256_set1_ps(-1.9515295891e-4f), z[i], 8.3321608736e-3f);
    cp[i] = fma_avx2(_mm256_set1_ps(2.443315711809948e-5f), z[i], -1.388731625493765e-3f);
  }
  for (int i = 0; i < N; ++i) {
    sp[i] = fma_avx2(sp[i], z[i], -1.6666654611e-1f);
    cp[i] = fma_avx2(cp[i], z[i], 4.166664568298827e-2f);
  }
  for (int i = 0; i < N; ++i) {
    const __m256 sa = _mm256_fmadd_ps(_mm256_mul_ps(sp[i], z[i]), a[i], a[i]);
    const __m256 ca = _mm256_fmadd_ps(_mm256_mul_ps(cp[i], z[i]), z[i],
                                      fma_avx2(z[i], _mm256_set1_ps(-0.5f), 1.0f));
    // q & 1 (bit 30 of v) moved to the sign bit, where blendv reads it.
    const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(v[i], 1));
    s_out[i] = negate_where_avx2(_mm256_blendv_ps(sa, ca, swap), v[i]);
    c_out[i] = negate_where_avx2(_mm256_blendv_ps(ca, sa, swap),
                                 _mm256_add_epi32(v[i], _mm256_set1_epi32(1 << 30)));
  }
}

// box_muller of the words r0[i], r1[i], lane by lane.
template <int N>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void box_muller_avx2(const __m256i* r0, const __m256i* r1,
                                                        __m256* z0, __m256* z1) {
  __m256 u0[N], lg[N], s[N], c[N];
  for (int i = 0; i < N; ++i) {
    // uniform_open0: (k + 1) * 2^-24 == k * 2^-24 + 2^-24, exact either way (k < 2^24).
    u0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r0[i], 8)),
                            _mm256_set1_ps(5.9604644775390625e-8f),
                            _mm256_set1_ps(5.9604644775390625e-8f));
  }
  log_positive_avx2<N>(u0, lg);
  for (int i = 0; i < N; ++i) {
    lg[i] = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), lg[i]));  // the radius
  }
  sincos_word_avx2<N>(r1, s, c);
  for (int i = 0; i < N; ++i) {
    z0[i] = _mm256_mul_ps(lg[i], c[i]);
    z1[i] = _mm256_mul_ps(lg[i], s[i]);
  }
}

// The Philox words of the NC chunks of 8 groups from `first`: r[c][k] holds
// word k of chunk c's groups, lane l = 4 L + j holding group 2 j + L.
template <int NC>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void words8_avx2(const Philox256& s, uint64_t first,
                                                    __m256i (*r)[4]) {
  const __m256i base = _mm256_set1_epi64x(static_cast<long long>(first));
  __m256i group[2 * NC], w[2 * NC][4];
  for (int c = 0; c < NC; ++c) {
    const __m256i chunk = _mm256_add_epi64(base, _mm256_set1_epi64x(8 * c));
    group[2 * c] = _mm256_add_epi64(chunk, s.groups_a);
    group[2 * c + 1] = _mm256_add_epi64(chunk, s.groups_b);
  }
  philox4_avx2<2 * NC>(s, group, w);
  for (int c = 0; c < NC; ++c) {
    for (int k = 0; k < 4; ++k) {  // a's low halves in the even lanes, b's in the odd
      r[c][k] = _mm256_blend_epi32(w[2 * c][k], _mm256_slli_epi64(w[2 * c + 1][k], 32), 0xAA);
    }
  }
}

// The normals of NC chunks' words r, in element order: out[c][j] holds
// elements 8 j .. 8 j + 7 of chunk c (its groups 2 j, 2 j + 1).
template <int NC>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void normals_of_words_avx2(const __m256i (*r)[4],
                                                              __m256 (*out)[4]) {
  __m256i r0[2 * NC], r1[2 * NC];
  __m256 z0[2 * NC], z1[2 * NC];
  for (int c = 0; c < NC; ++c) {
    r0[2 * c] = r[c][0];
    r1[2 * c] = r[c][1];
    r0[2 * c + 1] = r[c][2];
    r1[2 * c + 1] = r[c][3];
  }
  box_muller_avx2<2 * NC>(r0, r1, z0, z1);
  for (int c = 0; c < NC; ++c) {
    const __m256 n0 = z0[2 * c], n1 = z1[2 * c], n2 = z0[2 * c + 1], n3 = z1[2 * c + 1];
    const __m256d a = _mm256_castps_pd(_mm256_unpacklo_ps(n0, n1));
    const __m256d b = _mm256_castps_pd(_mm256_unpackhi_ps(n0, n1));
    const __m256d cc = _mm256_castps_pd(_mm256_unpacklo_ps(n2, n3));
    const __m256d d = _mm256_castps_pd(_mm256_unpackhi_ps(n2, n3));
    out[c][0] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, cc));
    out[c][1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, cc));
    out[c][2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
    out[c][3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
  }
}

JEM_EXT_TARGET_AVX2 void normals_avx2(float* __restrict z, uint64_t seed, uint64_t offset,
                                      uint64_t first, int64_t count) {
  if (!same_group_hi(first, (count + 7) / 8 * 8)) {
    normals_baseline(z, seed, offset, first, count);
    return;
  }
  Philox256 s;
  philox_setup_avx2(s, seed, offset, static_cast<uint32_t>(first >> 32));
  for (int64_t i = 0; i < count; i += 8) {
    __m256i r[1][4];
    __m256 n[1][4];
    words8_avx2<1>(s, first + static_cast<uint64_t>(i), r);
    normals_of_words_avx2<1>(r, n);
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(z + 4 * i + 8 * j, n[0][j]);
    }
  }
}

struct Update256 {
  __m256 step, std_, clip_lo, clip_hi, lo, hi;
};

JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE Update256 update_setup_avx2(const SgldParams<float>& p) {
  return Update256{_mm256_set1_ps(p.step_size),  _mm256_set1_ps(p.noise_std),
                   _mm256_set1_ps(-p.grad_clip), _mm256_set1_ps(p.grad_clip),
                   _mm256_set1_ps(p.clamp_min),  _mm256_set1_ps(p.clamp_max)};
}

// sgld_update<float>, lane by lane (max and min as in update_avx512).
template <bool kClip = true, bool kClamp = true>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 update_avx2(const Update256& u, __m256 x, __m256 g,
                                                      __m256 z) {
  if (kClip) {
    g = _mm256_min_ps(u.clip_hi, _mm256_max_ps(u.clip_lo, g));
  }
  const __m256 moved = _mm256_sub_ps(x, _mm256_mul_ps(u.step, g));
  const __m256 v = _mm256_add_ps(moved, _mm256_mul_ps(u.std_, z));
  return kClamp ? _mm256_min_ps(u.hi, _mm256_max_ps(u.lo, v)) : v;
}

JEM_EXT_TARGET_AVX2 void update_float_avx2(float* x, const float* g, const float* __restrict z,
                                           int64_t n_elems, const SgldParams<float>& p) {
  const Update256 u = update_setup_avx2(p);
  int64_t e = 0;
  for (; e + 8 <= n_elems; e += 8) {
    _mm256_storeu_ps(x + e, update_avx2(u, _mm256_loadu_ps(x + e), _mm256_loadu_ps(g + e),
                                        _mm256_loadu_ps(z + e)));
  }
  update_loop<float, float>(x, g, z, e, n_elems, p);
}

template <bool kClip, bool kClamp>
JEM_EXT_TARGET_AVX2 void step_float_avx2_t(float* x, const float* g, int64_t n_elems, uint64_t seed,
                                           uint64_t offset, uint64_t first,
                                           const SgldParams<float>& p) {
  Philox256 s;
  philox_setup_avx2(s, seed, offset, static_cast<uint32_t>(first >> 32));
  const Update256 u = update_setup_avx2(p);
  // Chunks of 8 groups per iteration, as step_float_avx512 (with 16 vector
  // registers, 3 measured slower).
  constexpr int kChunks = 2;
  int64_t e = 0;
  for (; e + 32 * kChunks <= n_elems; e += 32 * kChunks) {
    __m256i r[kChunks][4];
    words8_avx2<kChunks>(s, first + static_cast<uint64_t>(e / 4), r);
    __m256 n[kChunks][4];
    normals_of_words_avx2<kChunks>(r, n);
    for (int c = 0; c < kChunks; ++c) {
      for (int j = 0; j < 4; ++j) {
        float* xj = x + e + 32 * c + 8 * j;
        const float* gj = g + e + 32 * c + 8 * j;
        _mm256_storeu_ps(
            xj, update_avx2<kClip, kClamp>(u, _mm256_loadu_ps(xj), _mm256_loadu_ps(gj), n[c][j]));
      }
    }
  }
  for (; e < n_elems; e += 32) {  // the last chunks, the final one partial: through a buffer
    alignas(32) float z[32];
    __m256i r[1][4];
    __m256 n[1][4];
    words8_avx2<1>(s, first + static_cast<uint64_t>(e / 4), r);
    normals_of_words_avx2<1>(r, n);
    for (int j = 0; j < 4; ++j) {
      _mm256_store_ps(z + 8 * j, n[0][j]);
    }
    update_loop<float, float>(x + e, g + e, z, 0, std::min<int64_t>(32, n_elems - e), p);
  }
}

JEM_EXT_TARGET_AVX2 void step_float_avx2(float* x, const float* g, int64_t n_elems, uint64_t seed,
                                         uint64_t offset, uint64_t first,
                                         const SgldParams<float>& p) {
  if (!same_group_hi(first, (n_elems + 31) / 32 * 8)) {
    step_float_baseline(x, g, n_elems, seed, offset, first, p);
    return;
  }
  constexpr float inf = std::numeric_limits<float>::infinity();
  const bool clip = p.grad_clip != inf;
  const bool clamp = p.clamp_min != -inf || p.clamp_max != inf;
  if (clip && clamp) {
    step_float_avx2_t<true, true>(x, g, n_elems, seed, offset, first, p);
  } else if (clip) {
    step_float_avx2_t<true, false>(x, g, n_elems, seed, offset, first, p);
  } else if (clamp) {
    step_float_avx2_t<false, true>(x, g, n_elems, seed, offset, first, p);
  } else {
    step_float_avx2_t<false, false>(x, g, n_elems, seed, offset, first, p);
  }
}
#endif  // JEM_EXT_X86_LEVELS

const SgldKernels& sgld_kernels(CpuLevel level) {
  static constexpr SgldKernels kBaseline{normals_baseline, step_float_baseline,
                                         update_float_baseline};
#if JEM_EXT_X86_LEVELS
  static constexpr SgldKernels kAvx2{normals_avx2, step_float_avx2, update_float_avx2};
  static constexpr SgldKernels kAvx512{normals_avx512, step_float_avx512, update_float_avx512};
  return for_level(level, kBaseline, kAvx2, kAvx512);
#else
  return for_level(level, kBaseline, kBaseline, kBaseline);
#endif
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
    const bool noise = p.noise_std != acc_t(0);
    if (!noise) std::fill(z, z + 4 * kBlockGroups, 0.0f);  // once: nothing writes z then
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first_group = blk * kBlockGroups;
      const int64_t groups = std::min(kBlockGroups, n_groups - first_group);
      const int64_t first_elem = first_group * 4;
      const int64_t elems = std::min(groups * 4, n - first_elem);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (noise) {
          k.step_float(x + first_elem, g + first_elem, elems, seed, offset,
                       static_cast<uint64_t>(first_group), p);
        } else {
          k.update_float(x + first_elem, g + first_elem, z, elems, p);
        }
      } else {
        if (noise) k.normals(z, seed, offset, static_cast<uint64_t>(first_group), groups);
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
