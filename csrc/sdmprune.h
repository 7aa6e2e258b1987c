// Public C++ entry points of the sdmprune extension (shared by the Python module and ctest).
#pragma once
#include <torch/torch.h>

namespace sdmprune {

// True when the CUDA kernels were compiled in (WITH_CUDA).
bool compiled_with_cuda();

// In-place channel gather (dispatches to the CPU or CUDA kernel of torch.ops.sdmprune.*).
// w: [R, C] contiguous, any dtype; idx: 1-D int64 on w's device, strictly increasing, non-empty.
//   gather_rows_: rows idx of w move to rows 0..k-1 of w's own storage; returns that [k, C] view.
//   gather_cols_: columns idx of every row are compacted so the first R*k elements of the storage hold
//                 the contiguous [R, k] result; returns that view.
// Extra memory: a scratch buffer of at most max(scratch_bytes, one output row) bytes (scratch_bytes < 0:
// 8 MiB), allocated only when needed; plus, for CUDA, a host copy of idx. The rest of the storage
// (beyond the returned view) is left with stale data.
at::Tensor gather_rows_(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes = -1);
at::Tensor gather_cols_(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes = -1);

}  // namespace sdmprune
