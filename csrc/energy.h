// Per-row math of the logsumexp energy, shared by the CPU and CUDA launchers.
//
//   lse(row)   = m + log(sum_c exp(l_c - m)),  m = max_c l_c
//   E(x)       = -lse,   E(x, y) = -l_y,   CE = lse - l_y
//   dlogits_c  = grad_lse * softmax_c + grad_pick * [c == y]
//
// Edge cases: a row that is all -inf has lse = -inf (E = +inf) and a zero
// softmax (no NaN); huge finite values are safe because we subtract the max
// before exponentiating; NaN anywhere in a row gives a NaN lse.
#pragma once

#include <cmath>
#include <limits>

#include <c10/macros/Macros.h>

#include "philox.h"  // bits_to_float, fma_f

namespace jem_ext {

// Branch-free float exp (Cephes-style, ~1 ulp) so that the CPU loops
// auto-vectorise: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7
// polynomial, 2^n through the exponent bits. Results below 2^-126 flush to 0
// (softmax terms that small vanish next to the row maximum, which is 1).
C10_HOST_DEVICE JEM_EXT_INLINE float exp_float(float x) {
  float xc = x < -87.33654f ? -87.33654f : x;  // one select per line: GCC if-converts
  xc = xc > 88.37626f ? 88.37626f : xc;          // these, not nested ternaries
  xc = x != x ? 0.0f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = fma_f(n, -0.693359375f, xc);
  r = fma_f(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fma_f(p, r, 1.3981999507e-3f);
  p = fma_f(p, r, 8.3334519073e-3f);
  p = fma_f(p, r, 4.1665795894e-2f);
  p = fma_f(p, r, 1.6666665459e-1f);
  p = fma_f(p, r, 5.0000001201e-1f);
  const float er = fma_f(p * r, r, r) + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  float y = er * scale;
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t exp_acc(acc_t v) {
  return ::exp(v);
}
template <>
C10_HOST_DEVICE JEM_EXT_INLINE float exp_acc<float>(float v) {
#ifdef __CUDA_ARCH__
  return ::expf(v);
#else
  return exp_float(v);
#endif
}

template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t log_acc(acc_t v) {
  return ::log(v);
}
template <>
C10_HOST_DEVICE JEM_EXT_INLINE float log_acc<float>(float v) {
  return ::logf(v);
}

// Running max that lets NaN win, so a NaN row gives a NaN energy.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t max_nan(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// The term exp(l - m) of the row sum with the all -inf row made safe
// (m = -inf would give exp(-inf - -inf) = exp(nan)).
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t shifted_exp(acc_t l, acc_t m) {
  return m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0)
                                                      : exp_acc(l - m);
}

// lse from the row max and the sum of exp(l - m) (sum >= 1 for a finite max).
// Branch-free for float so that a flat loop over rows vectorises.
C10_HOST_DEVICE JEM_EXT_INLINE float lse_finish_float(float m, float sum) {
  const float lse = m + log_positive(sum >= 1.0f ? sum : 1.0f);
  const bool m_inf = m == -std::numeric_limits<float>::infinity() ||
                     m == std::numeric_limits<float>::infinity();
  const float r = m_inf ? m : lse;
  return sum != sum ? sum : r;  // NaN in the row
}

// lse from the row max and the sum of exp(l - m).
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t lse_finish(acc_t m, acc_t sum) {
  if (m == -std::numeric_limits<acc_t>::infinity() ||
      m == std::numeric_limits<acc_t>::infinity()) {
    return m;  // all -inf row, or a +inf entry
  }
  return m + log_acc(sum);
}

// Gradient of one logit: grad_lse * softmax + grad_pick * [picked], with
// softmax = exp(l - lse) * inv_sum. `inv_sum` is 1 / sum_c exp(l_c - lse) of
// the row (0 for an all -inf row): renormalising makes the gradient exact even
// when lse was rounded (1e30 + log 2 == 1e30 in float32).
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t energy_grad(acc_t l, acc_t lse, acc_t inv_sum,
                                                 acc_t grad_lse, acc_t grad_pick, bool picked) {
  const acc_t g = grad_lse * (shifted_exp(l, lse) * inv_sum);
  return picked ? g + grad_pick : g;
}

// 1 / row sum, with 0 for an all -inf row.
template <typename acc_t>
C10_HOST_DEVICE JEM_EXT_INLINE acc_t safe_inverse(acc_t sum) {
  return sum > acc_t(0) ? acc_t(1) / sum : acc_t(0);
}

}  // namespace jem_ext
