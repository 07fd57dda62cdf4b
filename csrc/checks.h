// Input checks shared by the launchers: each message names the op, what was
// expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace jem_ext {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
      op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name,
              "'s device ", ref.device(), ", got ", t.device());
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
    TORCH_CHECK(y->scalar_type() == at::kLong, op, ": y must be int64, got ",
                y->scalar_type());
    TORCH_CHECK(y->dim() == 1 && y->size(0) == logits.size(0), op,
                ": y must have shape [", logits.size(0), "] to match logits ",
                logits.sizes(), ", got ", y->sizes());
    check_same_device(op, "y", *y, logits, "logits");
  }
}

// A per-row coefficient of the backward: [B] on logits' device.
inline void check_row_vector(const char* op, const char* name,
                             const c10::optional<at::Tensor>& t, const at::Tensor& logits) {
  if (!t.has_value() || !t->defined()) return;
  check_floating(op, name, *t);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0), op, ": ", name,
              " must have shape [", logits.size(0), "], got ", t->sizes());
  check_same_device(op, name, *t, logits, "logits");
}

inline void check_sgld_inputs(const char* op, const at::Tensor& x, const at::Tensor& grad,
                              double noise_std, c10::optional<double> clamp_min,
                              c10::optional<double> clamp_max,
                              c10::optional<double> grad_clip) {
  check_floating(op, "x", x);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have x's shape ", x.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  check_same_device(op, "grad", grad, x, "x");
  TORCH_CHECK(noise_std >= 0, op, ": noise_std must be >= 0, got ", noise_std);
  TORCH_CHECK(!grad_clip.has_value() || *grad_clip >= 0, op,
              ": grad_clip must be >= 0, got ", *grad_clip);
  TORCH_CHECK(!(clamp_min.has_value() && clamp_max.has_value()) || *clamp_min <= *clamp_max,
              op, ": clamp_min must be <= clamp_max, got ", *clamp_min, " > ", *clamp_max);
}

}  // namespace jem_ext
