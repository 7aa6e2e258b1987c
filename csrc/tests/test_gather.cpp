// ctest: the CPU in-place gather (through the dispatcher) equals index_select on random shapes,
// dtypes and scratch budgets, keeps the data pointer, and rejects bad indices.
#include <iostream>
#include <string>

#include "sdmprune.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::cerr << "FAIL: " << what << "\n";
    ++failures;
  }
}

at::Tensor random_keep(int64_t n, int64_t k) {
  return std::get<0>(torch::randperm(n, torch::kLong).narrow(0, 0, k).sort());
}

void check_case(int64_t R, int64_t C, int64_t k, int dim, at::ScalarType dtype, int64_t scratch) {
  at::Tensor w = torch::randn({R, C}).to(dtype);
  at::Tensor idx = random_keep(dim == 0 ? R : C, k);
  at::Tensor ref = w.index_select(dim, idx);
  void* ptr = w.data_ptr();
  at::Tensor out = dim == 0 ? sdmprune::gather_rows_(w, idx, scratch) : sdmprune::gather_cols_(w, idx, scratch);
  const std::string name = std::string(dim == 0 ? "rows" : "cols") + " R=" + std::to_string(R) + " C=" +
                           std::to_string(C) + " k=" + std::to_string(k) + " scratch=" + std::to_string(scratch) +
                           " dtype=" + std::string(c10::toString(dtype));
  expect(out.data_ptr() == ptr, name + ": data pointer changed");
  expect(out.sizes() == ref.sizes(), name + ": shape");
  expect(out.is_contiguous(), name + ": not contiguous");
  expect(torch::equal(out, ref), name + ": differs from index_select");
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble, at::kByte};
  const int64_t shapes[][2] = {{1, 1}, {7, 5}, {33, 17}, {64, 96}, {129, 71}};
  for (auto dt : dtypes) {
    for (auto& s : shapes) {
      for (int dim = 0; dim < 2; ++dim) {
        const int64_t n = s[dim];
        for (int64_t k : {int64_t(1), (n + 1) / 2, n - (n > 1 ? 1 : 0), n}) {
          for (int64_t scratch : {int64_t(-1), int64_t(0), int64_t(64)}) check_case(s[0], s[1], k, dim, dt, scratch);
        }
      }
    }
  }
  // Bad input raises.
  at::Tensor w = torch::zeros({4, 4});
  auto raises = [&](at::Tensor idx, const std::string& what) {
    try {
      sdmprune::gather_rows_(w, idx);
      expect(false, what + ": did not raise");
    } catch (const c10::Error&) {
    }
  };
  raises(torch::tensor({2, 1}, torch::kLong), "unsorted");
  raises(torch::tensor({1, 1}, torch::kLong), "duplicate");
  raises(torch::tensor({0, 4}, torch::kLong), "out of range");
  raises(torch::tensor({0, 1}, torch::kInt), "int32 idx");
  raises(torch::empty({0}, torch::kLong), "empty idx");
  if (failures) {
    std::cerr << failures << " failure(s)\n";
    return 1;
  }
  std::cout << "ok\n";
  return 0;
}
