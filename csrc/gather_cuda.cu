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
//
// SDMPRUNE_CUDA_GATHER=ordered selects a second algorithm (opt-in until measured on a GPU): ONE
// launch, no scratch. Persistent blocks take output units (rows of the result) in increasing order
// from an atomic ticket counter. A unit's sources are never written before it has read them, and it
// may only write its destination once every unit that READS from that destination is done; those
// readers always hold smaller tickets (src(o) >= o), so they were taken by blocks already running and
// depend only on smaller tickets still: the waits cannot deadlock, whatever the grid size or the
// order blocks are scheduled in. Every byte is read once and written once (the waves move the scratch
// part twice), at the cost of a done flag per unit. A wait that exceeds ~2 s sets an error flag and
// the op raises (a bug, never a silent wrong result); reading that flag synchronises once more.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "gather.h"

namespace sdmprune {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<U>{}) with U the plain type of `bytes` bytes: the kernels move bytes, so a dtype
// only matters through its size (and a row through the widest access that divides it).
template <typename F>
void with_width(int64_t bytes, const char* op, F&& f) {
  switch (bytes) {
    case 1: f(TypeTag<uint8_t>{}); break;
    case 2: f(TypeTag<uint16_t>{}); break;
    case 4: f(TypeTag<uint32_t>{}); break;
    case 8: f(TypeTag<uint64_t>{}); break;
    case 16: f(TypeTag<Bytes16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported element size ", std::to_string(bytes));
  }
}

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

// ---- the ordered single-launch algorithm ----------------------------------------------------------
constexpr int kOrderedVecs = 4;           // loads in flight per thread per chunk
constexpr long long kSpinLimit = 1 << 24;  // x ~128 ns of __nanosleep: about 2 s

// Thread 0 waits until done[u] is set (u >= 0), then the block may write what unit u reads.
__device__ __forceinline__ void wait_done(const int* done, int64_t u, int* error) {
  if (u < 0) return;
  long long spins = 0;
  while (atomicAdd(const_cast<int*>(done + u), 0) == 0) {
    if (++spins > kSpinLimit) {
      atomicExch(error, 1);
      return;
    }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
    __nanosleep(128);
#endif
  }
  __threadfence();
}

// Thread 0 takes the block's next unit from the ticket counter; every thread gets it.
__device__ __forceinline__ int64_t next_unit(unsigned int* ticket) {
  __shared__ int64_t unit;
  if (threadIdx.x == 0) unit = atomicAdd(ticket, 1u);
  __syncthreads();
  const int64_t u = unit;
  __syncthreads();  // `unit` is rewritten by thread 0 next round
  return u;
}

__device__ __forceinline__ void mark_done(int* done, int64_t u) {
  __syncthreads();  // every thread's loads of unit u have returned (their values were stored)
  if (threadIdx.x == 0) {
    __threadfence();
    atomicExch(done + u, 1);
  }
}

// reader[t] = j + 1 where idx[j] == t (the unit that reads destination row t), 0 if none.
__global__ void invert_rows_kernel(const int64_t* idx, int64_t k, int* reader) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < k && idx[j] < k) reader[idx[j]] = static_cast<int>(j + 1);
}

// One unit of n elements: element e moves from w[src(e)] to w[dst(e)], in chunks of kOrderedVecs per
// thread. The first chunk is loaded before thread 0 runs wait() (reading sources is always safe: no
// unit writes them before this one is done). With `barriers`, each chunk's loads come before its
// stores and its stores before the next chunk's loads (a unit whose destination overlaps its own
// sources). Marks the unit done at the end.
template <typename T, typename Src, typename Dst, typename Wait>
__device__ __forceinline__ void move_unit(T* w, int64_t n, Src src, Dst dst, Wait wait, bool barriers, int* done,
                                          int64_t unit) {
  bool waited = false;
  for (int64_t base = 0; base < n; base += int64_t(blockDim.x) * kOrderedVecs) {
    T r[kOrderedVecs];
#pragma unroll
    for (int v = 0; v < kOrderedVecs; ++v) {
      const int64_t e = base + int64_t(v) * blockDim.x + threadIdx.x;
      if (e < n) r[v] = w[src(e)];
    }
    if (!waited) {  // uniform across the block: every thread takes the same branches
      if (threadIdx.x == 0) wait();
      __syncthreads();
      waited = true;
    } else if (barriers) {
      __syncthreads();  // this chunk's loads before any of its stores
    }
#pragma unroll
    for (int v = 0; v < kOrderedVecs; ++v) {
      const int64_t e = base + int64_t(v) * blockDim.x + threadIdx.x;
      if (e < n) w[dst(e)] = r[v];
    }
    if (barriers) __syncthreads();  // this chunk's stores before the next chunk's loads
  }
  mark_done(done, unit);
}

// Unit t: row idx[t] -> row t (rows of `units` vectors V). Waits for the reader of row t.
template <typename V>
__global__ void ordered_rows_kernel(V* w, const int64_t* idx, int64_t k, int64_t units, unsigned int* ticket,
                                    int* done, const int* reader, int* error) {
  for (;;) {
    const int64_t t = next_unit(ticket);
    if (t >= k) return;
    const int64_t s = idx[t];
    move_unit(
        w, s == t ? 0 : units, [=](int64_t u) { return s * units + u; }, [=](int64_t u) { return t * units + u; },
        [=] { wait_done(done, int64_t(reader[t]) - 1, error); }, false, done, t);
  }
}

