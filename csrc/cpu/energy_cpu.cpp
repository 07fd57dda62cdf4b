// CPU launcher of energy / energy_ce / energy_backward.
//
// Rows are processed in blocks of about kBlockElems logits. Within a block
// the expensive part, exp, runs as one flat loop over every logit of the
// block (so it vectorises fully even for 10 classes, where a per-row loop
// would spend most of its time in the scalar remainder), and the cheap
// per-row parts (max, shift, sum) run row by row. In float32 at the AVX2
// and AVX-512 levels, rows of up to 16 classes instead run 8 or 16 at a
// time, one row per SIMD lane (lse_rows_x8 / lse_rows_x16): then the
// per-row parts are vector operations too. The per-element and per-row math
// is csrc/energy.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../energy.h"
#include "cpu_level.h"

namespace jem_ext {
namespace {

constexpr int64_t kBlockElems = 2048;

// Max and sum of one row. A long or runtime-length row (kC == 0) uses a
// vector reduction; a short compile-time row uses two interleaved scalar
// chains (half the dependency latency, and no horizontal vector reduction,
// which costs more than the few adds of a short row).
template <int kC, typename acc_t, typename T>
JEM_EXT_INLINE acc_t row_max(const T* __restrict row, int64_t C) {
  if constexpr (kC > 0) {
    acc_t m0 = static_cast<acc_t>(row[0]);
    acc_t m1 = static_cast<acc_t>(row[kC > 1 ? 1 : 0]);
    for (int c = 2; c + 1 < kC; c += 2) {
      m0 = std::max(m0, static_cast<acc_t>(row[c]));
      m1 = std::max(m1, static_cast<acc_t>(row[c + 1]));
    }
    if (kC % 2 == 1) m0 = std::max(m0, static_cast<acc_t>(row[kC - 1]));
    return std::max(m0, m1);
  } else {
    acc_t m = static_cast<acc_t>(row[0]);
#pragma omp simd reduction(max : m)
    for (int64_t c = 1; c < C; ++c) m = std::max(m, static_cast<acc_t>(row[c]));
    return m;
  }
}

template <int kC, typename acc_t>
JEM_EXT_INLINE acc_t row_sum(const acc_t* __restrict row, int64_t C) {
  if constexpr (kC > 0) {
    acc_t s0 = 0, s1 = 0;
    for (int c = 0; c + 1 < kC; c += 2) {
      s0 += row[c];
      s1 += row[c + 1];
    }
    if (kC % 2 == 1) s0 += row[kC - 1];
    return s0 + s1;
  } else {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += row[c];
    return sum;
  }
}

// t[r, :] = row r minus `shift[r]`: lse_shift(max) in the forward, lse in
// the backward.
template <int kC, typename scalar_t, typename acc_t>
JEM_EXT_INLINE void shift_rows(const scalar_t* __restrict l, const acc_t* __restrict shift,
                               acc_t* __restrict t, int64_t rows, int64_t C_rt) {
  const int64_t C = kC > 0 ? kC : C_rt;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t s = shift[r];
    const scalar_t* row = l + r * C;
    acc_t* out = t + r * C;
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(row[c]) - s;
  }
}

// Per-block scratch: t (rows * C) and, per row, the max, the sum of the
// shifted exponentials and lse.
template <typename acc_t>
struct RowScratch {
  acc_t* t;
  acc_t* m;
  acc_t* sums;
  acc_t* lse;
};

// lse of `rows` rows starting at l (and their max and sum, for ce_finish).
// std::max maps onto maxss/maxps (a `v > m ? v : m` chain compiles to a
// serial compare-and-move); it may drop a NaN from the max, but a NaN entry
// makes its row sum NaN, and lse with it.
template <typename scalar_t, typename acc_t, int kC = 0>
JEM_EXT_INLINE void lse_rows(const scalar_t* __restrict l, int64_t rows, int64_t C_rt,
                             const RowScratch<acc_t>& s) {
  const int64_t C = kC > 0 ? kC : C_rt;
  for (int64_t r = 0; r < rows; ++r) {
    s.m[r] = row_max<kC, acc_t>(l + r * C, C);
    s.lse[r] = lse_shift(s.m[r]);  // the shift, for now
  }
  shift_rows<kC>(l, s.lse, s.t, rows, C);
  const int64_t n = rows * C;
  for (int64_t i = 0; i < n; ++i) s.t[i] = exp_acc<acc_t>(s.t[i]);
  for (int64_t r = 0; r < rows; ++r) s.sums[r] = row_sum<kC, acc_t>(s.t + r * C, C);
  for (int64_t r = 0; r < rows; ++r) s.lse[r] = lse_finish(s.m[r], s.sums[r]);
}

// The backward of `rows` rows given their lse (in s.lse): energy_grad of
// every logit. `y` (label per row, or nullptr) and `grad_pick` (nullptr when
// absent) add the pick term.
template <typename scalar_t, typename acc_t, int kC = 0>
JEM_EXT_INLINE void grad_rows(const scalar_t* __restrict l, int64_t rows, int64_t C_rt,
                              const RowScratch<acc_t>& s, const acc_t* __restrict grad_lse,
                              const int64_t* __restrict y, const acc_t* __restrict grad_pick,
                              scalar_t* __restrict out) {
  const int64_t C = kC > 0 ? kC : C_rt;
  acc_t* __restrict t = s.t;
  shift_rows<kC>(l, s.lse, t, rows, C);
  const int64_t n = rows * C;
  for (int64_t i = 0; i < n; ++i) t[i] = exp_acc<acc_t>(t[i]);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* e = t + r * C;
    const acc_t scale = grad_row_scale(grad_lse[r], row_sum<kC, acc_t>(e, C));
    scalar_t* o = out + r * C;
    // Every logit unpicked (a loop without a per-element label test), then
    // the labelled one rewritten with the pick term.
    for (int64_t c = 0; c < C; ++c) {
      o[c] = static_cast<scalar_t>(energy_grad(e[c], scale, acc_t(0), false));
    }
    if (y != nullptr) {
      const acc_t pick = grad_pick != nullptr ? grad_pick[r] : acc_t(0);
      o[y[r]] = static_cast<scalar_t>(energy_grad(e[y[r]], scale, pick, true));
    }
  }
}

