// CUDA launcher of energy / energy_ce / energy_backward and of the
// deferred label check.
//
// Rows are reduced by a group of threads, two passes (max, then sum of
// exp(l - max)) and the shared per-row math of csrc/energy.h:
//   C <= 32           a sub-warp of kLanes = 2..16 threads per row (scalar loads);
//   up to ~2k classes a warp per row;
//   more, or few rows one block per row (64..1024 threads), so that an
//                     ImageNet head with a small batch, or 100k classes, fills the GPU.
// Warps and blocks read their row with 16-byte vector loads between a
// scalar head (up to the first 16-byte boundary) and a scalar tail, so any C,
// any dtype and any row offset work.
//
// Labels out of range cannot be refused on the host without reading the
// labels back (a synchronisation per call) and a device-side assert would
// leave the CUDA context unusable. The kernels therefore write NaN for such
// a row and record the first bad label they meet (op, row, value, classes)
// in a small per-device record; _take_label_error copies and clears it in
// stream order, and jem_ext.ops.raise_label_errors raises the CPU's message
// from it at a point where the host reads the device anyway.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "../energy.h"

namespace jem_ext {
namespace {

constexpr int kThreads = 256;

// ----------------------------------------------------------- label record

// Op codes of the record; jem_ext/ops.py (_LABEL_ERROR_OPS) maps them back.
constexpr long long kOpEnergy = 1;
constexpr long long kOpEnergyCe = 2;
constexpr long long kOpEnergyBackward = 3;

// {taken, op, row, label, classes}: one per device (a module-scope variable
// exists once in every device context), zero at load; no allocation, so
// kernels that use it can be captured in a CUDA graph at any time.
__device__ unsigned long long g_label_error[5];

__device__ __forceinline__ bool label_ok(int64_t t, int64_t C) { return t >= 0 && t < C; }

// The first bad label since the last _take_label_error wins the record.
__device__ void record_bad_label(long long op, int64_t row, int64_t label, int64_t C) {
  if (atomicCAS(&g_label_error[0], 0ull, 1ull) == 0ull) {
    g_label_error[1] = static_cast<unsigned long long>(op);
    g_label_error[2] = static_cast<unsigned long long>(row);
    g_label_error[3] = static_cast<unsigned long long>(label);
    g_label_error[4] = static_cast<unsigned long long>(C);
  }
}

// ------------------------------------------------------------ row groups

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

// kLanes lanes of one warp share a row; rows past the end recompute the last
// row and write nothing (every lane of the warp must reach the shuffles).
template <int kLanes>
struct SubWarp {
  static constexpr bool kVectorised = kLanes == 32;
  int64_t row;
  int rank;
  bool valid;
  __device__ explicit SubWarp(int64_t B) {
    const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
    valid = r < B;
    row = valid ? r : B - 1;
    rank = static_cast<int>(threadIdx.x % kLanes);
  }
  __device__ int size() const { return kLanes; }
  template <typename T>
  __device__ T max(T v) const {
    return lanes_max<kLanes>(v);
  }
  template <typename T>
  __device__ T sum(T v) const {
    return lanes_sum<kLanes>(v);
  }
};

// All threads of a block (a multiple of 32, at most 1024) share row
// blockIdx.x.
struct WholeBlock {
  static constexpr bool kVectorised = true;
  int64_t row;
  int rank;
  bool valid = true;
  __device__ WholeBlock() : row(blockIdx.x), rank(static_cast<int>(threadIdx.x)) {}
  __device__ int size() const { return static_cast<int>(blockDim.x); }

