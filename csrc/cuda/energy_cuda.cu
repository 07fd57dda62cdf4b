// CUDA launcher of energy / energy_ce / energy_backward: a sub-warp of
// kLanes threads per row (kLanes chosen from the number of classes), a
// two-pass reduction (max, then sum of exp(l - max)) with warp
// shuffles, and the shared per-row math of csrc/energy.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../checks.h"
#include "../energy.h"

namespace jem_ext {
namespace {

constexpr int kThreads = 256;

template <int kLanes, typename T>
__device__ __forceinline__ T lanes_max(T v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2)
    v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o, kLanes));
  return v;
}

template <int kLanes, typename T>
__device__ __forceinline__ T lanes_sum(T v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, kLanes);
  return v;
}

template <typename acc_t>
struct RowStats {
  acc_t m;    // row max (NaN wins)
  acc_t sum;  // sum_c exp(l_c - lse_shift(m))
};

// Max and shifted sum of row `l` (length C), computed by the kLanes lanes of
// one sub-warp; every lane returns the same values.
template <int kLanes, typename scalar_t, typename acc_t>
__device__ __forceinline__ RowStats<acc_t> row_stats(const scalar_t* __restrict__ l, int64_t C,
                                                     int lane) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = lane; c < C; c += kLanes) m = max_nan(m, static_cast<acc_t>(l[c]));
  m = lanes_max<kLanes>(m);
  const acc_t shift = lse_shift(m);
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += kLanes) s += exp_acc(static_cast<acc_t>(l[c]) - shift);
  return {m, lanes_sum<kLanes>(s)};
}

// A label out of range: the host refuses it before launching (see
// check_labels_on_host); during CUDA-graph capture the host cannot read the
// labels, so the kernels write NaN for that row instead of trapping.
__device__ __forceinline__ bool label_ok(int64_t t, int64_t C) { return t >= 0 && t < C; }

// energy = -lse, and with y also ce = lse - l[y].
template <int kLanes, typename scalar_t, typename acc_t>
__global__ void energy_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ y,
                              int64_t B, int64_t C, scalar_t* __restrict__ energy,
                              scalar_t* __restrict__ ce) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  // Rows past the end recompute the last row and write nothing: every lane
  // of the warp must reach the shuffles.
  const bool valid = row < B;
  const scalar_t* l = logits + (valid ? row : B - 1) * C;
  const RowStats<acc_t> st = row_stats<kLanes, scalar_t, acc_t>(l, C, lane);
  const acc_t lse = lse_finish(st.m, st.sum);
  if (valid && lane == 0) {
    energy[row] = static_cast<scalar_t>(-lse);
    if (ce != nullptr) {
      const int64_t t = y[row];
      ce[row] = label_ok(t, C)
                    ? static_cast<scalar_t>(ce_finish(st.m, st.sum, lse, static_cast<acc_t>(l[t])))
                    : static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    }
  }
}

template <typename scalar_t>
__global__ void pick_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ y,
                            int64_t B, int64_t C, scalar_t* __restrict__ energy) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= B) return;
  const int64_t t = y[row];
  energy[row] = label_ok(t, C) ? static_cast<scalar_t>(-logits[row * C + t])
                               : static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
}

template <int kLanes, typename scalar_t, typename acc_t>
__global__ void energy_backward_kernel(const scalar_t* __restrict__ logits,
                                       const int64_t* __restrict__ y,
                                       const acc_t* __restrict__ energy,
                                       const acc_t* __restrict__ grad_lse,
                                       const acc_t* __restrict__ grad_pick, int64_t B, int64_t C,
                                       scalar_t* __restrict__ grad) {
  int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  const bool valid = row < B;  // see energy_kernel: all lanes reach the shuffles
  row = valid ? row : B - 1;
  const scalar_t* l = logits + row * C;
  scalar_t* out = grad + row * C;
  const acc_t glse = grad_lse != nullptr ? grad_lse[row] : acc_t(0);
  acc_t gpick = grad_pick != nullptr ? grad_pick[row] : acc_t(0);
  const int64_t target = y != nullptr ? y[row] : -1;
  if (y != nullptr && !label_ok(target, C)) {
    gpick = std::numeric_limits<acc_t>::quiet_NaN();  // the whole row becomes NaN
  }
  acc_t lse = 0;
  acc_t scale = 0;
  if (grad_lse != nullptr) {
    if (energy != nullptr) {
      lse = -energy[row];
    } else {
      const RowStats<acc_t> st = row_stats<kLanes, scalar_t, acc_t>(l, C, lane);
      lse = lse_finish(st.m, st.sum);
    }
    acc_t s = 0;
    for (int64_t c = lane; c < C; c += kLanes) s += exp_acc(static_cast<acc_t>(l[c]) - lse);
    scale = grad_row_scale(glse, lanes_sum<kLanes>(s));
  }
  if (!valid) return;
  const bool bad_label = gpick != gpick;
  for (int64_t c = lane; c < C; c += kLanes) {
    const acc_t e = grad_lse != nullptr ? exp_acc(static_cast<acc_t>(l[c]) - lse) : acc_t(0);
    out[c] = static_cast<scalar_t>(energy_grad(e, scale, gpick, bad_label || c == target));
  }
}

