// Native CPU kernels of sparse_jax, registered with XLA as FFI custom calls.
//
//   sparse_jax_linear:     y [N, O] = x [N, I] . w [O, I]^T, w float32 or bfloat16.
//   sparse_jax_sparse_ffn: y [N, D] = sum_a h[n, a] * (k2[idx[n, a]] . x_rest[n]) * v[idx[n, a]],
//                          k2 [F, D-R] and v [F, D] float32 or bfloat16.
//   sparse_jax_topk_attention: out [B, N, H] = sum_a p * softplus(q_rest . k_rest[idx]) * v[idx]
//                          over the selected slots of each query head's kv head.
//
// Float32 accumulation throughout. Work is split over XLA's intra-op thread pool; each output
// element is computed by one thread in a fixed order, so results are the same run to run.
// The kernel bodies (kernels_impl.h) are compiled for AVX-512, AVX2 and plain x86-64 and the
// best one this CPU supports is chosen when the library loads (sparse_jax_set_isa overrides).

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace isa_avx512 {
#include "kernels_impl.h"
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "kernels_impl.h"
}
#pragma GCC pop_options

namespace isa_generic {
#include "kernels_impl.h"
}

namespace {

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

bool Supported(int isa) {
  switch (isa) {
    case kGeneric:
      return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    default:
      return false;
  }
}

int BestIsa() {
  for (int isa : {kAvx512, kAvx2}) {
    if (Supported(isa)) return isa;
  }
  return kGeneric;
}

std::atomic<int> g_isa{BestIsa()};

// Calls f with the Kernels of the selected instruction set.
template <typename F>
void WithIsa(const F& f) {
  switch (g_isa.load(std::memory_order_relaxed)) {
    case kAvx512:
      f(isa_avx512::Kernels{});
      break;
    case kAvx2:
      f(isa_avx2::Kernels{});
      break;
    default:
      f(isa_generic::Kernels{});
  }
}

// Runs body(i) for i in [0, n) on the calling thread and up to threads - 1 pool threads.
// Tasks claim indices from a shared counter, so a pool task that starts late (or never)
// only means the others did its share; the caller waits for claimed indices to finish.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& body) {
  const int64_t threads = pool.num_threads();
  if (n <= 1 || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [n](State& s, const F& f) {
    for (;;) {
      const int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      f(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min(threads, n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, work, fp = &body]() { work(*state, *fp); });
  }
  work(*state, body);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Pieces of `total` units in at most 4 * threads chunks of at least `min_chunk` units.
int64_t Chunks(int64_t total, int64_t min_chunk, int64_t threads) {
  if (total <= 0) return 0;
  const int64_t by_size = std::max<int64_t>(1, total / std::max<int64_t>(1, min_chunk));
  return std::max<int64_t>(1, std::min(by_size, 4 * std::max<int64_t>(1, threads)));
}

int64_t Product(ffi::AnyBuffer::Dimensions dims, size_t begin, size_t end) {
  int64_t p = 1;
  for (size_t i = begin; i < end; ++i) p *= dims[i];
  return p;
}

// The weight's leading axes (from vmap's expand_dims) must all be 1.
ffi::Error CheckTable(const ffi::AnyBuffer& table, const char* name) {
  auto dims = table.dimensions();
  if (dims.size() < 2) {
    return ffi::Error::InvalidArgument(std::string(name) + " must have rank >= 2");
  }
  if (Product(dims, 0, dims.size() - 2) != 1) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": mapping over the weight (vmap) is not supported");
  }
  auto type = table.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument(std::string(name) + " must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

template <typename W>
void LinearRun(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t rows,
               int64_t in, int64_t out) {
  // Chunks of output rows holding at least 64 KiB of weight each.
  const int64_t row_bytes = std::max<int64_t>(1, in * static_cast<int64_t>(sizeof(W)));
  const int64_t min_rows = std::max<int64_t>(4, (64 << 10) / row_bytes);
  const int64_t chunks = Chunks(out, min_rows, pool.num_threads());
  ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t begin = out * c / chunks, end = out * (c + 1) / chunks;
    WithIsa([&](auto k) { k.Linear(x, w, y, rows, in, out, begin, end); });
  });
}

ffi::Error LinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error err = CheckTable(w, "w"); err.failure()) return err;
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  const int64_t in = wd[wd.size() - 1], out = wd[wd.size() - 2];
  if (xd.size() < 1 || xd[xd.size() - 1] != in) {
    return ffi::Error::InvalidArgument("x's last axis must equal w's last axis");
  }
  const int64_t rows = Product(xd, 0, xd.size() - 1);
  if (static_cast<int64_t>(y->element_count()) != rows * out) {
    return ffi::Error::InvalidArgument("y must hold [rows, out] elements");
  }
  if (rows == 0 || out == 0) return ffi::Error::Success();
  if (in == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * rows * out);
    return ffi::Error::Success();
  }
  if (w.element_type() == ffi::DataType::F32) {
    LinearRun(pool, x.typed_data(), static_cast<const float*>(w.untyped_data()), y->typed_data(),
              rows, in, out);
  } else {
    LinearRun(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()),
              y->typed_data(), rows, in, out);
  }
  return ffi::Error::Success();
}

