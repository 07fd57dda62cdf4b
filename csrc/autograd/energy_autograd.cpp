// Autograd kernel of _energy_kept_softmax: energy(logits) on the CPU whose
// forward keeps its softmax for the backward, which turns it into the
// gradient in place (no second pass of exps, no new B x C tensor). In C++
// because this is the hot path of every JEM iteration on the CPU: a Python
// autograd.Function costs a few hundred microseconds per forward + backward
// at 65536 x 10, a fifth of the whole op.
//
// Every other way of differentiating the energy ops (forward mode, torch.func
// transforms, torch.compile, double backward) goes through their Python
// autograd in jem_ext/ops.py; this kernel hands such calls to the energy op
// itself, so _energy_kept_softmax is differentiable in every way energy is.
// The per-element math is csrc/energy.h (via the CPU kernels it calls).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"

namespace jem_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor energy_op(const at::Tensor& logits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jem_ext::energy", "")
                       .typed<at::Tensor(const at::Tensor&, const c10::optional<at::Tensor>&)>();
  return op.call(logits, c10::nullopt);
}

std::tuple<at::Tensor, at::Tensor> energy_softmax_op(const at::Tensor& logits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jem_ext::_energy_softmax", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(logits);
}

void softmax_backward_op_(const at::Tensor& probs, const at::Tensor& grad_energy) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jem_ext::_energy_softmax_backward_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&)>();
  op.call(probs, grad_energy);
}

at::Tensor energy_backward_op(const at::Tensor& logits, const at::Tensor& energy,
                              const at::Tensor& grad_lse) {
  using opt = const c10::optional<at::Tensor>&;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jem_ext::energy_backward", "")
                       .typed<at::Tensor(const at::Tensor&, opt, opt, opt, opt)>();
  return op.call(logits, c10::nullopt, energy, grad_lse, c10::nullopt);
}

// Tensors this kernel leaves to energy's Python autograd: forward-mode
// tangents, torch.func wrappers (and batched gradients), tensor subclasses
// and functionalization.
bool needs_general_autograd(const at::Tensor& t) {
  constexpr c10::DispatchKeySet kSpecial(
      {c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Batched,
       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Python,
       c10::DispatchKey::Functionalize, c10::DispatchKey::BatchedNestedTensor});
  if (t.key_set().has_any(kSpecial)) return true;
  const auto* meta = torch::autograd::impl::get_autograd_meta(t);
  return meta != nullptr && meta->fw_grad_ != nullptr && !meta->fw_grad_->empty();
}

struct EnergyKeptSoftmax : public torch::autograd::Function<EnergyKeptSoftmax> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits) {
    at::Tensor energy, probs;
    {
      c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
      std::tie(energy, probs) = energy_softmax_op(logits);
    }
    ctx->save_for_backward({logits, energy});
    // Not saved for backward (no version tracking needed: nothing else sees
    // it): the first backward takes it over as its gradient, in place.
    ctx->saved_data["probs"] = probs;
    return energy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& grad = grads[0];
    if (at::GradMode::is_enabled() || needs_general_autograd(grad)) {
      // The backward is itself differentiated (create_graph), or the
      // gradient is batched (autograd.grad(is_grads_batched=True)):
      // energy_backward carries the second-order formula and a vmap rule.
      return {energy_backward_op(logits, saved[1], grad.neg())};
    }
    at::Tensor probs;
    const auto kept = ctx->saved_data.find("probs");
    if (kept != ctx->saved_data.end()) {
      probs = kept->second.toTensor();
      ctx->saved_data.erase(kept);
    }
    c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
    if (!probs.defined()) {  // a later backward of a retained graph: the same bits again
      probs = std::get<1>(energy_softmax_op(logits));
    }
    softmax_backward_op_(probs, grad);
    return {probs};
  }
};

// The kept softmax is for float32 and float64 CPU tensors (a half type
// would round it); the energy op serves the others.
bool keeps_softmax(const at::Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
         !needs_general_autograd(t);
}

at::Tensor energy_kept_softmax_autograd(const at::Tensor& logits) {
  if (!keeps_softmax(logits)) return energy_op(logits);
  if (at::GradMode::is_enabled() && logits.requires_grad()) {
    check_logits("energy", logits, c10::nullopt);
    return EnergyKeptSoftmax::apply(logits);
  }
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
  return energy_op(logits);
}

}  // namespace
}  // namespace jem_ext

TORCH_LIBRARY_IMPL(jem_ext, Autograd, m) {
  m.impl("_energy_kept_softmax", &jem_ext::energy_kept_softmax_autograd);
}
