// jem_ext._C: the compiled half of jem_ext.
//
// Importing this module loads the op library (csrc/), whose static
// registrations put torch.ops.jem_ext.* in place; the module itself only
// reports how it was built. It uses plain pybind11, not torch/extension.h:
// the ops reach Python through the dispatcher, so there is no need to link
// libtorch_python.
#include <pybind11/pybind11.h>

#include "cpu/cpu_level.h"  // JEM_EXT_X86_LEVELS

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
#if JEM_EXT_X86_LEVELS
  info["cpu_dispatch"] = "avx512, avx2 and baseline loops, chosen at run time";
#else
  info["cpu_dispatch"] = "baseline";
#endif
  m.attr("build_info") = info;
}