// softmax(l) of `rows` rows after lse_rows, which left e = exp(l - shift)
// in s.t and each row's max and sum: e / sum, from the forward's exps (so a
// caller that keeps it spares the backward its exps). A row that is not
// regular (a NaN, or an infinite max) is computed by grad_rows with
// grad_lse = 1, so its NaN and zeros are those of torch.logsumexp's gradient.
template <typename scalar_t, typename acc_t, int kC = 0>
JEM_EXT_INLINE void softmax_rows(const scalar_t* __restrict l, int64_t rows, int64_t C_rt,
                                 const RowScratch<acc_t>& s, scalar_t* __restrict probs) {
  const int64_t C = kC > 0 ? kC : C_rt;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t inv_sum = acc_t(1) / s.sums[r];
    const acc_t* e = s.t + r * C;
    scalar_t* p = probs + r * C;
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(e[c] * inv_sum);
  }
  const acc_t one = 1;
  for (int64_t r = 0; r < rows; ++r) {
    if (regular_row(s.m[r], s.sums[r])) continue;
    const RowScratch<acc_t> row{s.t + r * C, s.m + r, s.sums + r, s.lse + r};
    grad_rows<scalar_t, acc_t, kC>(l + r * C, 1, C, row, &one, nullptr, nullptr, probs + r * C);
  }
}

// The backward of energy from a kept softmax (softmax_rows), in place:
// energy_grad of every logit with the probability in place of e and
// grad_lse as the row scale (the softmax already holds the 1 / sum).
template <typename scalar_t, typename acc_t, int kC = 0>
JEM_EXT_INLINE void softmax_grad_rows(scalar_t* __restrict probs, int64_t rows, int64_t C_rt,
                                      const acc_t* __restrict grad_lse) {
  const int64_t C = kC > 0 ? kC : C_rt;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t scale = grad_lse[r];
    scalar_t* p = probs + r * C;
    for (int64_t c = 0; c < C; ++c) {
      p[c] = static_cast<scalar_t>(energy_grad(static_cast<acc_t>(p[c]), scale, acc_t(0), false));
    }
  }
}

// energy_ce's outputs of `rows` rows from lse_rows' scratch: the energy
// -lse and the cross-entropy of label y[r] (y, e and ce start at the
// block's first row).
template <typename scalar_t, typename acc_t>
JEM_EXT_INLINE void ce_rows(const scalar_t* __restrict l, int64_t rows, int64_t C,
                            const int64_t* __restrict y, const RowScratch<acc_t>& s,
                            scalar_t* __restrict e, scalar_t* __restrict ce) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t l_y = static_cast<acc_t>(l[r * C + y[r]]);
    e[r] = static_cast<scalar_t>(-s.lse[r]);
    ce[r] = static_cast<scalar_t>(ce_finish(s.m[r], s.sums[r], s.lse[r], l_y));
  }
}

// The backward without the softmax term (grad_lse absent): the pick term
// alone (zero without grad_pick).
template <typename scalar_t, typename acc_t>
void pick_grad_rows(int64_t rows, int64_t C, const int64_t* y, const acc_t* grad_pick,
                    scalar_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t target = y != nullptr ? y[r] : -1;
    const acc_t pick = grad_pick != nullptr ? grad_pick[r] : acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      out[r * C + c] = static_cast<scalar_t>(energy_grad(acc_t(0), acc_t(0), pick, c == target));
    }
  }
}

#if JEM_EXT_X86_LEVELS
// Rows of at most 16 classes at AVX-512: 16 rows at a time, one row per
// SIMD lane. Each row is one masked 16-float load; a 16 x 16 transpose in
// registers turns them into one vector per class, and the per-row work
// (max, shift, exp, sum, log, 1 / sum) runs once per 16 rows on whole
// vectors instead of once per row on 10 scalars. The column code applies the
// same energy.h functions in the same order as lse_rows / softmax_rows (max
// and sum in the two interleaved chains of row_max / row_sum), so its bits
// are those of the per-row loops.

// In-register transpose of a 16 x 16 float block (rows <-> columns).
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void transpose16x16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  __m512 u[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // u[4 i + j] holds, in its 128-bit lane k, element 4 k + j of rows 4 i .. 4 i + 3.
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 b = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    v[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    v[8 + j] = _mm512_shuffle_f32x4(a, c, 0xdd);
    v[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    v[12 + j] = _mm512_shuffle_f32x4(b, d, 0xdd);
  }
}

// exp_float of 16 lanes known to lie in [-87.33654, 0], with the same
// bits: the range and NaN selects, which change nothing there, are left
// out; the rounding of x / ln 2 by adding and subtracting 1.5 * 2^23 is one
// round-to-nearest-even (the same integer for |x / ln 2| < 2^22); and the
// product by 2^n built in the exponent bits is one scalef (both are the
// exact product rounded once; 2^n itself is normal for n >= -126).
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE __m512 exp_in_range16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 er = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(er, n);
}

// The row sums of 16 rows from their exps, one vector per class: row_sum<kC>'s
// two chains.
template <int kC>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE __m512 row_sums16(const __m512* e) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (int c = 0; c + 1 < kC; c += 2) {
    s0 = _mm512_add_ps(s0, e[c]);
    s1 = _mm512_add_ps(s1, e[c + 1]);
  }
  if (kC % 2 == 1) s0 = _mm512_add_ps(s0, e[kC - 1]);
  return _mm512_add_ps(s0, s1);
}

