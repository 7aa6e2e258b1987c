// In-place channel gather: internal declarations shared by gather.cpp (validation, wave planner,
// CPU kernels, op registration) and gather_cuda.cu (CUDA kernels). ATen only (no pybind11), so nvcc
// and the CMake library can include it.
//
// Both ops are "monotone compactions": output unit o is read from source unit src(o) of the same
// storage, with src strictly increasing and src(o) >= o (idx strictly increasing, idx[i] >= i, and
// k <= C). A sequential pass in increasing o is therefore safe (every write lands at or below the
// position being read, and never on a source still to be read). To run in parallel, the planner
// cuts the work into WAVES executed one after another:
//   * a DIRECT wave [a, b) moves its units straight to their destinations; it is only emitted when
//     every destination of the wave lies strictly below every source of the wave, so the units of a
//     wave can be copied in any order / in parallel. Destinations of a wave never touch a source of a
//     later wave either (later sources are higher still).
//   * a SCRATCH wave [a, b) first gathers its sources into a scratch buffer (all reads), then copies
//     the buffer onto its destinations (all writes). The wave's own sources may be overwritten in the
//     second phase, which is fine because they were all read in the first; later sources are above.
// The scratch buffer is at most max(scratch_bytes, one output unit) bytes (default 8 MiB) and is only
// allocated when the plan has a scratch wave: it does not grow with R*C.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sdmprune {

// Default scratch budget (bytes) when the caller passes scratch_bytes < 0.
constexpr int64_t kDefaultScratchBytes = int64_t(8) << 20;

struct Wave {
  int64_t begin;  // first unit (kept row for gather_rows_, row of w for gather_cols_)
  int64_t end;    // one past the last unit
  bool direct;    // true: copy in place; false: through the scratch buffer
};

// The checks that need no index values (layout, shapes, dtype, device, non-empty).
void check_gather_meta(const at::Tensor& w, const at::Tensor& idx, const char* op);

// Validates (w, idx) for an op gathering along `dim` (0: rows, 1: columns) and returns idx as a
// contiguous CPU int64 tensor (a device-to-host copy, i.e. a synchronisation, for CUDA idx).
at::Tensor check_gather_args(const at::Tensor& w, const at::Tensor& idx, int64_t dim, const char* op);

// Wave plans. idx: host pointer to k strictly increasing indices.
// Rows: unit = kept row i (destination row i, source row idx[i]); unit_bytes = C * element size.
std::vector<Wave> plan_gather_rows(const int64_t* idx, int64_t k, int64_t unit_bytes, int64_t scratch_bytes);
// Columns: unit = row r of w (destination [r*k, r*k+k), sources r*C + idx[j]); out_unit_bytes = k * element size.
std::vector<Wave> plan_gather_cols(const int64_t* idx, int64_t k, int64_t R, int64_t C, int64_t out_unit_bytes,
                                   int64_t scratch_bytes);

// The scratch bytes a plan needs (0 when it has no scratch wave).
int64_t plan_scratch_bytes(const std::vector<Wave>& plan, int64_t unit_bytes);

int64_t resolve_scratch_bytes(int64_t scratch_bytes);

// CPU implementations (registered for the CPU dispatch key).
at::Tensor gather_rows_cpu(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes);
at::Tensor gather_cols_cpu(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes);

}  // namespace sdmprune
