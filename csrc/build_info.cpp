// Build facts of the extension, so Python can tell which kernels were compiled in.
#include "sdmprune.h"

namespace sdmprune {

bool compiled_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace sdmprune