// lse (and max and sum, for ce_rows) of `rows` rows of kC <= 16 classes;
// with kProbs also their softmax e / sum, as softmax_rows writes it
// (irregular rows excepted: softmax_rows_x16 rewrites those).
template <int kC, bool kProbs>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void lse_rows_x16(const float* __restrict l, int64_t rows,
                                                       const RowScratch<float>& s,
                                                       float* __restrict probs) {
  static_assert(kC >= 2 && kC <= 16, "one row per 16-float vector");
  const __mmask16 class_mask = static_cast<__mmask16>((1u << kC) - 1u);
  alignas(64) float col[kC][16];
  alignas(64) float m[16], sum[16], lse[16];
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, rows - r0));
    // Rows past the end (in the last group) load as zeros, through an
    // empty mask: no branch, no access.
    __m512 v[16];
    for (int j = 0; j < 16; ++j) {
      v[j] = _mm512_maskz_loadu_ps(j < n ? class_mask : 0, l + (r0 + j) * kC);
    }
    transpose16x16(v);
    // std::max(a, b) is (a < b) ? b : a, which is _mm512_max_ps(b, a) (the
    // second operand on NaN and on equal values). row_max<kC>: two chains,
    // even and odd classes.
    __m512 m0 = v[0], m1 = v[1];
    for (int c = 2; c + 1 < kC; c += 2) {
      m0 = _mm512_max_ps(v[c], m0);
      m1 = _mm512_max_ps(v[c + 1], m1);
    }
    if (kC % 2 == 1) m0 = _mm512_max_ps(v[kC - 1], m0);
    _mm512_store_ps(m, _mm512_max_ps(m1, m0));
    // shift = lse_shift(m): m where finite (m - m == 0), else +0.
    const __m512 m_v = _mm512_load_ps(m);
    const __mmask16 finite =
        _mm512_cmp_ps_mask(_mm512_sub_ps(m_v, m_v), _mm512_setzero_ps(), _CMP_EQ_OQ);
    const __m512 shift_v = _mm512_maskz_mov_ps(finite, m_v);
    // The smallest l - shift of each row: when every row's max is finite
    // and it is >= -87.33654, every exp argument is in exp_in_range16's
    // range, unless the row holds a NaN (which max and min may drop; it
    // makes the row's sum NaN, checked below).
    __m512 lo = v[0];
    for (int c = 1; c < kC; ++c) lo = _mm512_min_ps(v[c], lo);
    const __mmask16 in_range =
        _mm512_cmp_ps_mask(_mm512_sub_ps(lo, shift_v), _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
    __m512 e[kC];
    for (int c = 0; c < kC; ++c) e[c] = exp_in_range16(_mm512_sub_ps(v[c], shift_v));
    __m512 sum_v = row_sums16<kC>(e);
    const __mmask16 no_nan = _mm512_cmp_ps_mask(sum_v, sum_v, _CMP_EQ_OQ);
    if ((finite & in_range & no_nan) != 0xffff) {
      // Some row out of that range (an infinite or NaN entry, or a class
      // below the max by more than 87.3): exp_float itself, selects and all.
      for (int c = 0; c < kC; ++c) _mm512_store_ps(col[c], _mm512_sub_ps(v[c], shift_v));
      for (int c = 0; c < kC; ++c) {
        for (int j = 0; j < 16; ++j) col[c][j] = exp_acc<float>(col[c][j]);
      }
      for (int c = 0; c < kC; ++c) e[c] = _mm512_load_ps(col[c]);
      sum_v = row_sums16<kC>(e);
    }
    _mm512_store_ps(sum, sum_v);
    for (int j = 0; j < 16; ++j) lse[j] = lse_finish(m[j], sum[j]);
    const __mmask16 row_mask = static_cast<__mmask16>((1u << n) - 1u);
    _mm512_mask_storeu_ps(s.m + r0, row_mask, _mm512_load_ps(m));
    _mm512_mask_storeu_ps(s.sums + r0, row_mask, sum_v);
    _mm512_mask_storeu_ps(s.lse + r0, row_mask, _mm512_load_ps(lse));
    if constexpr (kProbs) {
      const __m512 inv_v = _mm512_div_ps(_mm512_set1_ps(1.0f), sum_v);
      for (int c = 0; c < 16; ++c) v[c] = c < kC ? _mm512_mul_ps(e[c], inv_v) : _mm512_setzero_ps();
      transpose16x16(v);
      for (int j = 0; j < 16; ++j) {
        _mm512_mask_storeu_ps(probs + (r0 + j) * kC, j < n ? class_mask : 0, v[j]);
      }
    }
  }
}

// softmax_rows for kC <= 16 classes, after lse_rows_x16 / lse_rows_x8 wrote
// the regular rows: the others are computed by grad_rows, as there.
template <int kC>
JEM_EXT_INLINE void softmax_fixup(const float* __restrict l, int64_t rows,
                                  const RowScratch<float>& s, float* __restrict probs) {
  const float one = 1;
  for (int64_t r = 0; r < rows; ++r) {
    if (regular_row(s.m[r], s.sums[r])) continue;
    const RowScratch<float> row{s.t, s.m + r, s.sums + r, s.lse + r};
    grad_rows<float, float, kC>(l + r * kC, 1, kC, row, &one, nullptr, nullptr, probs + r * kC);
  }
}

// softmax_grad_rows for kC <= 16 classes at AVX-512: 16 rows (kC vectors of
// 16 floats) at a time, each vector's row scales spread from the 16 rows'
// scales by one permute.
template <int kC>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void softmax_grad_rows_x16(float* __restrict probs,
                                                                int64_t rows,
                                                                const float* __restrict grad_lse) {
  __m512i row_of[kC];  // lane i of vector k holds element 16 k + i: row (16 k + i) / kC
  for (int k = 0; k < kC; ++k) {
    alignas(64) int32_t idx[16];
    for (int i = 0; i < 16; ++i) idx[i] = (16 * k + i) / kC;
    row_of[k] = _mm512_load_si512(idx);
  }
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, rows - r0));
    const __m512 scale =
        _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), grad_lse + r0);
    float* p = probs + r0 * kC;
    for (int k = 0; k < kC; ++k) {
      // The group's elements 16 k .. 16 k + 15 that exist (all but in the last group).
      const int valid = std::min(16, std::max(0, n * kC - 16 * k));
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
      const __m512 e = _mm512_maskz_loadu_ps(mask, p + 16 * k);
      _mm512_mask_storeu_ps(p + 16 * k, mask,
                            _mm512_mul_ps(_mm512_permutexvar_ps(row_of[k], scale), e));
    }
  }
}