// Calls launch(std::integral_constant<int, kLanes>) with kLanes in
// {2, 4, 8, 16, 32}: about two logits per lane for small C, a warp per row
// beyond 64 classes.
template <typename Launch>
void with_lanes(int64_t C, const Launch& launch) {
  if (C <= 4)
    launch(std::integral_constant<int, 2>{});
  else if (C <= 8)
    launch(std::integral_constant<int, 4>{});
  else if (C <= 16)
    launch(std::integral_constant<int, 8>{});
  else if (C <= 32)
    launch(std::integral_constant<int, 16>{});
  else
    launch(std::integral_constant<int, 32>{});
}

unsigned blocks_for(int64_t rows, int lanes) {
  const int64_t threads = rows * lanes;
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

// Refuses labels out of range with the CPU's message. A device-side assert
// would leave the CUDA context unusable, so the labels are read here, on the
// host. That read synchronises with the device, which CUDA-graph capture
// forbids: while the stream is capturing the check is skipped and the
// kernels mark such rows NaN (label_ok).
void check_labels_on_host(const char* op, const at::Tensor& y, int64_t C) {
  if (y.numel() == 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return;
  }
  const at::Tensor bad = y.lt(0).logical_or_(y.ge(C)).nonzero();
  if (bad.size(0) == 0) return;
  const int64_t b = bad[0][0].item<int64_t>();
  check_label(op, b, y[b].item<int64_t>(), C);
}

at::Tensor energy_cuda(const at::Tensor& logits_in, const c10::optional<at::Tensor>& y_in) {
  check_logits("energy", logits_in, y_in);
  check_device_type("energy", logits_in, at::kCUDA);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({B}, logits.options());
  if (B == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool has_y = y_in.has_value() && y_in->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (has_y) {
          const at::Tensor y = y_in->contiguous();
          check_labels_on_host("energy", y, C);
          pick_kernel<scalar_t><<<blocks_for(B, 1), kThreads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), B, C, out.data_ptr<scalar_t>());
        } else {
          with_lanes(C, [&](auto lanes) {
            energy_kernel<decltype(lanes)::value, scalar_t, acc_t>
                <<<blocks_for(B, lanes), kThreads, 0, stream>>>(
                    logits.data_ptr<scalar_t>(), nullptr, B, C, out.data_ptr<scalar_t>(), nullptr);
          });
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> energy_ce_cuda(const at::Tensor& logits_in,
                                                  const at::Tensor& y_in) {
  check_labels_given("energy_ce", y_in);
  check_logits("energy_ce", logits_in, y_in);
  check_device_type("energy_ce", logits_in, at::kCUDA);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  check_labels_on_host("energy_ce", y, C);
  at::Tensor energy = at::empty({B}, logits.options());
  at::Tensor ce = at::empty({B}, logits.options());
  if (B == 0) return {energy, ce};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_ce_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_lanes(C, [&](auto lanes) {
          energy_kernel<decltype(lanes)::value, scalar_t, acc_t>
              <<<blocks_for(B, lanes), kThreads, 0, stream>>>(
                  logits.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), B, C,
                  energy.data_ptr<scalar_t>(), ce.data_ptr<scalar_t>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {energy, ce};
}

at::Tensor energy_backward_cuda(const at::Tensor& logits_in, const c10::optional<at::Tensor>& y_in,
                                const c10::optional<at::Tensor>& energy_in,
                                const c10::optional<at::Tensor>& grad_lse_in,
                                const c10::optional<at::Tensor>& grad_pick_in) {
  const char* op = "energy_backward";
  check_backward_inputs(op, logits_in, y_in, energy_in, grad_lse_in, grad_pick_in);
  check_device_type(op, logits_in, at::kCUDA);
  const bool has_y = y_in.has_value() && y_in->defined();
  const bool has_lse = grad_lse_in.has_value() && grad_lse_in->defined();
  const bool has_pick = grad_pick_in.has_value() && grad_pick_in->defined();
  const bool has_energy = energy_in.has_value() && energy_in->defined();
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor grad = at::empty_like(logits);
  if (B == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
        at::Tensor y, energy, grad_lse, grad_pick;
        if (has_y) {
          y = y_in->contiguous();
          check_labels_on_host(op, y, C);
        }
        if (has_lse) grad_lse = grad_lse_in->to(acc_type).contiguous();
        if (has_pick) grad_pick = grad_pick_in->to(acc_type).contiguous();
        if (has_lse && has_energy) energy = energy_in->to(acc_type).contiguous();
        with_lanes(C, [&](auto lanes) {
          energy_backward_kernel<decltype(lanes)::value, scalar_t, acc_t>
              <<<blocks_for(B, lanes), kThreads, 0, stream>>>(
                  logits.data_ptr<scalar_t>(), has_y ? y.data_ptr<int64_t>() : nullptr,
                  energy.defined() ? energy.data_ptr<acc_t>() : nullptr,
                  has_lse ? grad_lse.data_ptr<acc_t>() : nullptr,
                  has_pick ? grad_pick.data_ptr<acc_t>() : nullptr, B, C,
                  grad.data_ptr<scalar_t>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

}  // namespace
}  // namespace jem_ext

TORCH_LIBRARY_IMPL(jem_ext, CUDA, m) {
  m.impl("energy", &jem_ext::energy_cuda);
  m.impl("energy_ce", &jem_ext::energy_ce_cuda);
  m.impl("energy_backward", &jem_ext::energy_backward_cuda);
}