template <typename W>
void SparseFfnRun(ffi::ThreadPool& pool, const float* h, const int32_t* idx, const float* x,
                  const W* k2, const W* v, float* y, int64_t tokens, int64_t slots,
                  int64_t table_rows, int64_t rest, int64_t width) {
  std::vector<float> coef(static_cast<size_t>(tokens * slots));
  // Phase 1: one dot product per selected K2 row; chunks of slots of one token.
  const int64_t slot_chunks = Chunks(slots, 32, pool.num_threads());
  ParallelFor(pool, tokens * slot_chunks, [&](int64_t task) {
    const int64_t n = task / slot_chunks, c = task % slot_chunks;
    const int64_t begin = slots * c / slot_chunks, end = slots * (c + 1) / slot_chunks;
    const float* hn = h + n * slots;
    const int32_t* in = idx + n * slots;
    const float* xn = x + n * rest;
    float* cn = coef.data() + n * slots;
    WithIsa([&](auto k) { k.GatedValues(hn, in, xn, k2, cn, table_rows, rest, begin, end); });
  });
  // Phase 2: the weighted sum of the selected V rows; chunks of output columns of one token
  // (multiples of 16 columns, so each chunk but the last is whole vectors).
  const int64_t vectors = (width + 15) / 16;
  const int64_t col_chunks = Chunks(vectors, 8, pool.num_threads());
  ParallelFor(pool, tokens * col_chunks, [&](int64_t task) {
    const int64_t n = task / col_chunks, c = task % col_chunks;
    const int64_t begin = std::min(width, 16 * (vectors * c / col_chunks));
    const int64_t end = std::min(width, 16 * (vectors * (c + 1) / col_chunks));
    const float* cn = coef.data() + n * slots;
    const int32_t* in = idx + n * slots;
    float* yn = y + n * width;
    WithIsa([&](auto k) { k.ScatterRows(cn, in, v, yn, slots, table_rows, width, begin, end); });
  });
}

ffi::Error SparseFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                         ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> x_rest,
                         ffi::AnyBuffer k2, ffi::AnyBuffer v, ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error err = CheckTable(k2, "k2"); err.failure()) return err;
  if (ffi::Error err = CheckTable(v, "v"); err.failure()) return err;
  if (k2.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("k2 and v must have the same dtype");
  }
  auto hd = h.dimensions();
  auto kd = k2.dimensions();
  auto vd = v.dimensions();
  const int64_t table_rows = kd[kd.size() - 2], rest = kd[kd.size() - 1];
  const int64_t width = vd[vd.size() - 1];
  if (vd[vd.size() - 2] != table_rows) {
    return ffi::Error::InvalidArgument("k2 and v must have the same number of rows");
  }
  if (hd.size() < 1 || idx.element_count() != h.element_count()) {
    return ffi::Error::InvalidArgument("h and idx must have the same shape");
  }
  const int64_t slots = hd[hd.size() - 1];
  const int64_t tokens = Product(hd, 0, hd.size() - 1);
  if (static_cast<int64_t>(x_rest.element_count()) != tokens * rest) {
    return ffi::Error::InvalidArgument("x_rest must be [tokens, k2 width]");
  }
  if (static_cast<int64_t>(y->element_count()) != tokens * width) {
    return ffi::Error::InvalidArgument("y must be [tokens, v width]");
  }
  if (tokens == 0 || width == 0) return ffi::Error::Success();
  if (slots == 0 || table_rows == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * tokens * width);
    return ffi::Error::Success();
  }
  if (k2.element_type() == ffi::DataType::F32) {
    SparseFfnRun(pool, h.typed_data(), idx.typed_data(), x_rest.typed_data(),
                 static_cast<const float*>(k2.untyped_data()),
                 static_cast<const float*>(v.untyped_data()), y->typed_data(), tokens, slots,
                 table_rows, rest, width);
  } else {
    SparseFfnRun(pool, h.typed_data(), idx.typed_data(), x_rest.typed_data(),
                 static_cast<const uint16_t*>(k2.untyped_data()),
                 static_cast<const uint16_t*>(v.untyped_data()), y->typed_data(), tokens,
                 slots, table_rows, rest, width);
  }
  return ffi::Error::Success();
}