  // Reduction over the block: op(v) reduces over a warp, `identity` pads
  // the second round's lanes beyond the number of warps.
  template <typename T, typename Op>
  __device__ T reduce(T v, T identity, const Op& op) const {
    __shared__ T partial[33];
    v = op(v);
    const int warp = rank / 32, lane = rank % 32, warps = size() / 32;
    __syncthreads();  // the previous reduction has read `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
      v = op(lane < warps ? partial[lane] : identity);
      if (lane == 0) partial[32] = v;
    }
    __syncthreads();
    return partial[32];
  }
  template <typename T>
  __device__ T max(T v) const {
    return reduce(v, -std::numeric_limits<T>::infinity(), [](T a) { return lanes_max<32>(a); });
  }
  template <typename T>
  __device__ T sum(T v) const {
    return reduce(v, T(0), [](T a) { return lanes_sum<32>(a); });
  }
};

template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(scalar_t);
  scalar_t v[kN];
};

// Calls f(c, l[c]) for the entries c of row l (length C) that belong to the
// group member `rank` of `size`. Vectorised groups read 16 bytes at a time
// between a scalar head and a scalar tail, so the row may start anywhere.
template <bool kVectorised, typename scalar_t, typename F>
__device__ __forceinline__ void for_row(const scalar_t* l, int64_t C, int rank, int size,
                                        const F& f) {
  if constexpr (kVectorised) {
    constexpr int kN = Vec16<scalar_t>::kN;
    const auto misalign = reinterpret_cast<uintptr_t>(l) % 16;
    int64_t head = static_cast<int64_t>((16 - misalign) % 16 / sizeof(scalar_t));
    head = misalign % sizeof(scalar_t) != 0 ? C : (head < C ? head : C);
    for (int64_t c = rank; c < head; c += size) f(c, l[c]);
    const int64_t vecs = (C - head) / kN;
    const auto* body = reinterpret_cast<const Vec16<scalar_t>*>(l + head);
    for (int64_t i = rank; i < vecs; i += size) {
      const Vec16<scalar_t> p = body[i];
#pragma unroll
      for (int k = 0; k < kN; ++k) f(head + i * kN + k, p.v[k]);
    }
    for (int64_t c = head + vecs * kN + rank; c < C; c += size) f(c, l[c]);
  } else {
    for (int64_t c = rank; c < C; c += size) f(c, l[c]);
  }
}

template <typename acc_t>
struct RowStats {
  acc_t m;    // row max (NaN wins)
  acc_t sum;  // sum_c exp(l_c - lse_shift(m))
};

// Max and shifted sum of row l; every member of the group gets the same.
template <typename Group, typename scalar_t, typename acc_t>
__device__ __forceinline__ RowStats<acc_t> row_stats(const Group& g, const scalar_t* l, int64_t C) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for_row<Group::kVectorised>(l, C, g.rank, g.size(),
                              [&](int64_t, scalar_t v) { m = max_nan(m, static_cast<acc_t>(v)); });
  m = g.max(m);
  const acc_t shift = lse_shift(m);
  acc_t s = 0;
  for_row<Group::kVectorised>(l, C, g.rank, g.size(), [&](int64_t, scalar_t v) {
    s += exp_acc(static_cast<acc_t>(v) - shift);
  });
  return {m, g.sum(s)};
}

// ---------------------------------------------------------------- kernels

// energy = -lse, and with y also ce = lse - l[y] (NaN for a bad label).
template <typename Group, typename scalar_t, typename acc_t>
__device__ __forceinline__ void energy_row(const Group& g, const scalar_t* __restrict__ logits,
                                           const int64_t* __restrict__ y, int64_t C,
                                           scalar_t* __restrict__ energy,
                                           scalar_t* __restrict__ ce) {
  const int64_t row = g.row;
  const scalar_t* l = logits + row * C;
  const RowStats<acc_t> st = row_stats<Group, scalar_t, acc_t>(g, l, C);
  const acc_t lse = lse_finish(st.m, st.sum);
  if (g.valid && g.rank == 0) {
    energy[row] = static_cast<scalar_t>(-lse);
    if (ce != nullptr) {
      const int64_t t = y[row];
      if (label_ok(t, C)) {
        ce[row] = static_cast<scalar_t>(ce_finish(st.m, st.sum, lse, static_cast<acc_t>(l[t])));
      } else {
        record_bad_label(kOpEnergyCe, row, t, C);
        ce[row] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      }
    }
  }
}