// Unit r: row r of w [R, C] -> [r*k, r*k + k). Its destination overlaps the sources of rows
// r*k/C .. (r*k+k-1)/C <= r: it waits for the earlier ones; when it overlaps its own source row, it
// moves in ascending chunks with barriers (a chunk's stores land below every later chunk's sources,
// since idx[j] >= j and C >= k).
template <typename T>
__global__ void ordered_cols_kernel(T* w, const int64_t* idx, int64_t k, int64_t C, int64_t R, unsigned int* ticket,
                                    int* done, int* error) {
  for (;;) {
    const int64_t r = next_unit(ticket);
    if (r >= R) return;
    const int64_t first = (r * k) / C, last = (r * k + k - 1) / C;  // source rows under the destination
    move_unit(
        w, k, [=](int64_t j) { return r * C + idx[j]; }, [=](int64_t j) { return r * k + j; },
        [=] {
          for (int64_t q = first; q <= last && q < r; ++q) wait_done(done, q, error);
        },
        last >= r, done, r);
  }
}

int persistent_blocks(int64_t units) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(units, int64_t(sms) * 8)));
}

bool ordered_requested() {
  const char* v = std::getenv("SDMPRUNE_CUDA_GATHER");
  return v != nullptr && std::string(v) == "ordered";
}

// The ordered kernels' int32 state, zero-filled (one memset): [ticket, error, done[units], then for
// rows reader[k]]; `extra` is the length of that last part.
at::Tensor ordered_state(const at::Tensor& w, int64_t units, int64_t extra) {
  return at::zeros({2 + units + extra}, w.options().dtype(at::kInt));
}

void check_ordered_error(const at::Tensor& state, const char* op) {
  const int err = state[1].item<int>();  // synchronises
  TORCH_CHECK(err == 0, op, ": the ordered gather timed out waiting on a dependency (a bug); "
              "unset SDMPRUNE_CUDA_GATHER to use the wave algorithm");
}

template <typename V>
void launch_ordered_rows(char* base, const int64_t* idx, int64_t k, int64_t row_bytes, int* state,
                         cudaStream_t stream) {
  const int64_t units = row_bytes / int64_t(sizeof(V));
  int* done = state + 2;
  int* reader = done + k;
  invert_rows_kernel<<<static_cast<unsigned>((k + kThreads - 1) / kThreads), kThreads, 0, stream>>>(idx, k, reader);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ordered_rows_kernel<V><<<persistent_blocks(k), kThreads, 0, stream>>>(
      reinterpret_cast<V*>(base), idx, k, units, reinterpret_cast<unsigned int*>(state), done, reader, state + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ordered_rows(char* base, const int64_t* idx, int64_t k, int64_t row_bytes, int* state, cudaStream_t stream) {
  with_width(vector_bytes(row_bytes, {base}), "gather_rows_", [&](auto tag) {
    launch_ordered_rows<typename decltype(tag)::type>(base, idx, k, row_bytes, state, stream);
  });
}

template <typename T>
void launch_ordered_cols(char* base, const int64_t* idx, int64_t k, int64_t C, int64_t R, int* state,
                         cudaStream_t stream) {
  ordered_cols_kernel<T><<<persistent_blocks(R), kThreads, 0, stream>>>(
      reinterpret_cast<T*>(base), idx, k, C, R, reinterpret_cast<unsigned int*>(state), state + 2, state + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ordered_cols(char* base, const int64_t* idx, int64_t k, int64_t C, int64_t R, int64_t es, int* state,
                  cudaStream_t stream) {
  with_width(es, "gather_cols_", [&](auto tag) {
    launch_ordered_cols<typename decltype(tag)::type>(base, idx, k, C, R, state, stream);
  });
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
  with_width(vector_bytes(row_bytes, {src, dst}), "gather_rows_", [&](auto tag) {
    launch_rows<typename decltype(tag)::type>(src, dst, idx, nrows, row_bytes, stream);
  });
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
  with_width(es, "gather_cols_", [&](auto tag) {
    launch_cols<typename decltype(tag)::type>(src, dst, idx, k, C, a, nrows, stream);
  });
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
  const at::Tensor didx = idx.contiguous();
  const int64_t* d = didx.data_ptr<int64_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  char* base = static_cast<char*>(w.data_ptr());
  if (ordered_requested() && rb > 0) {
    at::Tensor state = ordered_state(w, k, k);
    ordered_rows(base, d, k, rb, state.data_ptr<int>(), stream);
    check_ordered_error(state, "gather_rows_");
    return w.as_strided({k, C}, {C, 1}, w.storage_offset());
  }
  const std::vector<Wave> plan = plan_gather_rows(host.data_ptr<int64_t>(), k, rb, scratch_bytes);
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
  const at::Tensor didx = idx.contiguous();
  const int64_t* d = didx.data_ptr<int64_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  char* base = static_cast<char*>(w.data_ptr());
  if (ordered_requested() && R > 0 && k < C) {  // k == C: idx is 0..C-1, nothing moves
    at::Tensor state = ordered_state(w, R, 0);
    ordered_cols(base, d, k, C, R, es, state.data_ptr<int>(), stream);
    check_ordered_error(state, "gather_cols_");
    return w.as_strided({R, k}, {k, 1}, w.storage_offset());
  }
  const std::vector<Wave> plan = plan_gather_cols(host.data_ptr<int64_t>(), k, R, C, k * es, scratch_bytes);
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
