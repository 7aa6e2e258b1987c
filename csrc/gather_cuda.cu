// CUDA kernels of the in-place channel gather (torch.ops.sdmprune.gather_rows_ / gather_cols_).
//
// The work is cut into waves by the same host planner as the CPU path (gather.h explains why a
// wave is safe to run fully in parallel): a direct wave is ONE kernel whose destinations are all
// below all of its sources, so no block reads bytes another block of the same launch writes; a
// scratch wave is a gather kernel into the scratch buffer followed by a contiguous
// cudaMemcpyAsync onto the destinations. Waves are ordered by the stream. The only extra device
// memory is the scratch buffer: at most max(scratch_bytes, one output row) bytes (default 8 MiB),
// allocated through the caching allocator only when the plan has a scratch wave. idx is validated
// and planned on the host (one device-to-host copy of k int64 values, which synchronises).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "gather.h"

namespace sdmprune {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

// dst row i (i in [0, nrows)) = src row idx[i]; rows are `units` vectors of type V (V chosen so that
// every row start is V-aligned: 16-byte accesses when the row size and the pointers allow).
// blockIdx.x: chunk of a row, blockIdx.y: rows (grid-stride).
template <typename V>
__global__ void copy_rows_kernel(const V* __restrict__ src, V* __restrict__ dst, const int64_t* __restrict__ idx,
                                 int64_t nrows, int64_t units) {
  const int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= units) return;
  for (int64_t i = blockIdx.y; i < nrows; i += gridDim.y) {
    dst[i * units + u] = src[idx[i] * units + u];
  }
}

// dst[(r - a) * k + j] = src[r * C + idx[j]] for rows r in [a, a + nrows). Each thread keeps its
// column index in a register across the rows it visits. blockIdx.x: columns, blockIdx.y: rows.
template <typename T>
__global__ void gather_cols_kernel(const T* __restrict__ src, T* __restrict__ dst, const int64_t* __restrict__ idx,
                                   int64_t k, int64_t C, int64_t a, int64_t nrows) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t c = idx[j];
  for (int64_t r = blockIdx.y; r < nrows; r += gridDim.y) {
    dst[r * k + j] = src[(a + r) * C + c];
  }
}

// The widest access (16, 8, 4, 2 or 1 bytes) dividing the row size and every base address.
int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int v : {16, 8, 4, 2}) {
    bool ok = row_bytes % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % v == 0;
    if (ok) return v;
  }
  return 1;
}