template <int kLanes, typename scalar_t, typename acc_t>
__global__ void energy_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ y,
                              int64_t B, int64_t C, scalar_t* __restrict__ energy,
                              scalar_t* __restrict__ ce) {
  energy_row<SubWarp<kLanes>, scalar_t, acc_t>(SubWarp<kLanes>(B), logits, y, C, energy, ce);
}

template <typename scalar_t, typename acc_t>
__global__ void energy_block_kernel(const scalar_t* __restrict__ logits,
                                    const int64_t* __restrict__ y, int64_t C,
                                    scalar_t* __restrict__ energy, scalar_t* __restrict__ ce) {
  energy_row<WholeBlock, scalar_t, acc_t>(WholeBlock(), logits, y, C, energy, ce);
}

template <typename scalar_t>
__global__ void pick_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ y,
                            int64_t B, int64_t C, scalar_t* __restrict__ energy) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= B) return;
  const int64_t t = y[row];
  if (label_ok(t, C)) {
    energy[row] = static_cast<scalar_t>(-logits[row * C + t]);
  } else {
    record_bad_label(kOpEnergy, row, t, C);
    energy[row] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
  }
}

template <typename Group, typename scalar_t, typename acc_t>
__device__ __forceinline__ void energy_backward_row(
    const Group& g, const scalar_t* __restrict__ logits, const int64_t* __restrict__ y,
    const acc_t* __restrict__ energy, const acc_t* __restrict__ grad_lse,
    const acc_t* __restrict__ grad_pick, int64_t C, scalar_t* __restrict__ grad) {
  const int64_t row = g.row;
  const scalar_t* l = logits + row * C;
  scalar_t* out = grad + row * C;
  const acc_t glse = grad_lse != nullptr ? grad_lse[row] : acc_t(0);
  acc_t gpick = grad_pick != nullptr ? grad_pick[row] : acc_t(0);
  const int64_t target = y != nullptr ? y[row] : -1;
  if (y != nullptr && !label_ok(target, C)) {
    gpick = std::numeric_limits<acc_t>::quiet_NaN();  // the whole row becomes NaN
    if (g.valid && g.rank == 0) record_bad_label(kOpEnergyBackward, row, target, C);
  }
  acc_t lse = 0;
  acc_t scale = 0;
  if (grad_lse != nullptr) {
    if (energy != nullptr) {
      lse = -energy[row];
    } else {
      const RowStats<acc_t> st = row_stats<Group, scalar_t, acc_t>(g, l, C);
      lse = lse_finish(st.m, st.sum);
    }
    acc_t s = 0;
    for_row<Group::kVectorised>(l, C, g.rank, g.size(), [&](int64_t, scalar_t v) {
      s += exp_acc(static_cast<acc_t>(v) - lse);
    });
    scale = grad_row_scale(glse, g.sum(s));
  }
  if (!g.valid) return;
  const bool bad_label = gpick != gpick;
  const bool has_lse = grad_lse != nullptr;
  for_row<Group::kVectorised>(l, C, g.rank, g.size(), [&](int64_t c, scalar_t v) {
    const acc_t e = has_lse ? exp_acc(static_cast<acc_t>(v) - lse) : acc_t(0);
    out[c] = static_cast<scalar_t>(energy_grad(e, scale, gpick, bad_label || c == target));
  });
}

template <int kLanes, typename scalar_t, typename acc_t>
__global__ void energy_backward_kernel(const scalar_t* __restrict__ logits,
                                       const int64_t* __restrict__ y,
                                       const acc_t* __restrict__ energy,
                                       const acc_t* __restrict__ grad_lse,
                                       const acc_t* __restrict__ grad_pick, int64_t B, int64_t C,
                                       scalar_t* __restrict__ grad) {
  energy_backward_row<SubWarp<kLanes>, scalar_t, acc_t>(SubWarp<kLanes>(B), logits, y, energy,
                                                        grad_lse, grad_pick, C, grad);
}

