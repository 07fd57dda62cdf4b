// CPU launcher of sgld_step_: Philox noise in blocks, then the shared
// per-element update (csrc/sgld.h), parallel over element groups.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(JEM_EXT_NO_CLONES)
#include <immintrin.h>
#define JEM_EXT_HAVE_AVX512_PHILOX 1
#else
#define JEM_EXT_HAVE_AVX512_PHILOX 0
#endif

#include "../checks.h"
#include "../philox.h"
#include "../sgld.h"
#include "vectorize.h"

namespace jem_ext {
namespace {

// Element groups (of 4) per noise block: 1024 elements, 4 KiB of normals,
// small enough to stay in L1 between drawing and using them.
constexpr int64_t kBlockGroups = 256;

using Words = uint32_t[4][kBlockGroups];

// r[k][i] = word k of the Philox block of group first + i, for i < count:
// the portable loop (auto-vectorised per CPU level).
JEM_EXT_VECTORIZE void philox_words_portable(Words& r, uint64_t seed, uint64_t offset,
                                             uint64_t first, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const Uint4 b = philox_block(seed, offset, first + static_cast<uint64_t>(i));
    r[0][i] = b.x;
    r[1][i] = b.y;
    r[2][i] = b.z;
    r[3][i] = b.w;
  }
}

#if JEM_EXT_HAVE_AVX512_PHILOX
// The same words, 16 groups per AVX-512 vector. Compilers vectorise the
// portable loop's 32x32->64-bit products poorly; here each round is two
// even/odd vpmuludq pairs and blends, 2.1x faster than the AVX-512 clone of
// the portable loop. Bit-identical to philox4x32_10 (the tests compare the
// noise with an independent NumPy Philox).
__attribute__((target("avx512f"))) void philox_words_avx512(Words& r, uint64_t seed,
                                                            uint64_t offset, uint64_t first,
                                                            int64_t count) {
  const uint64_t step = offset / 4;
  const __m512i mul0 = _mm512_set1_epi64(0xD2511F53u);
  const __m512i mul1 = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr __mmask16 kOdd = 0xAAAA;
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
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i e0 = _mm512_mul_epu32(c0, mul0);  // products of the even lanes
      const __m512i o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), mul0);  // odd lanes
      const __m512i e1 = _mm512_mul_epu32(c2, mul1);
      const __m512i o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), mul1);
      const __m512i lo0 = _mm512_mask_blend_epi32(kOdd, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi0 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo1 = _mm512_mask_blend_epi32(kOdd, e1, _mm512_slli_epi64(o1, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e1, 32), o1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1),
                            _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3),
                            _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm512_storeu_si512(&r[0][i], c0);
    _mm512_storeu_si512(&r[1][i], c1);
    _mm512_storeu_si512(&r[2][i], c2);
    _mm512_storeu_si512(&r[3][i], c3);
  }
  for (; i < count; ++i) {
    const Uint4 b = philox_block(seed, offset, first + static_cast<uint64_t>(i));
    r[0][i] = b.x;
    r[1][i] = b.y;
    r[2][i] = b.z;
    r[3][i] = b.w;
  }
}

// AVX-512 when the CPU has it, unless JEM_EXT_DISABLE_AVX512 is set (the
// tests use it to check that both paths draw the same numbers).
bool use_avx512_philox() {
  static const bool use =
      __builtin_cpu_supports("avx512f") && std::getenv("JEM_EXT_DISABLE_AVX512") == nullptr;
  return use;
}
#endif

// z[4 * i + k] = normal k of the block words r[.][i], for i < count.
JEM_EXT_VECTORIZE void box_muller_block(float* __restrict z, const Words& r, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    box_muller(r[0][i], r[1][i], &z[4 * i], &z[4 * i + 1]);
    box_muller(r[2][i], r[3][i], &z[4 * i + 2], &z[4 * i + 3]);
  }
}

// z[4 * i + k] = normal k of group first + i, for i < count.
void fill_normals(float* z, uint64_t seed, uint64_t offset, uint64_t first, int64_t count) {
  alignas(64) Words r;
#if JEM_EXT_HAVE_AVX512_PHILOX
  if (use_avx512_philox()) {
    philox_words_avx512(r, seed, offset, first, count);
  } else {
    philox_words_portable(r, seed, offset, first, count);
  }
#else
  philox_words_portable(r, seed, offset, first, count);
#endif
  box_muller_block(z, r, count);
}

template <typename scalar_t, typename acc_t>
JEM_EXT_INLINE void update_block(scalar_t* __restrict x, const scalar_t* __restrict g,
                         const float* __restrict z, int64_t n_elems,
                         const SgldParams<acc_t>& p) {
  for (int64_t e = 0; e < n_elems; ++e) {
    x[e] = static_cast<scalar_t>(
        sgld_update<acc_t>(static_cast<acc_t>(x[e]), static_cast<acc_t>(g[e]), z[e], p));
  }
}

// The float32 update, cloned for AVX2 like the noise.
JEM_EXT_VECTORIZE void update_block_float(float* __restrict x, const float* __restrict g,
                                          const float* __restrict z, int64_t n_elems,
                                          const SgldParams<float>& p) {
  update_block<float, float>(x, g, z, n_elems, p);
}

template <typename scalar_t, typename acc_t>
void sgld_cpu_kernel(scalar_t* x, const scalar_t* g, int64_t n, const SgldParams<acc_t>& p,
                     uint64_t seed, uint64_t offset) {
  const int64_t n_groups = (n + 3) / 4;
  const int64_t n_blocks = (n_groups + kBlockGroups - 1) / kBlockGroups;
  // ~16k elements per task: below that, threads cost more than they save.
  at::parallel_for(0, n_blocks, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float z[4 * kBlockGroups];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first_group = blk * kBlockGroups;
      const int64_t groups = std::min(kBlockGroups, n_groups - first_group);
      const int64_t first_elem = first_group * 4;
      const int64_t elems = std::min(groups * 4, n - first_elem);
      if (p.noise_std != acc_t(0)) {
        fill_normals(z, seed, offset, static_cast<uint64_t>(first_group), groups);
      } else {
        std::fill(z, z + 4 * kBlockGroups, 0.0f);
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        update_block_float(x + first_elem, g + first_elem, z, elems, p);
      } else {
        update_block<scalar_t, acc_t>(x + first_elem, g + first_elem, z, elems, p);
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "sgld_step_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto p = make_sgld_params<acc_t>(step_size, noise_std, clamp_min, clamp_max,
                                             grad_clip);
      sgld_cpu_kernel<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), n, p,
                                       seed, offset);
    });
  }
  if (!xc.is_same(x)) {
    x.copy_(xc);
  }
}

void sgld_step_cpu(at::Tensor& x, const at::Tensor& grad, double step_size,
                          double noise_std, c10::optional<double> clamp_min,
                          c10::optional<double> clamp_max, c10::optional<double> grad_clip,
                          c10::optional<at::Generator> generator) {
  check_sgld_inputs("sgld_step_", x, grad, noise_std, clamp_min, clamp_max, grad_clip);
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

void sgld_step_philox_cpu(at::Tensor& x, const at::Tensor& grad, double step_size,
                                 double noise_std, c10::optional<double> clamp_min,
                                 c10::optional<double> clamp_max,
                                 c10::optional<double> grad_clip, int64_t seed,
                                 int64_t offset) {
  check_sgld_inputs("_sgld_step_philox_", x, grad, noise_std, clamp_min, clamp_max,
                    grad_clip);
  TORCH_CHECK(x.device().is_cpu(), "_sgld_step_philox_: expected CPU tensors, got ",
              x.device());
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