template <typename V>
void launch_rows(const char* src, char* dst, const int64_t* idx, int64_t nrows, int64_t row_bytes,
                 cudaStream_t stream) {
  const int64_t units = row_bytes / int64_t(sizeof(V));
  const dim3 grid(static_cast<unsigned>((units + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min(nrows, kMaxGridY)));
  copy_rows_kernel<V><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const V*>(src), reinterpret_cast<V*>(dst),
                                                      idx, nrows, units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_rows(const char* src, char* dst, const int64_t* idx, int64_t nrows, int64_t row_bytes,
               cudaStream_t stream) {
  if (nrows <= 0 || row_bytes <= 0) return;
  switch (vector_bytes(row_bytes, {src, dst})) {
    case 16: launch_rows<Bytes16>(src, dst, idx, nrows, row_bytes, stream); break;
    case 8: launch_rows<uint64_t>(src, dst, idx, nrows, row_bytes, stream); break;
    case 4: launch_rows<uint32_t>(src, dst, idx, nrows, row_bytes, stream); break;
    case 2: launch_rows<uint16_t>(src, dst, idx, nrows, row_bytes, stream); break;
    default: launch_rows<uint8_t>(src, dst, idx, nrows, row_bytes, stream); break;
  }
}

template <typename T>
void launch_cols(const char* src, char* dst, const int64_t* idx, int64_t k, int64_t C, int64_t a, int64_t nrows,
                 cudaStream_t stream) {
  if (nrows <= 0) return;
  // Enough row-blocks to fill the GPU, few enough that each thread reuses its idx[j] over rows.
  const int64_t col_blocks = (k + kThreads - 1) / kThreads;
  const int64_t want = std::max<int64_t>(1, (int64_t(8) * 1024) / std::max<int64_t>(1, col_blocks));
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::min({nrows, want, kMaxGridY})));
  gather_cols_kernel<T><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const T*>(src), reinterpret_cast<T*>(dst),
                                                       idx, k, C, a, nrows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_cols(const char* src, char* dst, const int64_t* idx, int64_t k, int64_t C, int64_t a, int64_t nrows,
                 int64_t es, cudaStream_t stream) {
  switch (es) {  // a byte move: any dtype, dispatched on its element size only
    case 1: launch_cols<uint8_t>(src, dst, idx, k, C, a, nrows, stream); break;
    case 2: launch_cols<uint16_t>(src, dst, idx, k, C, a, nrows, stream); break;
    case 4: launch_cols<uint32_t>(src, dst, idx, k, C, a, nrows, stream); break;
    case 8: launch_cols<uint64_t>(src, dst, idx, k, C, a, nrows, stream); break;
    case 16: launch_cols<Bytes16>(src, dst, idx, k, C, a, nrows, stream); break;
    default: TORCH_CHECK(false, "gather_cols_: unsupported element size ", std::to_string(es));
  }
}

// Runs the plan's waves in stream order. Each wave copies units [begin, end) of `unit_bytes` bytes
// (a row, or one row's kept columns) with `copy(dst, begin, n)`: straight into place when the
// planner proved no later source is overwritten, else into the scratch buffer and then into place.
template <typename CopyWave>
void run_waves(const std::vector<Wave>& plan, int64_t unit_bytes, char* base, const at::Tensor& like,
               cudaStream_t stream, CopyWave copy) {
  const int64_t sb = plan_scratch_bytes(plan, unit_bytes);
  at::Tensor scratch = sb > 0 ? at::empty({sb}, like.options().dtype(at::kByte)) : at::Tensor();
  for (const Wave& wv : plan) {
    const int64_t n = wv.end - wv.begin;
    char* in_place = base + wv.begin * unit_bytes;
    if (wv.direct) {
      copy(in_place, wv.begin, n);
    } else {
      char* buf = static_cast<char*>(scratch.data_ptr());
      copy(buf, wv.begin, n);
      C10_CUDA_CHECK(cudaMemcpyAsync(in_place, buf, n * unit_bytes, cudaMemcpyDeviceToDevice, stream));
    }
  }
}

at::Tensor gather_rows_cuda(at::Tensor& w, const at::Tensor& idx, int64_t scratch_bytes) {
  at::Tensor host = check_gather_args(w, idx, 0, "gather_rows_");
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t k = host.numel(), C = w.size(1);
  const int64_t rb = C * static_cast<int64_t>(w.element_size());
  const std::vector<Wave> plan = plan_gather_rows(host.data_ptr<int64_t>(), k, rb, scratch_bytes);
  const at::Tensor didx = idx.contiguous();
  const int64_t* d = didx.data_ptr<int64_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  char* base = static_cast<char*>(w.data_ptr());
  run_waves(plan, rb, base, w, stream, [&](char* dst, int64_t begin, int64_t n) {
    copy_rows(base, dst, d + begin, n, rb, stream);
  });
  return w.as_strided({k, C}, {C, 1}, w.storage_offset());
}

at::Tensor gather_cols_cuda(at::Tensor& w, const at::Tensor& idx, int64_t scratch_bytes) {
  at::Tensor host = check_gather_args(w, idx, 1, "gather_cols_");
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t k = host.numel(), R = w.size(0), C = w.size(1);
  const int64_t es = static_cast<int64_t>(w.element_size());
  const std::vector<Wave> plan = plan_gather_cols(host.data_ptr<int64_t>(), k, R, C, k * es, scratch_bytes);
  const at::Tensor didx = idx.contiguous();
  const int64_t* d = didx.data_ptr<int64_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  char* base = static_cast<char*>(w.data_ptr());
  run_waves(plan, k * es, base, w, stream, [&](char* dst, int64_t begin, int64_t n) {
    gather_cols(base, dst, d, k, C, begin, n, es, stream);
  });
  return w.as_strided({R, k}, {k, 1}, w.storage_offset());
}

}  // namespace
}  // namespace sdmprune

TORCH_LIBRARY_IMPL(sdmprune, CUDA, m) {
  m.impl("gather_rows_", &sdmprune::gather_rows_cuda);
  m.impl("gather_cols_", &sdmprune::gather_cols_cuda);
}