// The same at AVX2: 8 rows (kC vectors of 8 floats) at a time.
template <int kC>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void softmax_grad_rows_x8(float* __restrict probs, int64_t rows,
                                                             const float* __restrict grad_lse) {
  __m256i row_of[kC];  // lane i of vector k holds element 8 k + i: row (8 k + i) / kC
  for (int k = 0; k < kC; ++k) {
    alignas(32) int32_t idx[8];
    for (int i = 0; i < 8; ++i) idx[i] = (8 * k + i) / kC;
    row_of[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    const __m256 scale = _mm256_loadu_ps(grad_lse + r0);
    float* p = probs + r0 * kC;
    for (int k = 0; k < kC; ++k) {
      const __m256 e = _mm256_loadu_ps(p + 8 * k);
      _mm256_storeu_ps(p + 8 * k, _mm256_mul_ps(_mm256_permutevar8x32_ps(scale, row_of[k]), e));
    }
  }
  if (r0 < rows) {  // the last rows, through masks
    const int n = static_cast<int>(rows - r0);
    const __m256 scale =
        _mm256_maskload_ps(grad_lse + r0, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    float* p = probs + r0 * kC;
    for (int k = 0; k < kC; ++k) {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n * kC - 8 * k), lane);
      const __m256 e = _mm256_maskload_ps(p + 8 * k, mask);
      _mm256_maskstore_ps(p + 8 * k, mask,
                          _mm256_mul_ps(_mm256_permutevar8x32_ps(scale, row_of[k]), e));
    }
  }
}

template <int kC>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void softmax_grad_rows_avx2(float* probs, int64_t rows,
                                                               int64_t C, const float* grad_lse) {
  if constexpr (kC > 0) {
    softmax_grad_rows_x8<kC>(probs, rows, grad_lse);
  } else {
    softmax_grad_rows<float, float, kC>(probs, rows, C, grad_lse);
  }
}

// The AVX2 form of lse_rows_x16: 8 rows at a time, each row one or two
// 8-float masked loads (classes 0-7, 8-15), two 8 x 8 transposes.

// In-register transpose of an 8 x 8 float block.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void transpose8x8(__m256 v[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  // u[4 i + j] holds, in its 128-bit half h, element 4 h + j of rows 4 i .. 4 i + 3.
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    v[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// exp_in_range16 at AVX2: one rounding instruction as there; the power of 2
// through the exponent bits, as exp_float builds it.
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 exp_in_range8(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 er = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvttps_epi32(n);
  const __m256 scale =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(er, scale);
}

template <int kC>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE __m256 row_sums8(const __m256* e) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int c = 0; c + 1 < kC; c += 2) {
    s0 = _mm256_add_ps(s0, e[c]);
    s1 = _mm256_add_ps(s1, e[c + 1]);
  }
  if (kC % 2 == 1) s0 = _mm256_add_ps(s0, e[kC - 1]);
  return _mm256_add_ps(s0, s1);
}

template <int kC, bool kProbs>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void lse_rows_x8(const float* __restrict l, int64_t rows,
                                                    const RowScratch<float>& s,
                                                    float* __restrict probs) {
  static_assert(kC >= 2 && kC <= 16, "one row per two 8-float vectors");
  constexpr int kHalves = kC > 8 ? 2 : 1;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // Masks of the classes of each half of a row.
  const __m256i half_mask[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(kC), lane),
                                _mm256_cmpgt_epi32(_mm256_set1_epi32(kC - 8), lane)};
  alignas(32) float col[kC][8];
  alignas(32) float m[8], sum[8], lse[8];
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, rows - r0));
    __m256 v[16];
    for (int h = 0; h < kHalves; ++h) {
      for (int j = 0; j < 8; ++j) {
        const __m256i mask = j < n ? half_mask[h] : _mm256_setzero_si256();
        v[8 * h + j] = _mm256_maskload_ps(l + (r0 + j) * kC + 8 * h, mask);
      }
      transpose8x8(v + 8 * h);
    }
    // row_max<kC>'s chains; std::max(a, b) is _mm256_max_ps(b, a).
    __m256 m0 = v[0], m1 = v[1];
    for (int c = 2; c + 1 < kC; c += 2) {
      m0 = _mm256_max_ps(v[c], m0);
      m1 = _mm256_max_ps(v[c + 1], m1);
    }
    if (kC % 2 == 1) m0 = _mm256_max_ps(v[kC - 1], m0);
    const __m256 m_v = _mm256_max_ps(m1, m0);
    _mm256_store_ps(m, m_v);
    const __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(m_v, m_v), _mm256_setzero_ps(), _CMP_EQ_OQ);
    const __m256 shift_v = _mm256_and_ps(finite, m_v);  // lse_shift(m)
    __m256 lo = v[0];
    for (int c = 1; c < kC; ++c) lo = _mm256_min_ps(v[c], lo);
    const __m256 in_range =
        _mm256_cmp_ps(_mm256_sub_ps(lo, shift_v), _mm256_set1_ps(-87.33654f), _CMP_GE_OQ);
    __m256 e[kC];
    for (int c = 0; c < kC; ++c) e[c] = exp_in_range8(_mm256_sub_ps(v[c], shift_v));
    __m256 sum_v = row_sums8<kC>(e);
    const __m256 no_nan = _mm256_cmp_ps(sum_v, sum_v, _CMP_EQ_OQ);
    if (_mm256_movemask_ps(_mm256_and_ps(_mm256_and_ps(finite, in_range), no_nan)) != 0xff) {
      for (int c = 0; c < kC; ++c) _mm256_store_ps(col[c], _mm256_sub_ps(v[c], shift_v));
      for (int c = 0; c < kC; ++c) {
        for (int j = 0; j < 8; ++j) col[c][j] = exp_acc<float>(col[c][j]);
      }
      for (int c = 0; c < kC; ++c) e[c] = _mm256_load_ps(col[c]);
      sum_v = row_sums8<kC>(e);
    }
    _mm256_store_ps(sum, sum_v);
    for (int j = 0; j < 8; ++j) lse[j] = lse_finish(m[j], sum[j]);
    const __m256i row_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
    _mm256_maskstore_ps(s.m + r0, row_mask, m_v);
    _mm256_maskstore_ps(s.sums + r0, row_mask, sum_v);
    _mm256_maskstore_ps(s.lse + r0, row_mask, _mm256_load_ps(lse));
    if constexpr (kProbs) {
      const __m256 inv_v = _mm256_div_ps(_mm256_set1_ps(1.0f), sum_v);
      for (int c = 0; c < 8 * kHalves; ++c) {
        v[c] = c < kC ? _mm256_mul_ps(e[c], inv_v) : _mm256_setzero_ps();
      }
      for (int h = 0; h < kHalves; ++h) {
        transpose8x8(v + 8 * h);
        for (int j = 0; j < 8; ++j) {
          const __m256i mask = j < n ? half_mask[h] : _mm256_setzero_si256();
          _mm256_maskstore_ps(probs + (r0 + j) * kC + 8 * h, mask, v[8 * h + j]);
        }
      }
    }
  }
}

