// CPU launcher of sgld_step_: Philox noise in blocks, then the shared
// per-element update (csrc/sgld.h), parallel over element groups.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <mutex>

#include "../checks.h"
#include "../philox.h"
#include "../sgld.h"
#include "vectorize.h"

namespace jem_ext {
namespace {

// Element groups (of 4) per noise block: 1024 elements, 4 KiB of normals,
// small enough to stay in L1 between drawing and using them.
constexpr int64_t kBlockGroups = 256;

// z[4 * i + k] = normal k of group first + i, for i < count.
JEM_EXT_VECTORIZE void fill_normals(float* __restrict z, uint64_t seed, uint64_t offset,
                                    uint64_t first, int64_t count) {
  uint32_t r[4][kBlockGroups];
  for (int64_t i = 0; i < count; ++i) {
    const Uint4 b = philox_block(seed, offset, first + static_cast<uint64_t>(i));
    r[0][i] = b.x;
    r[1][i] = b.y;
    r[2][i] = b.z;
    r[3][i] = b.w;
  }
  for (int64_t i = 0; i < count; ++i) {
    box_muller(r[0][i], r[1][i], &z[4 * i], &z[4 * i + 1]);
    box_muller(r[2][i], r[3][i], &z[4 * i + 2], &z[4 * i + 3]);
  }
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
