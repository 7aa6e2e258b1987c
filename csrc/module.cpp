// pybind11 module sdmprune._C (the ops are also registered with the dispatcher as torch.ops.sdmprune.*).
#include <torch/extension.h>

#include "gather.h"
#include "sdmprune.h"

namespace {

// The wave plan of an op, as a list of (begin, end, direct) for tests and benchmarks.
std::vector<std::tuple<int64_t, int64_t, bool>> to_list(const std::vector<sdmprune::Wave>& plan) {
  std::vector<std::tuple<int64_t, int64_t, bool>> out;
  for (const auto& w : plan) out.emplace_back(w.begin, w.end, w.direct);
  return out;
}

at::Tensor host_idx(const at::Tensor& idx) { return idx.to(at::kCPU, at::kLong).contiguous(); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdmprune C++/CUDA extension";
  m.def("compiled_with_cuda", &sdmprune::compiled_with_cuda, "True when the CUDA kernels were built");
  m.def("gather_rows_", &sdmprune::gather_rows_, py::arg("w"), py::arg("idx"), py::arg("scratch_bytes") = -1,
        "In place: rows idx of w [R, C] -> rows 0..k-1 of its storage; returns the [k, C] view");
  m.def("gather_cols_", &sdmprune::gather_cols_, py::arg("w"), py::arg("idx"), py::arg("scratch_bytes") = -1,
        "In place: columns idx of w [R, C] -> the first R*k elements of its storage; returns the [R, k] view");
  m.def(
      "plan_rows",
      [](const at::Tensor& idx, int64_t unit_bytes, int64_t scratch_bytes) {
        at::Tensor h = host_idx(idx);
        return to_list(sdmprune::plan_gather_rows(h.data_ptr<int64_t>(), h.numel(), unit_bytes, scratch_bytes));
      },
      py::arg("idx"), py::arg("unit_bytes"), py::arg("scratch_bytes") = -1,
      "Wave plan of gather_rows_: [(begin, end, direct)]");
  m.def(
      "plan_cols",
      [](const at::Tensor& idx, int64_t R, int64_t C, int64_t out_unit_bytes, int64_t scratch_bytes) {
        at::Tensor h = host_idx(idx);
        return to_list(
            sdmprune::plan_gather_cols(h.data_ptr<int64_t>(), h.numel(), R, C, out_unit_bytes, scratch_bytes));
      },
      py::arg("idx"), py::arg("R"), py::arg("C"), py::arg("out_unit_bytes"), py::arg("scratch_bytes") = -1,
      "Wave plan of gather_cols_: [(begin, end, direct)]");
  m.attr("DEFAULT_SCRATCH_BYTES") = sdmprune::kDefaultScratchBytes;
}