template <typename scalar_t, typename acc_t>
__global__ void energy_backward_block_kernel(const scalar_t* __restrict__ logits,
                                             const int64_t* __restrict__ y,
                                             const acc_t* __restrict__ energy,
                                             const acc_t* __restrict__ grad_lse,
                                             const acc_t* __restrict__ grad_pick, int64_t C,
                                             scalar_t* __restrict__ grad) {
  energy_backward_row<WholeBlock, scalar_t, acc_t>(WholeBlock(), logits, y, energy, grad_lse,
                                                   grad_pick, C, grad);
}

// ---------------------------------------------------------------- launch

// How the rows of a [B, C] problem are shared out: `lanes` threads of a
// warp per row (2..32), or, when block_threads > 0, one block of that many
// threads per row.
struct RowLayout {
  int lanes = 32;
  int block_threads = 0;
};

// Streaming multiprocessors of the current device (cached: the attribute
// query is cheap but not free). Not at::cuda::getCurrentDeviceProperties():
// ATen/cuda/CUDAContext.h needs the cuSPARSE and cuBLAS headers.
int64_t sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  int n = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (cached) cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

RowLayout row_layout(int64_t B, int64_t C) {
  RowLayout r;
  if (C <= 4) {
    r.lanes = 2;
  } else if (C <= 8) {
    r.lanes = 4;
  } else if (C <= 16) {
    r.lanes = 8;
  } else if (C <= 32) {
    r.lanes = 16;
  }
  if (C <= 32) return r;
  // A warp per row leaves most of the GPU idle when there are fewer rows
  // than a few warps per SM, and spends long loops on rows of thousands:
  // then a block per row, about eight logits per thread.
  const int64_t sms = sm_count();
  if (C > 2048 || (C > 256 && B < 8 * sms)) {
    int64_t threads = 64;
    while (threads < 1024 && threads * 8 < C) threads *= 2;
    r.block_threads = static_cast<int>(threads);
  }
  return r;
}

// Calls launch(std::integral_constant<int, kLanes>) for the sub-warp layouts.
template <typename Launch>
void with_lanes(int lanes, const Launch& launch) {
  switch (lanes) {
    case 2:
      return launch(std::integral_constant<int, 2>{});
    case 4:
      return launch(std::integral_constant<int, 4>{});
    case 8:
      return launch(std::integral_constant<int, 8>{});
    case 16:
      return launch(std::integral_constant<int, 16>{});
    default:
      return launch(std::integral_constant<int, 32>{});
  }
}

unsigned blocks_for(int64_t rows, int lanes) {
  const int64_t threads = rows * lanes;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "energy: too many rows for one launch (", rows, ")");
  return static_cast<unsigned>(blocks);
}

unsigned rows_as_blocks(int64_t rows) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "energy: too many rows for one launch (",
              rows, ")");
  return static_cast<unsigned>(rows);
}

// `wanted` threads for a block of `kernel`, halved while the kernel's
// registers do not allow that many (so that a launch never fails for lack of
// registers); a power of two, hence a multiple of 32, as WholeBlock needs.
template <typename Kernel>
int fit_block(Kernel kernel, int wanted) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  while (wanted > 32 && wanted > attr.maxThreadsPerBlock) wanted /= 2;
  return wanted;
}

