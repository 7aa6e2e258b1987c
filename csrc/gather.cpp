// In-place channel gather: argument checks, the wave planner (see gather.h for why waves make the
// in-place compaction safe in parallel), the CPU kernels, and the dispatcher registration
// (torch.ops.sdmprune.gather_rows_ / gather_cols_; the CUDA kernels register in gather_cuda.cu).
#include "gather.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "sdmprune.h"

namespace sdmprune {

namespace {
// Integers reach error messages as std::string: on the GPU machine (torch 2.11+cu130) an extension
// that streamed an int64_t through c10::str crashed the process instead of raising.
std::string num(int64_t v) { return std::to_string(v); }
}  // namespace

void check_gather_meta(const at::Tensor& w, const at::Tensor& idx, const char* op) {
  TORCH_CHECK(w.layout() == at::kStrided, op, ": w must be a dense (strided) tensor");
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D [R, C], got a ", num(w.dim()), "-D tensor");
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous (call .contiguous() first)");
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64 (torch.long), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, op, ": idx must be 1-D, got a ", num(idx.dim()), "-D tensor");
  TORCH_CHECK(idx.device() == w.device(), op, ": device mismatch: idx is on ", idx.device(), " but w is on ",
              w.device());
  TORCH_CHECK(idx.numel() > 0, op, ": idx is empty (keep at least one index)");
}

at::Tensor check_gather_args(const at::Tensor& w, const at::Tensor& idx, int64_t dim, const char* op) {
  check_gather_meta(w, idx, op);
  const int64_t extent = w.size(dim);
  at::Tensor host = idx.to(at::kCPU).contiguous();
  const int64_t* p = host.data_ptr<int64_t>();
  const int64_t k = host.numel();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < extent, op, ": idx out of range: idx[", num(i), "] = ", num(p[i]), " is not in [0, ",
                num(extent), ")");
    if (i > 0) {
      TORCH_CHECK(p[i] != p[i - 1], op, ": duplicate index ", num(p[i]), " at positions ", num(i - 1), " and ", num(i));
      TORCH_CHECK(p[i] > p[i - 1], op, ": idx must be sorted (strictly increasing): idx[", num(i - 1), "] = ", num(p[i - 1]),
                  " > idx[", num(i), "] = ", num(p[i]));
    }
  }
  return host;
}

int64_t resolve_scratch_bytes(int64_t scratch_bytes) {
  return scratch_bytes < 0 ? kDefaultScratchBytes : scratch_bytes;
}

namespace {

// Shared wave loop. direct_len(a) = how many units from a can move directly (every destination of
// [a, a + len) below every source of it). A direct wave is taken when it is long enough to be worth
// its own pass (>= a quarter of a scratch wave); otherwise a scratch wave of `cap` units.
template <typename DirectLen>
std::vector<Wave> plan_waves(int64_t a, int64_t n, int64_t unit_bytes, int64_t scratch_bytes, DirectLen direct_len) {
  std::vector<Wave> plan;
  if (unit_bytes <= 0) return plan;  // nothing to move (zero-width rows)
  const int64_t cap = std::max<int64_t>(1, resolve_scratch_bytes(scratch_bytes) / unit_bytes);
  while (a < n) {
    const int64_t left = n - a;
    const int64_t d = std::max<int64_t>(0, direct_len(a));
    if (d >= left) {
      plan.push_back({a, n, true});
      break;
    }
    if (d >= 1 && 4 * d >= std::min(left, cap)) {
      plan.push_back({a, a + d, true});
      a += d;
      continue;
    }
    const int64_t s = std::min(cap, left);
    plan.push_back({a, a + s, false});
    a += s;
  }
  return plan;
}

}  // namespace

std::vector<Wave> plan_gather_rows(const int64_t* idx, int64_t k, int64_t unit_bytes, int64_t scratch_bytes) {
  // Rows already in place (idx[i] == i) form a prefix (idx strictly increasing): skip them.
  int64_t a = 0;
  while (a < k && idx[a] == a) ++a;
  // Direct wave [a, b): destinations rows a..b-1, sources idx[a] < idx[a+1] < ...; all disjoint iff
  // b <= idx[a]. Beyond the prefix idx[a] > a, so at least one row always qualifies.
  return plan_waves(a, k, unit_bytes, scratch_bytes, [&](int64_t at) { return idx[at] - at; });
}

