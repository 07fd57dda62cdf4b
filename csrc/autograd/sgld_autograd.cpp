// Autograd kernels of the in-place SGLD ops: they refuse inputs that
// require grad, carry a forward-mode tangent or come from a torch.func
// grad/jvp transform instead of letting autograd record an in-place op it cannot
// differentiate, then run the device kernel below autograd and bump x's
// version counter.
//
// The differentiable energy ops take their formulas from
// torch.library.register_autograd in jem_ext/ops.py (which gives double
// backward through the energy_backward op and works under torch.compile).
// These two cannot join them there: register_autograd accepts only
// functional ops, and a Python Autograd kernel would add an interpreter
// round trip to every SGLD step, so they stay here, in C++.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace jem_ext {
namespace {

// A forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp) or a
// torch.func gradient wrapper: the update would leave it stale.
bool differentiated(const at::Tensor& t) {
  if (t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper)) return true;
  const auto* meta = torch::autograd::impl::get_autograd_meta(t);
  return meta != nullptr && meta->fw_grad_ != nullptr && !meta->fw_grad_->empty();
}

void refuse_grad(const char* op, const at::Tensor& x, const at::Tensor& grad) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && (x.requires_grad() || grad.requires_grad())), op,
              " is not differentiable: call it under torch.no_grad() on tensors that do not "
              "require grad (got x.requires_grad=",
              x.requires_grad(), ", grad.requires_grad=", grad.requires_grad(), ")");
  TORCH_CHECK(!differentiated(x) && !differentiated(grad), op,
              " is not differentiable: it takes no forward-mode dual tensors and runs under no "
              "torch.func grad or jvp transform (got a tangent or a transformed tensor in ",
              differentiated(x) ? "x" : "grad", ")");
}

void sgld_step_autograd(at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
                        c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                        c10::optional<double> grad_clip, c10::optional<at::Generator> generator) {
  refuse_grad("sgld_step_", x, grad);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jem_ext::sgld_step_", "")
                       .typed<decltype(sgld_step_autograd)>();
  {
    c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
    op.call(x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip, std::move(generator));
  }
  x.unsafeGetTensorImpl()->bump_version();
}

void sgld_step_philox_autograd(at::Tensor& x, const at::Tensor& grad, double step_size,
                               double noise_std, c10::optional<double> clamp_min,
                               c10::optional<double> clamp_max, c10::optional<double> grad_clip,
                               int64_t seed, int64_t offset) {
  refuse_grad("_sgld_step_philox_", x, grad);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jem_ext::_sgld_step_philox_", "")
                       .typed<decltype(sgld_step_philox_autograd)>();
  {
    c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
    op.call(x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip, seed, offset);
  }
  x.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace jem_ext

TORCH_LIBRARY_IMPL(jem_ext, Autograd, m) {
  m.impl("sgld_step_", &jem_ext::sgld_step_autograd);
  m.impl("_sgld_step_philox_", &jem_ext::sgld_step_philox_autograd);
}