template <int kC>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void lse_rows_avx2(const float* l, int64_t rows, int64_t C,
                                                      const RowScratch<float>& s) {
  if constexpr (kC > 0) {
    lse_rows_x8<kC, false>(l, rows, s, nullptr);
  } else {
    lse_rows<float, float, kC>(l, rows, C, s);
  }
}

template <int kC>
JEM_EXT_TARGET_AVX2 JEM_EXT_INLINE void lse_softmax_rows_avx2(const float* l, int64_t rows,
                                                              int64_t C, const RowScratch<float>& s,
                                                              float* probs) {
  if constexpr (kC > 0) {
    lse_rows_x8<kC, true>(l, rows, s, probs);
    softmax_fixup<kC>(l, rows, s, probs);
  } else {
    lse_rows<float, float, kC>(l, rows, C, s);
    softmax_rows<float, float, kC>(l, rows, C, s, probs);
  }
}

// The AVX-512 lse and lse-with-softmax loops: across rows up to 16 classes,
// else the per-row loops.
template <int kC>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void lse_rows_avx512(const float* l, int64_t rows, int64_t C,
                                                          const RowScratch<float>& s) {
  if constexpr (kC > 0) {
    lse_rows_x16<kC, false>(l, rows, s, nullptr);
  } else {
    lse_rows<float, float, kC>(l, rows, C, s);
  }
}

template <int kC>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void lse_softmax_rows_avx512(const float* l, int64_t rows,
                                                                  int64_t C,
                                                                  const RowScratch<float>& s,
                                                                  float* probs) {
  if constexpr (kC > 0) {
    lse_rows_x16<kC, true>(l, rows, s, probs);
    softmax_fixup<kC>(l, rows, s, probs);
  } else {
    lse_rows<float, float, kC>(l, rows, C, s);
    softmax_rows<float, float, kC>(l, rows, C, s, probs);
  }
}

template <int kC>
JEM_EXT_TARGET_AVX512 JEM_EXT_INLINE void softmax_grad_rows_avx512(float* probs, int64_t rows,
                                                                   int64_t C,
                                                                   const float* grad_lse) {
  if constexpr (kC > 0) {
    softmax_grad_rows_x16<kC>(probs, rows, grad_lse);
  } else {
    softmax_grad_rows<float, float, kC>(probs, rows, C, grad_lse);
  }
}
#endif  // JEM_EXT_X86_LEVELS

// lse_rows then softmax_rows: the forward that keeps its softmax.
template <typename scalar_t, typename acc_t, int kC = 0>
JEM_EXT_INLINE void lse_softmax_rows(const scalar_t* l, int64_t rows, int64_t C,
                                     const RowScratch<acc_t>& s, scalar_t* probs) {
  lse_rows<scalar_t, acc_t, kC>(l, rows, C, s);
  softmax_rows<scalar_t, acc_t, kC>(l, rows, C, s, probs);
}

// The float32 loops, compiled once per CPU level (cpu_level.h) and picked
// at run time; the half types and double use the portable template (half
// types are rare here, double is for tests). For 2 <= C <= 16 the number of
// classes becomes a compile-time constant (10 is the common case: CIFAR-10,
// SVHN, digits): the per-row loops then unroll completely instead of paying
// a vector loop's set-up on every short row. (A switch, not a generic
// lambda: a lambda body would be compiled once, for the baseline CPU,
// outside the per-level functions.)
// clang-format off
#define JEM_EXT_STATIC_CLASSES(CALL)                                              \
  switch (C) {                                                                    \
    case 2: CALL(2); break;   case 3: CALL(3); break;   case 4: CALL(4); break;   \
    case 5: CALL(5); break;   case 6: CALL(6); break;   case 7: CALL(7); break;   \
    case 8: CALL(8); break;   case 9: CALL(9); break;   case 10: CALL(10); break; \
    case 11: CALL(11); break; case 12: CALL(12); break; case 13: CALL(13); break; \
    case 14: CALL(14); break; case 15: CALL(15); break; case 16: CALL(16); break; \
    default: CALL(0);                                                             \
  }
