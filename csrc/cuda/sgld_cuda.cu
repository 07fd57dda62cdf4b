// CUDA launcher of sgld_step_: one thread per group of 4 elements draws one
// Philox block (csrc/philox.h) and applies the shared update (csrc/sgld.h).
// The generator state comes from philox_cuda_state, so the op is safe under
// CUDA-graph capture. This file is compiled with -fmad=false: with the
// explicit fmas in philox.h, it then rounds exactly as the CPU kernel does.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/cuda/PhiloxUtils.cuh>

#include <mutex>

#include "../checks.h"
#include "../philox.h"
#include "../sgld.h"

namespace jem_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Pack4 {
  scalar_t v[4];
};

// `g` carries no __restrict__: grad may be x itself (each element is read
// before it is written, by the same thread), and a restrict-qualified
// read-only pointer into memory the kernel writes would let the compiler
// route its loads through the non-coherent read-only cache.
//
// The loads of x and g are issued before the ~200 instructions of
// Philox/Box-Muller, so their latency overlaps the noise math instead of
// being hidden by occupancy alone.
template <typename scalar_t, typename acc_t, bool kVectorized>
__global__ void sgld_kernel(scalar_t* x, const scalar_t* g, int64_t n, SgldParams<acc_t> p,
                            at::PhiloxCudaState rng) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t e0 = group * 4;
  if (e0 >= n) return;
  const bool full = kVectorized && e0 + 4 <= n;
  acc_t xv[4] = {0, 0, 0, 0};
  acc_t gv[4] = {0, 0, 0, 0};
  if (full) {
    const Pack4<scalar_t> xp = *reinterpret_cast<const Pack4<scalar_t>*>(x + e0);
    const Pack4<scalar_t> gp = *reinterpret_cast<const Pack4<scalar_t>*>(g + e0);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      xv[k] = static_cast<acc_t>(xp.v[k]);
      gv[k] = static_cast<acc_t>(gp.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (e0 + k < n) {
        xv[k] = static_cast<acc_t>(x[e0 + k]);
        gv[k] = static_cast<acc_t>(g[e0 + k]);
      }
    }
  }
  const auto seeds = at::cuda::philox::unpack(rng);
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  if (p.noise_std != acc_t(0)) {
    normal4(std::get<0>(seeds), std::get<1>(seeds), static_cast<uint64_t>(group), z);
  }
  if (full) {
    Pack4<scalar_t> out;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out.v[k] = static_cast<scalar_t>(sgld_update<acc_t>(xv[k], gv[k], z[k], p));
    }
    *reinterpret_cast<Pack4<scalar_t>*>(x + e0) = out;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (e0 + k < n) x[e0 + k] = static_cast<scalar_t>(sgld_update<acc_t>(xv[k], gv[k], z[k], p));
    }
  }
}

void sgld_cuda(at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
               c10::optional<double> clamp_min, c10::optional<double> clamp_max,
               c10::optional<double> grad_clip, at::PhiloxCudaState rng) {
  at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const at::Tensor gc = grad.contiguous();
  const int64_t n = xc.numel();
  if (n > 0) {
    const int64_t groups = (n + 3) / 4;
    const int64_t blocks = (groups + kThreads - 1) / kThreads;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
                "sgld_step_: tensor too large for one launch (", n, " elements)");
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "sgld_step_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const auto p =
              make_sgld_params<acc_t>(step_size, noise_std, clamp_min, clamp_max, grad_clip);
          scalar_t* xp = xc.data_ptr<scalar_t>();
          const scalar_t* gp = gc.data_ptr<scalar_t>();
          const auto align = 4 * sizeof(scalar_t);
          const bool vec = reinterpret_cast<uintptr_t>(xp) % align == 0 &&
                           reinterpret_cast<uintptr_t>(gp) % align == 0;
          if (vec) {
            sgld_kernel<scalar_t, acc_t, true>
                <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xp, gp, n, p, rng);
          } else {
            sgld_kernel<scalar_t, acc_t, false>
                <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xp, gp, n, p, rng);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  if (!xc.is_same(x)) {
    x.copy_(xc);
  }
}

void sgld_step_cuda(at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
                    c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                    c10::optional<double> grad_clip, c10::optional<at::Generator> generator) {
  check_sgld_inputs("sgld_step_", x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip);
  TORCH_CHECK(x.is_cuda(), "sgld_step_: expected CUDA tensors, got ", x.device());
  c10::cuda::CUDAGuard device_guard(x.device());
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
  at::PhiloxCudaState rng;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    rng = gen->philox_cuda_state(kSgldOffsetIncrement);
  }
  sgld_cuda(x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip, rng);
}

void sgld_step_philox_cuda(at::Tensor& x, const at::Tensor& grad, double step_size,
                           double noise_std, c10::optional<double> clamp_min,
                           c10::optional<double> clamp_max, c10::optional<double> grad_clip,
                           int64_t seed, int64_t offset) {
  check_sgld_inputs("_sgld_step_philox_", x, grad, step_size, noise_std, clamp_min, clamp_max,
                    grad_clip);
  TORCH_CHECK(x.is_cuda(), "_sgld_step_philox_: expected CUDA tensors, got ", x.device());
  TORCH_CHECK(offset >= 0 && offset % 4 == 0,
              "_sgld_step_philox_: offset must be a non-negative multiple of 4, got ", offset);
  c10::cuda::CUDAGuard device_guard(x.device());
  sgld_cuda(x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip,
            at::PhiloxCudaState(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)));
}

}  // namespace
}  // namespace jem_ext

TORCH_LIBRARY_IMPL(jem_ext, CUDA, m) {
  m.impl("sgld_step_", &jem_ext::sgld_step_cuda);
  m.impl("_sgld_step_philox_", &jem_ext::sgld_step_philox_cuda);
}
