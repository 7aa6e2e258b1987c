// ctest: the library links against libtorch and reports how it was built.
#include <iostream>
#include "sdmprune.h"

int main() {
#ifdef WITH_CUDA
  const bool expect = true;
#else
  const bool expect = false;
#endif
  if (sdmprune::compiled_with_cuda() != expect) {
    std::cerr << "compiled_with_cuda() disagrees with the build flags\n";
    return 1;
  }
  std::cout << "ok\n";
  return 0;
}
