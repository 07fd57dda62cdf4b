// jem_ext._C: the compiled half of jem_ext.
//
// Importing this module loads the op library (csrc/), whose static
// registrations put torch.ops.jem_ext.* in place; the module itself only
// reports how it was built. It uses plain pybind11, not torch/extension.h:
// the ops reach Python through the dispatcher, so there is no need to link
// libtorch_python.
#include <pybind11/pybind11.h>

#ifndef JEM_EXT_VERSION
#error "JEM_EXT_VERSION must be defined by the build"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "jem_ext compiled ops (registered as torch.ops.jem_ext.*) and build facts";
  py::dict info;
  info["version"] = JEM_EXT_VERSION;
  info["torch_version"] = JEM_EXT_TORCH_VERSION;
#ifdef JEM_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = JEM_EXT_CUDA_VERSION;
  info["cuda_archs"] = JEM_EXT_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(JEM_EXT_NO_CLONES)
  info["cpu_dispatch"] = "x86-64-v4 (AVX-512) and x86-64-v3 (AVX2+FMA) clones, baseline fallback";
#else
  info["cpu_dispatch"] = "baseline";
#endif
  m.attr("build_info") = info;
}
