// Input checks shared by the launchers: each message names the op, what was
// expected and what came.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

namespace jem_ext {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ",
              ref.device(), ", got ", t.device());
}

inline void check_device_type(const char* op, const at::Tensor& t, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, op, ": expected ", c10::DeviceTypeName(type, true),
              " tensors, got ", t.device());
}

// energy_ce's labels are required (the schema's Tensor arrives undefined
// when Python passes None).
inline void check_labels_given(const char* op, const at::Tensor& y) {
  TORCH_CHECK(y.defined(), op, ": y (int64 class labels of shape [batch]) is required, got None");
}

// One label against the number of classes: the message every launcher gives.
inline void check_label(const char* op, int64_t b, int64_t label, int64_t C) {
  TORCH_CHECK(label >= 0 && label < C, op, ": label y[", b, "] = ", label, " is out of range for ",
              C, " classes");
}

// logits [B, C] with C >= 1, optional labels y (int64 [B]) on the same device.
inline void check_logits(const char* op, const at::Tensor& logits,
                         const c10::optional<at::Tensor>& y) {
  check_floating(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [batch, classes], got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits need at least one class, got shape ",
              logits.sizes());
  if (y.has_value() && y->defined()) {
    TORCH_CHECK(y->scalar_type() == at::kLong, op, ": y must be int64, got ", y->scalar_type());
    TORCH_CHECK(y->dim() == 1 && y->size(0) == logits.size(0), op, ": y must have shape [",
                logits.size(0), "] to match logits ", logits.sizes(), ", got ", y->sizes());
    check_same_device(op, "y", *y, logits, "logits");
  }
}

// A per-row coefficient of the backward: [B] on logits' device.
inline void check_row_vector(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                             const at::Tensor& logits) {
  if (!t.has_value() || !t->defined()) return;
  check_floating(op, name, *t);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0), op, ": ", name, " must have shape [",
              logits.size(0), "], got ", t->sizes());
  check_same_device(op, name, *t, logits, "logits");
}

// All inputs of energy_backward.
inline void check_backward_inputs(const char* op, const at::Tensor& logits,
                                  const c10::optional<at::Tensor>& y,
                                  const c10::optional<at::Tensor>& energy,
                                  const c10::optional<at::Tensor>& grad_lse,
                                  const c10::optional<at::Tensor>& grad_pick) {
  check_logits(op, logits, y);
  check_row_vector(op, "energy", energy, logits);
  check_row_vector(op, "grad_lse", grad_lse, logits);
  check_row_vector(op, "grad_pick", grad_pick, logits);
  const bool has_y = y.has_value() && y->defined();
  const bool has_pick = grad_pick.has_value() && grad_pick->defined();
  TORCH_CHECK(!has_pick || has_y, op, ": grad_pick needs the labels y");
}

inline void check_not_nan(const char* op, const char* name, const c10::optional<double>& v) {
  TORCH_CHECK(!v.has_value() || !std::isnan(*v), op, ": ", name,
              " must be a number or None, got nan");
}

// Element range [first, last] that t spans in its storage.
inline std::pair<int64_t, int64_t> storage_span(const at::Tensor& t) {
  int64_t first = t.storage_offset(), last = first;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? first : last) += reach;
  }
  return {first, last};
}

// Whether a and b are the same view of the same memory.
inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.is_alias_of(b) && a.storage_offset() == b.storage_offset() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

// Whether grad shares memory with x without being the same view. Where
// torch cannot tell cheaply (strided views), any intersection of the two
// storage ranges counts.
inline bool partially_overlaps(const at::Tensor& x, const at::Tensor& grad) {
  if (x.numel() == 0 || grad.numel() == 0 || same_view(x, grad)) return false;
  switch (at::get_overlap_status(x, grad)) {
    case at::MemOverlapStatus::No:
      return false;
    case at::MemOverlapStatus::TooHard: {
      if (!x.is_alias_of(grad)) return false;
      const auto a = storage_span(x), b = storage_span(grad);
      return a.first <= b.second && b.first <= a.second;
    }
    default:  // Partial, or Full with other strides
      return true;
  }
}

// x is written in place while grad is read: like torch's in-place ops, x
// may not write one memory location twice (an expanded view), and grad may
// not share memory with x unless it is x itself (then every element reads
// its own value before writing it).
inline void check_sgld_overlap(const char* op, const at::Tensor& x, const at::Tensor& grad) {
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, op,
              ": x has elements that share memory (e.g. an expanded view); pass a tensor "
              "whose elements are distinct, e.g. x.clone()");
  TORCH_CHECK(!partially_overlaps(x, grad), op,
              ": grad shares memory with x without being x itself; pass grad=x or a "
              "separate tensor, e.g. grad.clone()");
}

inline void check_sgld_inputs(const char* op, const at::Tensor& x, const at::Tensor& grad,
                              double step_size, double noise_std, c10::optional<double> clamp_min,
                              c10::optional<double> clamp_max, c10::optional<double> grad_clip) {
  check_floating(op, "x", x);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have x's shape ", x.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  check_same_device(op, "grad", grad, x, "x");
  check_sgld_overlap(op, x, grad);
  TORCH_CHECK(std::isfinite(step_size), op, ": step_size must be finite, got ", step_size);
  TORCH_CHECK(noise_std >= 0 && std::isfinite(noise_std), op,
              ": noise_std must be finite and >= 0, got ", noise_std);
  TORCH_CHECK(!grad_clip.has_value() || *grad_clip >= 0, op, ": grad_clip must be >= 0, got ",
              *grad_clip);
  check_not_nan(op, "clamp_min", clamp_min);
  check_not_nan(op, "clamp_max", clamp_max);
  TORCH_CHECK(!(clamp_min.has_value() && clamp_max.has_value()) || *clamp_min <= *clamp_max, op,
              ": clamp_min must be <= clamp_max, got ", *clamp_min, " > ", *clamp_max);
}

}  // namespace jem_ext