// Launches the forward kernel (energy, and ce when y is given) for the
// layout of a [B, C] problem.
template <typename scalar_t>
void launch_energy(const at::Tensor& logits, const int64_t* y, scalar_t* energy, scalar_t* ce,
                   cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), C = logits.size(1);
  const scalar_t* l = logits.data_ptr<scalar_t>();
  const RowLayout layout = row_layout(B, C);
  if (layout.block_threads > 0) {
    static const int most = fit_block(energy_block_kernel<scalar_t, acc_t>, 1024);
    const int threads = std::min(layout.block_threads, most);
    energy_block_kernel<scalar_t, acc_t>
        <<<rows_as_blocks(B), threads, 0, stream>>>(l, y, C, energy, ce);
  } else {
    with_lanes(layout.lanes, [&](auto lanes) {
      energy_kernel<decltype(lanes)::value, scalar_t, acc_t>
          <<<blocks_for(B, lanes), kThreads, 0, stream>>>(l, y, B, C, energy, ce);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
        if (has_y) {
          const at::Tensor y = y_in->contiguous();
          pick_kernel<scalar_t><<<blocks_for(B, 1), kThreads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), B, C, out.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          launch_energy<scalar_t>(logits, nullptr, out.data_ptr<scalar_t>(), nullptr, stream);
        }
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
  const int64_t B = logits.size(0);
  at::Tensor energy = at::empty({B}, logits.options());
  at::Tensor ce = at::empty({B}, logits.options());
  if (B == 0) return {energy, ce};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_ce_cuda", [&] {
        launch_energy<scalar_t>(logits, y.data_ptr<int64_t>(), energy.data_ptr<scalar_t>(),
                                ce.data_ptr<scalar_t>(), stream);
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
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (B == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
        at::Tensor y, energy, grad_lse, grad_pick;
        if (has_y) y = y_in->contiguous();
        if (has_lse) grad_lse = grad_lse_in->to(acc_type).contiguous();
        if (has_pick) grad_pick = grad_pick_in->to(acc_type).contiguous();
        if (has_lse && has_energy) energy = energy_in->to(acc_type).contiguous();
        const scalar_t* l = logits.data_ptr<scalar_t>();
        const int64_t* yp = has_y ? y.data_ptr<int64_t>() : nullptr;
        const acc_t* ep = energy.defined() ? energy.data_ptr<acc_t>() : nullptr;
        const acc_t* glp = has_lse ? grad_lse.data_ptr<acc_t>() : nullptr;
        const acc_t* gpp = has_pick ? grad_pick.data_ptr<acc_t>() : nullptr;
        scalar_t* out = grad.data_ptr<scalar_t>();
        const RowLayout layout = row_layout(B, C);
        if (layout.block_threads > 0) {
          static const int most = fit_block(energy_backward_block_kernel<scalar_t, acc_t>, 1024);
          const int threads = std::min(layout.block_threads, most);
          energy_backward_block_kernel<scalar_t, acc_t>
              <<<rows_as_blocks(B), threads, 0, stream>>>(l, yp, ep, glp, gpp, C, out);
        } else {
          with_lanes(layout.lanes, [&](auto lanes) {
            energy_backward_kernel<decltype(lanes)::value, scalar_t, acc_t>
                <<<blocks_for(B, lanes), kThreads, 0, stream>>>(l, yp, ep, glp, gpp, B, C, out);
          });
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

// The device's label record as int64 [op, row, label, classes] (op 0: none),
// cleared; both in stream order, so nothing waits for the device and the op
// can be captured in a CUDA graph.
at::Tensor take_label_error_cuda(const at::Tensor& like) {
  c10::cuda::CUDAGuard guard(like.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  void* record = nullptr;
  C10_CUDA_CHECK(cudaGetSymbolAddress(&record, g_label_error));
  at::Tensor out = at::empty({4}, like.options().dtype(at::kLong));
  auto* words = static_cast<unsigned long long*>(record);
  C10_CUDA_CHECK(cudaMemcpyAsync(out.data_ptr<int64_t>(), words + 1, 4 * sizeof(int64_t),
                                 cudaMemcpyDeviceToDevice, stream));
  C10_CUDA_CHECK(cudaMemsetAsync(record, 0, 5 * sizeof(unsigned long long), stream));
  return out;
}

}  // namespace
}  // namespace jem_ext

TORCH_LIBRARY_IMPL(jem_ext, CUDA, m) {
  m.impl("energy", &jem_ext::energy_cuda);
  m.impl("energy_ce", &jem_ext::energy_ce_cuda);
  m.impl("energy_backward", &jem_ext::energy_backward_cuda);
  m.impl("_take_label_error", &jem_ext::take_label_error_cuda);
}
