// Per-row math of the logsumexp energy, shared by the CPU and CUDA launchers.
//
//   s          = m if the row max m is finite, else 0          (lse_shift)
//   sum        = sum_c exp(l_c - s)
//   lse(row)   = s + log(sum)                                  (lse_finish)
//   E(x)       = -lse,   E(x, y) = -l_y
//   CE         = log(sum) - (l_y - s)                          (ce_finish)
//   dlogits_c  = grad_lse * exp(l_c - lse) / sum_c' exp(l_c' - lse)
//                + grad_pick * [c == y]                        (energy_grad)
//
// Non-finite values follow torch.logsumexp and its autograd: NaN anywhere in
// a row gives a NaN lse and NaN gradients; otherwise a +inf entry gives
// lse = +inf, with NaN gradients at the +inf entries and 0 elsewhere; a row
// of only -inf gives lse = -inf and NaN gradients (exp(-inf - -inf)). Huge
// finite values are safe: the shift by the max keeps every exp in [0, 1].
// The cross-entropy of a finite row is computed from the shifted values, so
// it keeps full precision when the logits are large; other rows give
// lse - l_y.
#pragma once

#include <cmath>
#include <limits>

#include <c10/macros/Macros.h>

#include "float_math.h"  // JEM_EXT_INLINE, exp_float, log_positive

namespace jem_ext {

// exp and log in the accumulation type. float uses the branch-free helpers
// of float_math.h on both devices (the same operations, and the CPU loops
// vectorise); double uses the C library.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t exp_acc(acc_t v) {
  return ::exp(v);
}
template <>
C10_HOST_DEVICE JEM_EXT_INLINE float exp_acc<float>(float v) {
  return exp_float(v);
}

// log of a row sum known to be in [1, C] (callers select the result away
// for any other argument).
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t log_sum(acc_t v) {
  return ::log(v);
}
template <>
C10_HOST_DEVICE JEM_EXT_INLINE float log_sum<float>(float v) {
  return log_positive(v);
}

template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE bool is_finite(acc_t v) {
  return v - v == acc_t(0);  // false for NaN and +/-inf
}

// Running max that lets NaN win.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t max_nan(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// The value subtracted from every logit of a row before exp: its max m when
// finite, else 0 (m = +/-inf would give inf - inf = NaN). With a shift of 0
// a +inf entry gives sum = +inf, a NaN entry a NaN sum and an all -inf row
// sum = 0, which lse_finish turns into torch.logsumexp's values.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t lse_shift(acc_t m) {
  return is_finite(m) ? m : acc_t(0);
}

// True when m is finite and the row holds no NaN: then sum is in [1, C].
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE bool regular_row(acc_t m, acc_t sum) {
  return is_finite(m) && sum == sum;
}

// lse from the row max m and sum = sum_c exp(l_c - lse_shift(m)).
// Branch-free, so that a flat CPU loop over rows vectorises.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t lse_finish(acc_t m, acc_t sum) {
  const bool regular = regular_row(m, sum);
  const acc_t lse = lse_shift(m) + log_sum<acc_t>(regular ? sum : acc_t(1));
  const acc_t irregular = sum != sum ? sum : m;  // NaN row; else +inf or -inf
  return regular ? lse : irregular;
}

// Cross-entropy lse - l_y of a row, from the same m and sum as lse_finish
// and its result `lse`. A regular row uses the shifted values (no
// cancellation between two large numbers).
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t ce_finish(acc_t m, acc_t sum, acc_t lse, acc_t l_y) {
  const bool regular = regular_row(m, sum);
  const acc_t ce = log_sum<acc_t>(regular ? sum : acc_t(1)) - (l_y - lse_shift(m));
  return regular ? ce : lse - l_y;
}

// Per-row factor of the gradient: grad_lse / sum_c exp(l_c - lse).
// Renormalising by the sum makes the softmax exact even when lse was rounded
// (1e30 + log 2 == 1e30 in float32). A sum that is not a positive finite
// number (a row with NaN or +inf) is left out, so that exp(l_c - lse) alone
// decides, as in torch's gradient: NaN where it is NaN, 0 where it is 0.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t grad_row_scale(acc_t grad_lse, acc_t sum) {
  const bool usable = sum > acc_t(0) && is_finite(sum);
  return grad_lse * (usable ? acc_t(1) / sum : acc_t(1));
}

// Gradient of one logit from e = exp(l - lse) and its row's grad_row_scale.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t energy_grad(acc_t e, acc_t row_scale, acc_t grad_pick,
                                                 bool picked) {
  const acc_t g = row_scale * e;
  return picked ? g + grad_pick : g;
}

}  // namespace jem_ext
