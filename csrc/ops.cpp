// Every schema of the jem_ext op library, in one place. Each dispatch
// concern has its own file:
//   csrc/cpu/*_cpu.cpp, csrc/cuda/*_cuda.cu   device kernels
//   csrc/autograd/sgld_autograd.cpp          Autograd kernels of the SGLD ops
//   csrc/autograd/energy_autograd.cpp        the CPU energy's kept-softmax autograd
//   jem_ext/ops.py                           fake kernels, vmap rules, energy autograd
#include <torch/library.h>

#include "cpu/cpu_level.h"

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
  // energy(logits) whose autograd (csrc/autograd/energy_autograd.cpp) keeps
  // the forward's softmax for the backward (CPU kernel only: there the exps
  // dominate the cost). What jem_ext.ops.energy calls on the CPU when a
  // backward will follow.
  m.def("_energy_kept_softmax(Tensor logits) -> Tensor");
  // (E = -logsumexp, softmax) in one pass: that autograd's forward.
  m.def("_energy_softmax(Tensor logits) -> (Tensor, Tensor)");
  // Its backward, in the softmax's memory: softmax <- -grad_energy[:, None] * softmax
  // (d/dlogits of the energy). Returns nothing, as sgld_step_.
  m.def("_energy_softmax_backward_(Tensor(a!) softmax, Tensor grad_energy) -> ()");
  // d/dlogits = grad_lse[:, None] * softmax + grad_pick[:, None] * onehot(y).
  // `energy` (= -logsumexp) saves recomputing the row sums; when absent the
  // kernel recomputes them from the logits.
  m.def(
      "energy_backward(Tensor logits, Tensor? y, Tensor? energy, Tensor? grad_lse, "
      "Tensor? grad_pick) -> Tensor");
  // The record of the first out-of-range label a CUDA energy kernel met
  // since the last call, as int64 [op, row, label, classes] (op 0: none; 1
  // energy, 2 energy_ce, 3 energy_backward) on `like`'s device, and clears
  // it, without waiting for the device. CPU kernels raise at once, so on the
  // CPU the record is always empty. See jem_ext.ops.raise_label_errors.
  m.def("_take_label_error(Tensor like) -> Tensor");
  // The instruction-set level the CPU kernels run at ("avx512", "avx2" or
  // "baseline"; see csrc/cpu/cpu_level.h). No tensor to dispatch on, so the
  // kernel is bound here, for every backend.
  m.def("_cpu_level() -> str", &jem_ext::cpu_level_in_use);
}
