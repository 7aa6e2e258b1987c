// Public C++ entry points of the sdmprune extension (shared by the Python module and ctest).
#pragma once
#include <torch/torch.h>

namespace sdmprune {

// True when the CUDA kernels were compiled in (WITH_CUDA).
bool compiled_with_cuda();

}  // namespace sdmprune