std::vector<Wave> plan_gather_cols(const int64_t* idx, int64_t k, int64_t R, int64_t C, int64_t out_unit_bytes,
                                   int64_t scratch_bytes) {
  if (k == C) return {};  // every column kept: identity
  // Row 0 is in place when the kept columns are exactly 0..k-1.
  int64_t a = (idx[k - 1] == k - 1) ? 1 : 0;
  // Direct wave of rows [a, b): destinations [a*k, b*k), lowest source a*C + idx[0]; disjoint iff
  // b*k <= a*C + idx[0]. Grows geometrically (factor ~C/k) once a > 0.
  return plan_waves(a, R, out_unit_bytes, scratch_bytes,
                    [&](int64_t at) { return (at * C + idx[0]) / k - at; });
}

int64_t plan_scratch_bytes(const std::vector<Wave>& plan, int64_t unit_bytes) {
  int64_t units = 0;
  for (const Wave& wv : plan)
    if (!wv.direct) units = std::max(units, wv.end - wv.begin);
  return units * unit_bytes;
}

namespace {

struct Bytes16 {
  uint64_t lo, hi;
};

// Parallel memcpy of `bytes` between two non-overlapping buffers.
void parallel_memcpy(char* dst, const char* src, int64_t bytes) {
  constexpr int64_t kChunk = int64_t(1) << 20;
  const int64_t chunks = (bytes + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t off = c * kChunk;
      std::memcpy(dst + off, src + off, std::min(kChunk, bytes - off));
    }
  });
}

// out[(r - a) * k + j] = base[r * C + idx[j]] for rows r in [a, b): distinct, non-overlapping
// destinations and sources within one call (guaranteed by the plan, or out is the scratch buffer).
template <typename T>
void gather_cols_rows(const T* base, T* out, const int64_t* idx, int64_t k, int64_t C, int64_t a, int64_t b) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k));
  at::parallel_for(a, b, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = base + r * C;
      T* dst = out + (r - a) * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = src[idx[j]];
    }
  });
}

template <typename T>
void run_cols_plan(char* base_bytes, const std::vector<Wave>& plan, const int64_t* idx, int64_t k, int64_t C,
                   char* scratch) {
  T* base = reinterpret_cast<T*>(base_bytes);
  for (const Wave& wv : plan) {
    if (wv.direct) {
      gather_cols_rows<T>(base, base + wv.begin * k, idx, k, C, wv.begin, wv.end);
    } else {
      T* buf = reinterpret_cast<T*>(scratch);
      gather_cols_rows<T>(base, buf, idx, k, C, wv.begin, wv.end);  // phase 1: all reads
      parallel_memcpy(reinterpret_cast<char*>(base + wv.begin * k), scratch,
                      (wv.end - wv.begin) * k * int64_t(sizeof(T)));  // phase 2: all writes
    }
  }
}

}  // namespace

at::Tensor gather_rows_cpu(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes) {
  at::Tensor host = check_gather_args(w, idx, 0, "gather_rows_");
  const int64_t k = host.numel(), C = w.size(1);
  const int64_t* p = host.data_ptr<int64_t>();
  const int64_t rb = C * static_cast<int64_t>(w.element_size());
  std::vector<Wave> plan = plan_gather_rows(p, k, rb, scratch_bytes);
  char* base = static_cast<char*>(w.data_ptr());
  std::unique_ptr<char[]> scratch(new char[static_cast<size_t>(std::max<int64_t>(1, plan_scratch_bytes(plan, rb)))]);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, rb));
  for (const Wave& wv : plan) {
    if (wv.direct) {
      at::parallel_for(wv.begin, wv.end, grain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) std::memcpy(base + i * rb, base + p[i] * rb, rb);
      });
    } else {
      char* buf = scratch.get();
      at::parallel_for(wv.begin, wv.end, grain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) std::memcpy(buf + (i - wv.begin) * rb, base + p[i] * rb, rb);
      });
      parallel_memcpy(base + wv.begin * rb, buf, (wv.end - wv.begin) * rb);
    }
  }
  return w.as_strided({k, C}, {C, 1}, w.storage_offset());
}