// clang-format on
#define JEM_EXT_LSE(k) lse_rows<float, float, k>(l, rows, C, s)
#define JEM_EXT_LSE_AVX512(k) lse_rows_avx512<k>(l, rows, C, s)
#define JEM_EXT_GRAD(k) grad_rows<float, float, k>(l, rows, C, s, grad_lse, y, grad_pick, out)
#define JEM_EXT_SOFTMAX(k) lse_softmax_rows<float, float, k>(l, rows, C, s, probs)
#define JEM_EXT_SOFTMAX_AVX512(k) lse_softmax_rows_avx512<k>(l, rows, C, s, probs)
#define JEM_EXT_SOFTMAX_GRAD(k) softmax_grad_rows<float, float, k>(probs, rows, C, grad_lse)
#define JEM_EXT_LSE_AVX2(k) lse_rows_avx2<k>(l, rows, C, s)
#define JEM_EXT_SOFTMAX_AVX2(k) lse_softmax_rows_avx2<k>(l, rows, C, s, probs)
#define JEM_EXT_SOFTMAX_GRAD_AVX2(k) softmax_grad_rows_avx2<k>(probs, rows, C, grad_lse)
#define JEM_EXT_SOFTMAX_GRAD_AVX512(k) softmax_grad_rows_avx512<k>(probs, rows, C, grad_lse)

// One level's float32 loops, named <name>_<level>; LSE and SOFTMAX name the
// forward loops (lse alone, lse with the softmax kept) and SOFTMAX_GRAD the
// kept softmax's backward, for one class count.
#define JEM_EXT_ENERGY_LOOPS(ATTR, LEVEL, LSE, SOFTMAX, SOFTMAX_GRAD)                        \
  ATTR void lse_rows_float_##LEVEL(const float* l, int64_t rows, int64_t C,                  \
                                   const RowScratch<float>& s) {                             \
    JEM_EXT_STATIC_CLASSES(LSE);                                                             \
  }                                                                                          \
  ATTR void ce_rows_float_##LEVEL(const float* l, int64_t rows, int64_t C, const int64_t* y, \
                                  const RowScratch<float>& s, float* e, float* ce) {         \
    ce_rows<float, float>(l, rows, C, y, s, e, ce);                                          \
  }                                                                                          \
  ATTR void grad_rows_float_##LEVEL(const float* l, int64_t rows, int64_t C,                 \
                                    const RowScratch<float>& s, const float* grad_lse,       \
                                    const int64_t* y, const float* grad_pick, float* out) {  \
    JEM_EXT_STATIC_CLASSES(JEM_EXT_GRAD);                                                    \
  }                                                                                          \
  ATTR void softmax_rows_float_##LEVEL(const float* l, int64_t rows, int64_t C,              \
                                       const RowScratch<float>& s, float* probs) {           \
    JEM_EXT_STATIC_CLASSES(SOFTMAX);                                                         \
  }                                                                                          \
  ATTR void softmax_grad_rows_float_##LEVEL(float* probs, int64_t rows, int64_t C,           \
                                            const float* grad_lse) {                         \
    JEM_EXT_STATIC_CLASSES(SOFTMAX_GRAD);                                                    \
  }

JEM_EXT_ENERGY_LOOPS(, baseline, JEM_EXT_LSE, JEM_EXT_SOFTMAX, JEM_EXT_SOFTMAX_GRAD)
#if JEM_EXT_X86_LEVELS
JEM_EXT_ENERGY_LOOPS(JEM_EXT_TARGET_AVX2, avx2, JEM_EXT_LSE_AVX2, JEM_EXT_SOFTMAX_AVX2,
                     JEM_EXT_SOFTMAX_GRAD_AVX2)
JEM_EXT_ENERGY_LOOPS(JEM_EXT_TARGET_AVX512, avx512, JEM_EXT_LSE_AVX512, JEM_EXT_SOFTMAX_AVX512,
                     JEM_EXT_SOFTMAX_GRAD_AVX512)
#endif
#undef JEM_EXT_ENERGY_LOOPS
#undef JEM_EXT_SOFTMAX_GRAD_AVX512
#undef JEM_EXT_SOFTMAX_GRAD_AVX2
#undef JEM_EXT_SOFTMAX_AVX2
#undef JEM_EXT_LSE_AVX2
#undef JEM_EXT_SOFTMAX_GRAD
#undef JEM_EXT_SOFTMAX_AVX512
#undef JEM_EXT_SOFTMAX
#undef JEM_EXT_GRAD
#undef JEM_EXT_LSE_AVX512
#undef JEM_EXT_LSE
#undef JEM_EXT_STATIC_CLASSES

// The per-level float32 loops of the forward and the backward.
struct EnergyKernels {
  void (*lse_rows)(const float* l, int64_t rows, int64_t C, const RowScratch<float>& s);
  void (*ce_rows)(const float* l, int64_t rows, int64_t C, const int64_t* y,
                  const RowScratch<float>& s, float* e, float* ce);
  void (*grad_rows)(const float* l, int64_t rows, int64_t C, const RowScratch<float>& s,
                    const float* grad_lse, const int64_t* y, const float* grad_pick, float* out);
  // lse_rows and softmax_rows in one.
  void (*softmax_rows)(const float* l, int64_t rows, int64_t C, const RowScratch<float>& s,
                       float* probs);
  void (*softmax_grad_rows)(float* probs, int64_t rows, int64_t C, const float* grad_lse);
};

const EnergyKernels& energy_kernels(CpuLevel level) {
  static constexpr EnergyKernels kBaseline{lse_rows_float_baseline, ce_rows_float_baseline,
                                           grad_rows_float_baseline, softmax_rows_float_baseline,
                                           softmax_grad_rows_float_baseline};
#if JEM_EXT_X86_LEVELS
  static constexpr EnergyKernels kAvx2{lse_rows_float_avx2, ce_rows_float_avx2,
                                       grad_rows_float_avx2, softmax_rows_float_avx2,
                                       softmax_grad_rows_float_avx2};
  static constexpr EnergyKernels kAvx512{lse_rows_float_avx512, ce_rows_float_avx512,
                                         grad_rows_float_avx512, softmax_rows_float_avx512,
                                         softmax_grad_rows_float_avx512};
  return for_level(level, kBaseline, kAvx2, kAvx512);
#else
  return for_level(level, kBaseline, kBaseline, kBaseline);
#endif
}

