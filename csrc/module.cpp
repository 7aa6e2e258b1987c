// pybind11 module sdmprune._C (the ops are also registered with the dispatcher as torch.ops.sdmprune.*).
#include <torch/extension.h>

#include "sdmprune.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdmprune C++/CUDA extension";
  m.def("compiled_with_cuda", &sdmprune::compiled_with_cuda, "True when the CUDA kernels were built");
}