at::Tensor gather_cols_cpu(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes) {
  at::Tensor host = check_gather_args(w, idx, 1, "gather_cols_");
  const int64_t k = host.numel(), R = w.size(0), C = w.size(1);
  const int64_t* p = host.data_ptr<int64_t>();
  const int64_t es = static_cast<int64_t>(w.element_size());
  std::vector<Wave> plan = plan_gather_cols(p, k, R, C, k * es, scratch_bytes);
  std::unique_ptr<char[]> holder(new char[static_cast<size_t>(std::max<int64_t>(1, plan_scratch_bytes(plan, k * es)))]);
  // operator new[] returns memory aligned for any fundamental type (>= 16 bytes on x86-64/aarch64).
  char* scratch = holder.get();
  char* base = static_cast<char*>(w.data_ptr());
  switch (es) {  // a byte move: any dtype, dispatched on its element size only
    case 1: run_cols_plan<uint8_t>(base, plan, p, k, C, scratch); break;
    case 2: run_cols_plan<uint16_t>(base, plan, p, k, C, scratch); break;
    case 4: run_cols_plan<uint32_t>(base, plan, p, k, C, scratch); break;
    case 8: run_cols_plan<uint64_t>(base, plan, p, k, C, scratch); break;
    case 16: run_cols_plan<Bytes16>(base, plan, p, k, C, scratch); break;
    default: TORCH_CHECK(false, "gather_cols_: unsupported element size ", num(es));
  }
  return w.as_strided({R, k}, {k, 1}, w.storage_offset());
}

at::Tensor gather_rows_(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sdmprune::gather_rows_", "").typed<at::Tensor(
      at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(w, idx, scratch_bytes);
}

at::Tensor gather_cols_(at::Tensor w, const at::Tensor& idx, int64_t scratch_bytes) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sdmprune::gather_cols_", "").typed<at::Tensor(
      at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(w, idx, scratch_bytes);
}

}  // namespace sdmprune

namespace {
at::Tensor rows_cpu_entry(at::Tensor& w, const at::Tensor& idx, int64_t scratch_bytes) {
  return sdmprune::gather_rows_cpu(w, idx, scratch_bytes);
}
at::Tensor cols_cpu_entry(at::Tensor& w, const at::Tensor& idx, int64_t scratch_bytes) {
  return sdmprune::gather_cols_cpu(w, idx, scratch_bytes);
}

// Meta (shape-only) kernels: the checks that need no index values, and the output view. They also
// answer for mixed-device calls in which one argument is on meta.
at::Tensor rows_meta_entry(at::Tensor& w, const at::Tensor& idx, int64_t) {
  sdmprune::check_gather_meta(w, idx, "gather_rows_");
  const int64_t k = idx.numel(), C = w.size(1);
  return w.as_strided({k, C}, {C, 1}, w.storage_offset());
}
at::Tensor cols_meta_entry(at::Tensor& w, const at::Tensor& idx, int64_t) {
  sdmprune::check_gather_meta(w, idx, "gather_cols_");
  const int64_t k = idx.numel(), R = w.size(0);
  return w.as_strided({R, k}, {k, 1}, w.storage_offset());
}
// Autograd key: the ops move bytes under autograd's feet, so they refuse a tensor that requires
// grad while grad mode is on (use param.data or torch.no_grad()), and bump w's version counter so a
// graph that saved w fails loudly in backward instead of using moved data.
template <const char* kName>
at::Tensor autograd_entry(at::Tensor& w, const at::Tensor& idx, int64_t scratch_bytes) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && w.requires_grad()), kName,
              ": w requires grad; call it on w.detach() / param.data or under torch.no_grad()");
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kName + 0, "").typed<at::Tensor(
      at::Tensor&, const at::Tensor&, int64_t)>();
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(w, idx, scratch_bytes);
  }
  w.unsafeGetTensorImpl()->bump_version();
  return out;
}
constexpr char kRowsName[] = "sdmprune::gather_rows_";
constexpr char kColsName[] = "sdmprune::gather_cols_";
}  // namespace

TORCH_LIBRARY(sdmprune, m) {
  m.def("gather_rows_(Tensor(a!) w, Tensor idx, int scratch_bytes=-1) -> Tensor(a!)");
  m.def("gather_cols_(Tensor(a!) w, Tensor idx, int scratch_bytes=-1) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(sdmprune, CPU, m) {
  m.impl("gather_rows_", &rows_cpu_entry);
  m.impl("gather_cols_", &cols_cpu_entry);
}

TORCH_LIBRARY_IMPL(sdmprune, Meta, m) {
  m.impl("gather_rows_", &rows_meta_entry);
  m.impl("gather_cols_", &cols_meta_entry);
}

TORCH_LIBRARY_IMPL(sdmprune, Autograd, m) {
  m.impl("gather_rows_", &autograd_entry<kRowsName>);
  m.impl("gather_cols_", &autograd_entry<kColsName>);
}