template <typename scalar_t, typename acc_t>
void lse_block(const scalar_t* l, int64_t rows, int64_t C, const RowScratch<acc_t>& s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    energy_kernels(cpu_level()).lse_rows(l, rows, C, s);
  } else {
    lse_rows<scalar_t, acc_t>(l, rows, C, s);
  }
}

template <typename scalar_t, typename acc_t>
void ce_block(const scalar_t* l, int64_t rows, int64_t C, const int64_t* y,
              const RowScratch<acc_t>& s, scalar_t* e, scalar_t* ce) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    energy_kernels(cpu_level()).ce_rows(l, rows, C, y, s, e, ce);
  } else {
    ce_rows<scalar_t, acc_t>(l, rows, C, y, s, e, ce);
  }
}

template <typename scalar_t, typename acc_t>
void grad_block(const scalar_t* l, int64_t rows, int64_t C, const RowScratch<acc_t>& s,
                const acc_t* grad_lse, const int64_t* y, const acc_t* grad_pick, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    energy_kernels(cpu_level()).grad_rows(l, rows, C, s, grad_lse, y, grad_pick, out);
  } else {
    grad_rows<scalar_t, acc_t>(l, rows, C, s, grad_lse, y, grad_pick, out);
  }
}

template <typename scalar_t, typename acc_t>
void softmax_block(const scalar_t* l, int64_t rows, int64_t C, const RowScratch<acc_t>& s,
                   scalar_t* probs) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    energy_kernels(cpu_level()).softmax_rows(l, rows, C, s, probs);
  } else {
    lse_softmax_rows<scalar_t, acc_t>(l, rows, C, s, probs);
  }
}

template <typename scalar_t, typename acc_t>
void softmax_grad_block(scalar_t* probs, int64_t rows, int64_t C, const acc_t* grad_lse) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    energy_kernels(cpu_level()).softmax_grad_rows(probs, rows, C, grad_lse);
  } else {
    softmax_grad_rows<scalar_t, acc_t>(probs, rows, C, grad_lse);
  }
}

// Calls fn(first_row, rows, scratch) over blocks of rows, in parallel.
template <typename acc_t, typename Fn>
void for_row_blocks(int64_t B, int64_t C, const Fn& fn) {
  // Up to 16 classes, a multiple of 16 rows (whole groups for the loops
  // that run 16 or 8 rows at a time).
  int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / C);
  if (C <= 16) rows_per_block -= rows_per_block % 16;
  const int64_t n_blocks = (B + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, n_blocks, std::max<int64_t>(1, 8192 / (rows_per_block * C)),
                   [&](int64_t begin, int64_t end) {
                     std::vector<acc_t> buf(rows_per_block * (C + 3));
                     const RowScratch<acc_t> scratch{buf.data(), buf.data() + rows_per_block * C,
                                                     buf.data() + rows_per_block * (C + 1),
                                                     buf.data() + rows_per_block * (C + 2)};
                     for (int64_t blk = begin; blk < end; ++blk) {
                       const int64_t r0 = blk * rows_per_block;
                       fn(r0, std::min(rows_per_block, B - r0), scratch);
                     }
                   });
}

void check_labels_in_range(const char* op, const at::Tensor& y, int64_t C) {
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t b = 0; b < y.numel(); ++b) check_label(op, b, yp[b], C);
}

at::Tensor energy_cpu(const at::Tensor& logits_in, const c10::optional<at::Tensor>& y_in) {
  check_logits("energy", logits_in, y_in);
  check_device_type("energy", logits_in, at::kCPU);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({B}, logits.options());
  if (B == 0) return out;
  const bool has_y = y_in.has_value() && y_in->defined();
  if (has_y) {
    const at::Tensor y = y_in->contiguous();
    check_labels_in_range("energy", y, C);
    const int64_t* yp = y.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_cpu_y",
                                    [&] {
                                      const scalar_t* l = logits.data_ptr<scalar_t>();
                                      scalar_t* o = out.data_ptr<scalar_t>();
                                      for (int64_t b = 0; b < B; ++b) o[b] = -l[b * C + yp[b]];
                                    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* l = logits.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        for_row_blocks<acc_t>(B, C, [&](int64_t r0, int64_t rows, const RowScratch<acc_t>& s) {
          lse_block<scalar_t, acc_t>(l + r0 * C, rows, C, s);
          for (int64_t r = 0; r < rows; ++r) o[r0 + r] = static_cast<scalar_t>(-s.lse[r]);
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> energy_ce_cpu(const at::Tensor& logits_in,
                                                 const at::Tensor& y_in) {
  check_labels_given("energy_ce", y_in);
  check_logits("energy_ce", logits_in, y_in);
  check_device_type("energy_ce", logits_in, at::kCPU);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  check_labels_in_range("energy_ce", y, C);
  at::Tensor energy = at::empty({B}, logits.options());
  at::Tensor ce = at::empty({B}, logits.options());
  if (B == 0) return {energy, ce};
  const int64_t* yp = y.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_ce_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* l = logits.data_ptr<scalar_t>();
        scalar_t* e = energy.data_ptr<scalar_t>();
        scalar_t* ce_p = ce.data_ptr<scalar_t>();
        for_row_blocks<acc_t>(B, C, [&](int64_t r0, int64_t rows, const RowScratch<acc_t>& s) {
          lse_block<scalar_t, acc_t>(l + r0 * C, rows, C, s);
          ce_block<scalar_t, acc_t>(l + r0 * C, rows, C, yp + r0, s, e + r0, ce_p + r0);
        });
      });
  return {energy, ce};
}

std::tuple<at::Tensor, at::Tensor> energy_softmax_cpu(const at::Tensor& logits_in) {
  check_logits("_energy_softmax", logits_in, c10::nullopt);
  check_device_type("_energy_softmax", logits_in, at::kCPU);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor energy = at::empty({B}, logits.options());
  at::Tensor probs = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (B == 0) return {energy, probs};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_softmax_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* l = logits.data_ptr<scalar_t>();
        scalar_t* e = energy.data_ptr<scalar_t>();
        scalar_t* p = probs.data_ptr<scalar_t>();
        for_row_blocks<acc_t>(B, C, [&](int64_t r0, int64_t rows, const RowScratch<acc_t>& s) {
          softmax_block<scalar_t, acc_t>(l + r0 * C, rows, C, s, p + r0 * C);
          for (int64_t r = 0; r < rows; ++r) e[r0 + r] = static_cast<scalar_t>(-s.lse[r]);
        });
      });
  return {energy, probs};
}

// softmax <- -grad_energy[:, None] * softmax. grad_energy may have any
// stride (the backward of a sum hands over an expanded scalar): each block
// gathers its rows' negated coefficients into scratch.
void energy_softmax_backward_cpu_(const at::Tensor& probs, const at::Tensor& grad_energy_in) {
  const char* op = "_energy_softmax_backward_";
  check_logits(op, probs, c10::nullopt);
  check_row_vector(op, "grad_energy", grad_energy_in, probs);
  check_device_type(op, probs, at::kCPU);
  TORCH_CHECK(probs.is_contiguous(), op, ": softmax must be contiguous (it is updated in place)");
  const int64_t B = probs.size(0), C = probs.size(1);
  if (B == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, probs.scalar_type(), "energy_softmax_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor grad = grad_energy_in.to(c10::CppTypeToScalarType<acc_t>::value);
        scalar_t* p = probs.data_ptr<scalar_t>();
        const acc_t* g = grad.data_ptr<acc_t>();
        const int64_t g_stride = grad.stride(0);
        for_row_blocks<acc_t>(B, C, [&](int64_t r0, int64_t rows, const RowScratch<acc_t>& s) {
          for (int64_t r = 0; r < rows; ++r) s.lse[r] = -g[(r0 + r) * g_stride];
          softmax_grad_block<scalar_t, acc_t>(p + r0 * C, rows, C, s.lse);
        });
      });
}

