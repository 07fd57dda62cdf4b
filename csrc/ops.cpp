// Every schema of the jem_ext op library, in one place.
//
// Device kernels register in csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu;
// fake (meta) kernels and autograd formulas for `energy` live in
// jem_ext/ops.py. `sgld_step_` is not differentiable: its Autograd kernel
// below refuses inputs that require grad instead of letting autograd record
// an in-place op it cannot differentiate.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace jem_ext {
namespace {

void refuse_grad(const char* op, const at::Tensor& x, const at::Tensor& grad) {
  TORCH_CHECK(
      !(at::GradMode::is_enabled() && (x.requires_grad() || grad.requires_grad())), op,
      " is not differentiable: call it under torch.no_grad() on tensors that do not "
      "require grad (got x.requires_grad=", x.requires_grad(),
      ", grad.requires_grad=", grad.requires_grad(), ")");
}

void sgld_step_autograd(at::Tensor& x, const at::Tensor& grad, double step_size,
                               double noise_std, c10::optional<double> clamp_min,
                               c10::optional<double> clamp_max,
                               c10::optional<double> grad_clip,
                               c10::optional<at::Generator> generator) {
  refuse_grad("sgld_step_", x, grad);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jem_ext::sgld_step_", "")
                       .typed<decltype(sgld_step_autograd)>();
  {
    c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
    op.call(x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip,
            std::move(generator));
  }
  x.unsafeGetTensorImpl()->bump_version();
}

void sgld_step_philox_autograd(at::Tensor& x, const at::Tensor& grad,
                                      double step_size, double noise_std,
                                      c10::optional<double> clamp_min,
                                      c10::optional<double> clamp_max,
                                      c10::optional<double> grad_clip, int64_t seed,
                                      int64_t offset) {
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

TORCH_LIBRARY(jem_ext, m) {
  // x <- clamp(x - step_size * clip(grad) + noise_std * N(0, 1)), in place.
  // Returns nothing: functionalization (torch.compile) rejects custom ops
  // whose outputs alias inputs; the Python face returns x.
  m.def(
      "sgld_step_(Tensor(a!) x, Tensor grad, float step_size, float noise_std, "
      "float? clamp_min=None, float? clamp_max=None, float? grad_clip=None, "
      "Generator? generator=None) -> ()");
  // The same update with the noise of an explicit Philox (seed, offset):
  // reproducible across devices, used by tests and benchmarks.
  m.def(
      "_sgld_step_philox_(Tensor(a!) x, Tensor grad, float step_size, float noise_std, "
      "float? clamp_min, float? clamp_max, float? grad_clip, int seed, int offset) -> ()");
  // E = -logsumexp(logits, 1), or -logits[b, y[b]] when y is given.
  m.def("energy(Tensor logits, Tensor? y=None) -> Tensor");
  // One pass: (E = -logsumexp, per-sample cross-entropy = logsumexp - logits[y]).
  m.def("energy_ce(Tensor logits, Tensor y) -> (Tensor, Tensor)");
  // d/dlogits = grad_lse[:, None] * softmax + grad_pick[:, None] * onehot(y).
  // `energy` (= -logsumexp) saves recomputing the row sums; when absent the
  // kernel recomputes them from the logits.
  m.def(
      "energy_backward(Tensor logits, Tensor? y, Tensor? energy, Tensor? grad_lse, "
      "Tensor? grad_pick) -> Tensor");
}

TORCH_LIBRARY_IMPL(jem_ext, Autograd, m) {
  m.impl("sgld_step_", &jem_ext::sgld_step_autograd);
  m.impl("_sgld_step_philox_", &jem_ext::sgld_step_philox_autograd);
}
