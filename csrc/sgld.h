// Per-element math of the SGLD step, shared by the CPU and CUDA launchers:
//   x <- clamp(x - step_size * clip(grad, -grad_clip, grad_clip) + noise_std * xi)
// Arithmetic is in `acc_t` (float for float/half/bfloat16 storage, double for
// double). Absent bounds are infinite, so the update is branch-free (the CPU
// loop vectorises). NaN propagates through clip and clamp: comparisons are
// written so that a NaN is never replaced by a bound.
#pragma once

#include <cstdint>
#include <limits>

#include <c10/util/Optional.h>

#include <c10/macros/Macros.h>

#include "philox.h"

namespace jem_ext {

template <typename acc_t>
struct SgldParams {
  acc_t step_size;
  acc_t noise_std;
  acc_t clamp_min;  // -inf when absent
  acc_t clamp_max;  // +inf when absent
  acc_t grad_clip;  // +inf when absent
};

template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t sgld_update(acc_t x, acc_t g, float xi,
                                                 const SgldParams<acc_t>& p) {
  g = g < -p.grad_clip ? -p.grad_clip : g;
  g = g > p.grad_clip ? p.grad_clip : g;
  // Two roundings, never fused: CPU and CUDA then agree to the last bit.
  const acc_t moved = x - p.step_size * g;
  acc_t v = moved + p.noise_std * static_cast<acc_t>(xi);
  v = v < p.clamp_min ? p.clamp_min : v;
  v = v > p.clamp_max ? p.clamp_max : v;
  return v;
}

template <typename acc_t>
inline SgldParams<acc_t> make_sgld_params(double step_size, double noise_std,
                                          const c10::optional<double>& clamp_min,
                                          const c10::optional<double>& clamp_max,
                                          const c10::optional<double>& grad_clip) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  return SgldParams<acc_t>{static_cast<acc_t>(step_size), static_cast<acc_t>(noise_std),
                           static_cast<acc_t>(clamp_min.value_or(-inf)),
                           static_cast<acc_t>(clamp_max.value_or(inf)),
                           static_cast<acc_t>(grad_clip.value_or(inf))};
}

// Generator offset increment one call consumes: every element group draws
// one Philox block (4 words) at counter {offset/4, group}.
constexpr uint64_t kSgldOffsetIncrement = 4;

}  // namespace jem_ext