at::Tensor energy_backward_cpu(const at::Tensor& logits_in, const c10::optional<at::Tensor>& y_in,
                               const c10::optional<at::Tensor>& energy_in,
                               const c10::optional<at::Tensor>& grad_lse_in,
                               const c10::optional<at::Tensor>& grad_pick_in) {
  const char* op = "energy_backward";
  check_backward_inputs(op, logits_in, y_in, energy_in, grad_lse_in, grad_pick_in);
  check_device_type(op, logits_in, at::kCPU);
  const bool has_y = y_in.has_value() && y_in->defined();
  const bool has_lse = grad_lse_in.has_value() && grad_lse_in->defined();
  const bool has_pick = grad_pick_in.has_value() && grad_pick_in->defined();
  const bool has_energy = energy_in.has_value() && energy_in->defined();
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (B == 0) return grad;
  at::Tensor y, energy, grad_lse, grad_pick;
  if (has_y) {
    y = y_in->contiguous();
    check_labels_in_range(op, y, C);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "energy_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // Row coefficients in acc_t, whatever dtype they came in.
        const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
        if (has_lse) grad_lse = grad_lse_in->to(acc_type).contiguous();
        if (has_pick) grad_pick = grad_pick_in->to(acc_type).contiguous();
        if (has_lse && has_energy) energy = energy_in->to(acc_type).contiguous();
        const scalar_t* l = logits.data_ptr<scalar_t>();
        scalar_t* out = grad.data_ptr<scalar_t>();
        const int64_t* yp = has_pick ? y.data_ptr<int64_t>() : nullptr;
        const acc_t* glse = has_lse ? grad_lse.data_ptr<acc_t>() : nullptr;
        const acc_t* gpick = has_pick ? grad_pick.data_ptr<acc_t>() : nullptr;
        const acc_t* ep = energy.defined() ? energy.data_ptr<acc_t>() : nullptr;
        for_row_blocks<acc_t>(B, C, [&](int64_t r0, int64_t rows, const RowScratch<acc_t>& s) {
          const int64_t* y_r = yp != nullptr ? yp + r0 : nullptr;
          const acc_t* pick_r = gpick != nullptr ? gpick + r0 : nullptr;
          if (!has_lse) {
            pick_grad_rows<scalar_t, acc_t>(rows, C, y_r, pick_r, out + r0 * C);
            return;
          }
          if (ep != nullptr) {
            for (int64_t r = 0; r < rows; ++r) s.lse[r] = -ep[r0 + r];
          } else {
            lse_block<scalar_t, acc_t>(l + r0 * C, rows, C, s);
          }
          grad_block<scalar_t, acc_t>(l + r0 * C, rows, C, s, glse + r0, y_r, pick_r, out + r0 * C);
        });
      });
  return grad;
}

}  // namespace
}  // namespace jem_ext

namespace jem_ext {
namespace {
// The CPU kernels refuse bad labels at once: nothing is ever recorded.
at::Tensor take_label_error_cpu(const at::Tensor& like) {
  return at::zeros({4}, like.options().dtype(at::kLong));
}
}  // namespace
}  // namespace jem_ext

TORCH_LIBRARY_IMPL(jem_ext, CPU, m) {
  m.impl("energy", &jem_ext::energy_cpu);
  // Below autograd the kept-softmax energy is the energy.
  m.impl("_energy_kept_softmax",
         [](const at::Tensor& logits) { return jem_ext::energy_cpu(logits, c10::nullopt); });
  m.impl("energy_ce", &jem_ext::energy_ce_cpu);
  m.impl("energy_backward", &jem_ext::energy_backward_cpu);
  m.impl("_energy_softmax", &jem_ext::energy_softmax_cpu);
  m.impl("_energy_softmax_backward_", &jem_ext::energy_softmax_backward_cpu_);
  m.impl("_take_label_error", &jem_ext::take_label_error_cpu);
}