template <typename W>
void TopkAttentionRun(ffi::ThreadPool& pool, const float* q, const float* p, const int32_t* idx,
                      const W* k_rest, const W* v, float* out, int64_t batch, int64_t heads,
                      int64_t kv_heads, int64_t slots, int64_t rows, int64_t rest,
                      int64_t width) {
  const int64_t group = heads / kv_heads;
  // One task per (row, query head): its selected keys are read by it alone.
  ParallelFor(pool, batch * heads, [&](int64_t task) {
    const int64_t b = task / heads, n = task % heads;
    const int64_t kv = b * kv_heads + n / group;
    const int64_t at = task * slots;
    WithIsa([&](auto k) {
      k.GatedAttention(q + task * rest, p + at, idx + at, k_rest + kv * rows * rest,
                       v + kv * rows * width, out + task * width, slots, rows, rest, width);
    });
  });
}

ffi::Error TopkAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_rest,
                             ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::S32> idx,
                             ffi::AnyBuffer k_rest, ffi::AnyBuffer v,
                             ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q_rest.dimensions();
  auto pd = p.dimensions();
  auto kd = k_rest.dimensions();
  auto vd = v.dimensions();
  if (qd.size() < 2 || pd.size() != qd.size() || kd.size() != qd.size() + 1 ||
      vd.size() != kd.size()) {
    return ffi::Error::InvalidArgument(
        "expected q_rest [..., N, H-R], p and idx [..., N, A], k_rest [..., K, S, H-R] and "
        "v [..., K, S, H]");
  }
  if (k_rest.element_type() != v.element_type() ||
      (k_rest.element_type() != ffi::DataType::F32 &&
       k_rest.element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("k_rest and v must share one dtype, float32 or bfloat16");
  }
  const size_t r = qd.size();
  const int64_t batch = Product(qd, 0, r - 2), heads = qd[r - 2], rest = qd[r - 1];
  const int64_t slots = pd[r - 1];
  // k_rest and v are [..., K, S, *] with q_rest's leading axes.
  const int64_t kv_heads = kd[r - 2], rows = kd[r - 1], width = vd[r];
  if (Product(kd, 0, r - 2) != batch || kd[r] != rest ||
      Product(vd, 0, r) != batch * kv_heads * rows || kv_heads == 0 ||
      heads % kv_heads != 0 || Product(pd, 0, r - 1) != batch * heads ||
      static_cast<int64_t>(idx.element_count()) != batch * heads * slots) {
    return ffi::Error::InvalidArgument("inconsistent top-k attention shapes");
  }
  if (static_cast<int64_t>(out->element_count()) != batch * heads * width) {
    return ffi::Error::InvalidArgument("out must be [..., N, H]");
  }
  if (batch * heads * width == 0) return ffi::Error::Success();
  if (slots == 0 || rows == 0) {
    std::memset(out->typed_data(), 0, sizeof(float) * batch * heads * width);
    return ffi::Error::Success();
  }
  if (k_rest.element_type() == ffi::DataType::F32) {
    TopkAttentionRun(pool, q_rest.typed_data(), p.typed_data(), idx.typed_data(),
                     static_cast<const float*>(k_rest.untyped_data()),
                     static_cast<const float*>(v.untyped_data()), out->typed_data(), batch,
                     heads, kv_heads, slots, rows, rest, width);
  } else {
    TopkAttentionRun(pool, q_rest.typed_data(), p.typed_data(), idx.typed_data(),
                     static_cast<const uint16_t*>(k_rest.untyped_data()),
                     static_cast<const uint16_t*>(v.untyped_data()), out->typed_data(), batch,
                     heads, kv_heads, slots, rows, rest, width);
  }
  return ffi::Error::Success();
}

}  // namespace

// The library's interface: the two handlers and the instruction-set controls (everything
// else is hidden).
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxLinear, LinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxSparseFfn, SparseFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxTopkAttention, TopkAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" {

// The instruction set in use: 0 generic x86-64, 1 AVX2, 2 AVX-512.
int sparse_jax_isa() { return g_isa.load(); }

// Whether this CPU can run instruction set `isa`.
int sparse_jax_isa_supported(int isa) { return Supported(isa) ? 1 : 0; }

// Selects instruction set `isa` for later calls; returns 0, or -1 if this CPU lacks it.
int sparse_jax_set_isa(int isa) {
  if (!Supported(isa)) return -1;
  g_isa.store(isa);
  return 0;
}

}  // extern "C"

#pragma GCC visibility pop
