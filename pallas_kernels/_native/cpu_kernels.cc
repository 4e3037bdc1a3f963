// Native CPU kernels of sparse_jax, registered with XLA as FFI custom calls.
//
//   sparse_jax_linear:     y [N, O] = x [N, I] . w [O, I]^T, w float32 or bfloat16.
//   sparse_jax_sparse_ffn: y [N, D] = sum_a h[n, a] * (k2[idx[n, a]] . x_rest[n]) * v[idx[n, a]],
//                          k2 [F, D-R] and v [F, D] float32 or bfloat16.
//   sparse_jax_topk_attention: out [B, N, H] = sum_a p * softplus(q_rest . k_rest[idx]) * v[idx]
//                          over the selected slots of each query head's kv head.
//   sparse_jax_sparse_ffn_block: y [M, D] = sum over act[m, i] != 0 of
//                          act[m, i] * (k2[i] . x_rest[m]) * v[i], neuron by neuron (prefill).
//   sparse_jax_spark_ffn_block: the same from the pre-activations, with the statistical top-k's
//                          soft threshold and the gelu per token in the kernel.
//   sparse_jax_spark_decode_attention, sparse_jax_dense_decode_attention: one decode step's
//                          whole attention of one query per row over a cache and the token's
//                          own key (Spark: predictor scores, statistical threshold, then only
//                          the kept keys' other half and values).
//   sparse_jax_spark_scored_attention: Spark attention of a prefill chunk's queries from their
//                          raw predictor scores: soft-cap, positions' mask and threshold, then
//                          only the kept keys' other half and values.
//
// Float32 accumulation throughout. Work is split over XLA's intra-op thread pool; each output
// element is computed by one thread in a fixed order, so results are the same run to run.
// The kernel bodies (kernels_impl.h) are compiled for AVX-512, AVX2 and plain x86-64 and the
// best one this CPU supports is chosen when the library loads (sparse_jax_set_isa overrides).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <immintrin.h>

#include <initializer_list>
#include <limits>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Gathered rows read side by side (the most kernels_impl.h's with_row_count dispatches). These
// two are plain code, defined before the per-instruction-set bodies that use them too.
constexpr int kSideBySide = 4;

// The group of gathered rows from index a on: rows[j] = table + idx[a + j] * stride for
// j < g = min(kSideBySide, n - a), and the next group's rows in ahead (n_ahead of them), for
// dot_rows, add_rows and add_rows_to to prefetch. Returns g.
template <typename W>
inline int row_group(const W* table, int64_t stride, const int32_t* idx, int64_t n, int64_t a,
                     const W** rows, const W** ahead, int* n_ahead) {
  const int g = static_cast<int>(std::min<int64_t>(kSideBySide, n - a));
  *n_ahead = static_cast<int>(std::min<int64_t>(kSideBySide, n - a - g));
  for (int j = 0; j < g; ++j) rows[j] = table + idx[a + j] * stride;
  for (int j = 0; j < *n_ahead; ++j) ahead[j] = table + idx[a + g + j] * stride;
  return g;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define SPARSE_JAX_VECTOR_BYTES 64
namespace isa_avx512 {
#include "kernels_impl.h"
}
#undef SPARSE_JAX_VECTOR_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSE_JAX_VECTOR_BYTES 32
namespace isa_avx2 {
#include "kernels_impl.h"
}
#undef SPARSE_JAX_VECTOR_BYTES
#pragma GCC pop_options

#define SPARSE_JAX_VECTOR_BYTES 16
namespace isa_generic {
#include "kernels_impl.h"
}
#undef SPARSE_JAX_VECTOR_BYTES

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

// Scratch buffers are thread_local vectors kept between calls, so that a call's buffers (S + 1
// entries per query head) are not allocated, paged in and zeroed every time. Scratch grows one
// to at least n elements (never shrinking it, so a call never pays to refill it); TrimScratch,
// once a call is done with them, frees those over kScratchKeepBytes. The prefill scored
// attention trims; the decode attentions do not (their buffers are B x N x (S + 1) entries):
// with the trim, the Spark decode attention at 32k keys measured about 10% slower in
// alternated builds on an AMD EPYC (4.26-4.60 against 3.51-4.12 ms), for no reason found.
constexpr size_t kScratchKeepBytes = size_t{16} << 20;

template <typename T>
T* Scratch(std::vector<T>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

template <typename... T>
void TrimScratch(std::vector<T>&... buffers) {
  ((buffers.capacity() * sizeof(T) > kScratchKeepBytes ? (void)(buffers = {}) : (void)0), ...);
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

// The Spark FFN's K2 and V: each a table (CheckTable), of one dtype, with one row per neuron.
ffi::Error CheckFfnTables(const ffi::AnyBuffer& k2, const ffi::AnyBuffer& v) {
  if (ffi::Error err = CheckTable(k2, "k2"); err.failure()) return err;
  if (ffi::Error err = CheckTable(v, "v"); err.failure()) return err;
  if (k2.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("k2 and v must have the same dtype");
  }
  auto kd = k2.dimensions();
  auto vd = v.dimensions();
  if (kd[kd.size() - 2] != vd[vd.size() - 2]) {
    return ffi::Error::InvalidArgument("k2 and v must have the same number of rows");
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
  if (ffi::Error err = CheckFfnTables(k2, v); err.failure()) return err;
  auto hd = h.dimensions();
  auto kd = k2.dimensions();
  auto vd = v.dimensions();
  const int64_t table_rows = kd[kd.size() - 2], rest = kd[kd.size() - 1];
  const int64_t width = vd[vd.size() - 1];
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

// The sparse FFN of a block of tokens (prefill), neuron by neuron: the tokens that activate a
// neuron share one read of its K2 and V rows. Phase 1 (chunks of neurons): lists of
// (token, h) per neuron from act [M, F], then coef = h * (x_rest[token] . K2[neuron]).
// Phase 2: y[token] += coef * V[neuron], per block of neurons in order and within a block in
// neuron order, so each output element sums its terms in the same order whatever the thread
// count, the instruction set and the number of tokens, by slices of output columns. A few
// tokens (decode) take one pass per block instead, with the same sums.
constexpr int64_t kNeuronChunk = 128;
constexpr int64_t kNeuronBlock = 512;  // neurons whose V rows phase 2 keeps in cache at once
static_assert(kNeuronBlock % kNeuronChunk == 0);
// Up to this many tokens, one pass per block of neurons (SparseFfnFewTokens).
constexpr int64_t kRowPathTokens = 16;
struct NeuronPairs {
  std::vector<int32_t> start;  // per neuron of the chunk, into token/coef (size n + 1)
  std::vector<int32_t> token;
  std::vector<float> coef;
  std::vector<int64_t> active;  // the neurons (of all F) that have pairs, ascending
};

// Up to kRowPathTokens tokens (decode), the same sums as the many-token path below in one
// pass per block of kNeuronBlock neurons: the block's (neuron, token) pairs, neurons ascending
// and each neuron's tokens ascending, with their coefficients; the dots with their K2 rows;
// then their V rows added into the tokens' partial rows of the block. The partial rows are
// added in block order. The gathered rows are read kSideBySide pairs at a time, side by side
// (dot_rows, add_rows and add_rows_to sum each as one row at a time would), each group
// prefetching the next group's rows. Against one row at a time, grouping measured 25-30%
// faster for one token (float32, AVX2); for 8 tokens, against phase 1 and 2 below with whole V
// rows one pair at a time, this pass measured about 12% faster (float32, AVX-512;
// benchmarks/block_ffn).
// y[t] = the sum over blocks nb in order of partial[nb, t] [width], the blocks where
// used[nb * tokens + t] is 0 skipped (their partial rows were never written).
void SumPartials(const float* partial, const char* used, int64_t blocks, int64_t tokens,
                 int64_t width, float* y) {
  for (int64_t t = 0; t < tokens; ++t) {
    float* out = y + t * width;
    std::memset(out, 0, sizeof(float) * width);
    for (int64_t nb = 0; nb < blocks; ++nb) {
      if (!used[nb * tokens + t]) continue;
      const float* part = partial + (nb * tokens + t) * width;
      for (int64_t d = 0; d < width; ++d) out[d] += part[d];
    }
  }
}

template <typename W>
void SparseFfnFewTokens(ffi::ThreadPool& pool, const float* act, const float* theta,
                        const float* x, const W* k2, const W* v, float* y, int64_t tokens,
                        int64_t neurons, int64_t rest, int64_t width) {
  const int64_t blocks = (neurons + kNeuronBlock - 1) / kNeuronBlock;
  std::unique_ptr<float[]> partial(new float[blocks * tokens * width]);
  std::vector<char> used(blocks * tokens, 0);
  ParallelFor(pool, blocks, [&](int64_t nb) {
    const int64_t f0 = nb * kNeuronBlock, f1 = std::min(neurons, f0 + kNeuronBlock);
    thread_local std::vector<int32_t> neuron_buffer, token_buffer;
    thread_local std::vector<float> coef_buffer;
    int32_t* neuron = Scratch(neuron_buffer, kNeuronBlock * tokens);
    int32_t* token = Scratch(token_buffer, kNeuronBlock * tokens);
    float* coef = Scratch(coef_buffer, kNeuronBlock * tokens);
    char* on = used.data() + nb * tokens;
    int64_t n = 0;
    for (int64_t i = f0; i < f1; ++i) {
      for (int64_t t = 0; t < tokens; ++t) {
        const float a = act[t * neurons + i];
        if (theta != nullptr ? !(a > theta[t]) : a == 0.0f) continue;
        neuron[n] = static_cast<int32_t>(i);
        token[n] = static_cast<int32_t>(t);
        coef[n++] = theta != nullptr ? a - theta[t] : a;
        on[t] = 1;
      }
    }
    if (n == 0) return;
    float* part = partial.get() + nb * tokens * width;
    std::memset(part, 0, sizeof(float) * tokens * width);
    WithIsa([&](auto kk) {
      if (theta != nullptr) kk.GeluInPlace(coef, n);
      const W* rows[kSideBySide];
      const W* ahead[kSideBySide];
      const float* xs[kSideBySide];
      float* outs[kSideBySide];
      float dots[kSideBySide];
      int g_ahead = 0;
      for (int64_t a = 0; a < n; a += kSideBySide) {
        const int g = row_group(k2, rest, neuron, n, a, rows, ahead, &g_ahead);
        for (int j = 0; j < g; ++j) xs[j] = x + token[a + j] * rest;
        kk.DotRows(rows, xs, g, rest, dots, ahead, g_ahead);
        for (int j = 0; j < g; ++j) coef[a + j] *= dots[j];
      }
      for (int64_t a = 0; a < n; a += kSideBySide) {
        const int g = row_group(v, width, neuron, n, a, rows, ahead, &g_ahead);
        if (tokens == 1) {
          kk.AddRows(part, coef + a, rows, g, width, ahead, g_ahead);
        } else {
          for (int j = 0; j < g; ++j) outs[j] = part + token[a + j] * width;
          kk.AddRowsTo(outs, coef + a, rows, g, width, ahead, g_ahead);
        }
      }
    });
  });
  SumPartials(partial.get(), used.data(), blocks, tokens, width, y);
}

// act [M, F] holds the activations (zero: off), or with theta [M] the pre-activations, a
// neuron on where above its token's theta with activation gelu(pre - theta).
template <typename W>
void SparseFfnBlockRun(ffi::ThreadPool& pool, const float* act, const float* theta,
                       const float* x, const W* k2, const W* v, float* y, int64_t tokens,
                       int64_t neurons, int64_t rest, int64_t width) {
  if (tokens <= kRowPathTokens) {
    SparseFfnFewTokens(pool, act, theta, x, k2, v, y, tokens, neurons, rest, width);
    return;
  }
  const int64_t chunks = (neurons + kNeuronChunk - 1) / kNeuronChunk;
  std::vector<NeuronPairs> pairs(chunks);
  ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t f0 = c * kNeuronChunk, f1 = std::min(neurons, f0 + kNeuronChunk);
    NeuronPairs& p = pairs[c];
    p.start.assign(f1 - f0 + 1, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* a = act + t * neurons;
      if (theta != nullptr) {
        const float th = theta[t];
        for (int64_t i = f0; i < f1; ++i) p.start[i - f0 + 1] += a[i] > th;
      } else {
        for (int64_t i = f0; i < f1; ++i) p.start[i - f0 + 1] += a[i] != 0.0f;
      }
    }
    for (int64_t i = 0; i < f1 - f0; ++i) p.start[i + 1] += p.start[i];
    p.token.resize(p.start.back());
    p.coef.resize(p.start.back());
    std::vector<int32_t> fill(p.start.begin(), p.start.end() - 1);
    p.active.clear();
    for (int64_t i = f0; i < f1; ++i) {
      if (p.start[i - f0 + 1] > p.start[i - f0]) p.active.push_back(i);
    }
    WithIsa([&](auto kk) {
      for (int64_t t = 0; t < tokens; ++t) {
        const float* a = act + t * neurons;
        const float th = theta != nullptr ? theta[t] : 0.0f;
        for (int64_t i = f0; i < f1; ++i) {
          if (theta != nullptr ? !(a[i] > th) : a[i] == 0.0f) continue;
          const int32_t k = fill[i - f0]++;
          p.token[k] = static_cast<int32_t>(t);
          p.coef[k] = theta != nullptr ? a[i] - th : a[i];
        }
      }
      if (theta != nullptr) kk.GeluInPlace(p.coef.data(), static_cast<int64_t>(p.coef.size()));
    });
    WithIsa([&](auto kk) {
      const size_t n = p.active.size();
      // Each active neuron's dots prefetch the next one's K2 row.
      for (size_t a = 0; a < n; ++a) {
        const int64_t i = p.active[a];
        kk.Dots(k2 + i * rest, x, rest, p.token.data() + p.start[i - f0],
                p.coef.data() + p.start[i - f0], p.start[i - f0 + 1] - p.start[i - f0],
                a + 1 < n ? k2 + p.active[a + 1] * rest : nullptr);
      }
    });
  });
  const int64_t blocks = (neurons + kNeuronBlock - 1) / kNeuronBlock;
  constexpr int64_t kChunksPerBlock = kNeuronBlock / kNeuronChunk;
  // The same pairs block-major: per block of neurons, tokens ascending, and each token's
  // neurons of the block ascending, so that a pass over one block reads its pairs in order.
  const int64_t stride = tokens + 1;
  std::vector<int64_t> bstart(blocks * stride + 1, 0);  // may pass 2^31 pairs in all
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t nb = c / kChunksPerBlock;
    for (int32_t t : pairs[c].token) ++bstart[nb * stride + t + 1];
  }
  for (size_t i = 0; i + 1 < bstart.size(); ++i) bstart[i + 1] += bstart[i];
  std::vector<int32_t> bneuron(bstart.back());
  std::vector<float> bcoef(bstart.back());
  {
    std::vector<int64_t> fill(bstart.begin(), bstart.end() - 1);
    for (int64_t c = 0; c < chunks; ++c) {
      const NeuronPairs& p = pairs[c];
      const int64_t nb = c / kChunksPerBlock;
      for (int64_t i = 0; i + 1 < static_cast<int64_t>(p.start.size()); ++i) {
        for (int32_t k = p.start[i]; k < p.start[i + 1]; ++k) {
          const int64_t at = fill[nb * stride + p.token[k]]++;
          bneuron[at] = static_cast<int32_t>(c * kNeuronChunk + i);
          bcoef[at] = p.coef[k];
        }
      }
    }
  }
  // Phase 2, by column slices (as wide as the instruction set sums in registers) and blocks of
  // neurons: a slice of a block's V rows stays in the core's cache (and its pages in the TLB)
  // while each token adds its neurons of the block, read in place. Each slice's sums go to a
  // contiguous [tokens, slice] scratch rather than to y's rows a row apart, and are copied to
  // y at the end.
  int64_t cols = 0;
  WithIsa([&](auto kk) { cols = kk.SliceCols(); });
  const int64_t slices = (width + cols - 1) / cols;
  std::unique_ptr<float[]> sums(new float[slices * tokens * cols]);
  ParallelFor(pool, slices, [&](int64_t slice) {
    const int64_t d0 = slice * cols, w = std::min(width, d0 + cols) - d0;
    float* part = sums.get() + slice * tokens * cols;
    std::memset(part, 0, sizeof(float) * tokens * cols);
    WithIsa([&](auto kk) {
      for (int64_t nb = 0; nb < blocks; ++nb) {
        const int64_t* at = bstart.data() + nb * stride;
        for (int64_t t = 0; t < tokens; ++t) {
          if (at[t + 1] > at[t]) {
            kk.GatherAddSlice(v + d0, width, w, bneuron.data() + at[t], bcoef.data() + at[t],
                              at[t + 1] - at[t], part + t * cols);
          }
        }
      }
    });
    for (int64_t t = 0; t < tokens; ++t) {
      std::memcpy(y + t * width + d0, part + t * cols, sizeof(float) * w);
    }
  });
}

ffi::Error SparseFfnBlockImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> act,
                              ffi::Buffer<ffi::F32> x_rest, ffi::AnyBuffer k2, ffi::AnyBuffer v,
                              ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error err = CheckFfnTables(k2, v); err.failure()) return err;
  auto ad = act.dimensions();
  auto kd = k2.dimensions();
  auto vd = v.dimensions();
  const int64_t neurons = kd[kd.size() - 2], rest = kd[kd.size() - 1];
  const int64_t width = vd[vd.size() - 1];
  if (ad.size() < 1 || ad[ad.size() - 1] != neurons) {
    return ffi::Error::InvalidArgument("act [..., F] and k2 [F, D-R] disagree on F");
  }
  const int64_t tokens = Product(ad, 0, ad.size() - 1);
  if (static_cast<int64_t>(x_rest.element_count()) != tokens * rest ||
      static_cast<int64_t>(y->element_count()) != tokens * width) {
    return ffi::Error::InvalidArgument("x_rest must be [tokens, D-R] and y [tokens, D]");
  }
  if (tokens > INT32_MAX / kNeuronChunk) {  // a neuron chunk's pairs are counted in int32
    return ffi::Error::InvalidArgument("a block holds at most 2^24 - 1 tokens");
  }
  if (tokens == 0 || width == 0) return ffi::Error::Success();
  if (neurons == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * tokens * width);
    return ffi::Error::Success();
  }
  if (k2.element_type() == ffi::DataType::F32) {
    SparseFfnBlockRun(pool, act.typed_data(), nullptr, x_rest.typed_data(),
                      static_cast<const float*>(k2.untyped_data()),
                      static_cast<const float*>(v.untyped_data()), y->typed_data(), tokens,
                      neurons, rest, width);
  } else {
    SparseFfnBlockRun(pool, act.typed_data(), nullptr, x_rest.typed_data(),
                      static_cast<const uint16_t*>(k2.untyped_data()),
                      static_cast<const uint16_t*>(v.untyped_data()), y->typed_data(), tokens,
                      neurons, rest, width);
  }
  return ffi::Error::Success();
}

// The Spark FFN of a prefill block from its pre-activations pre [M, F] (K1 . x[:R]): per token
// the statistical top-k's soft threshold (keep_count of F), then the block FFN over the
// neurons above it with activations gelu(pre - theta). active [M] counts them.
ffi::Error SparkFfnBlockImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pre,
                             ffi::Buffer<ffi::F32> x_rest, ffi::AnyBuffer k2, ffi::AnyBuffer v,
                             int64_t keep_count, ffi::ResultBuffer<ffi::F32> y,
                             ffi::ResultBuffer<ffi::F32> active) {
  if (ffi::Error err = CheckFfnTables(k2, v); err.failure()) return err;
  auto pd = pre.dimensions();
  auto kd = k2.dimensions();
  const int64_t neurons = kd[kd.size() - 2], rest = kd[kd.size() - 1];
  const int64_t width = v.dimensions()[v.dimensions().size() - 1];
  if (pd.size() < 1 || pd[pd.size() - 1] != neurons) {
    return ffi::Error::InvalidArgument("pre [..., F] and k2 [F, D-R] disagree on F");
  }
  if (keep_count < 1 || keep_count >= neurons) {
    return ffi::Error::InvalidArgument("keep_count must be in [1, F)");
  }
  const int64_t tokens = Product(pd, 0, pd.size() - 1);
  if (static_cast<int64_t>(x_rest.element_count()) != tokens * rest ||
      static_cast<int64_t>(y->element_count()) != tokens * width ||
      static_cast<int64_t>(active->element_count()) != tokens) {
    return ffi::Error::InvalidArgument(
        "x_rest must be [tokens, D-R], y [tokens, D] and active [tokens]");
  }
  if (tokens > INT32_MAX / kNeuronChunk) {  // a neuron chunk's pairs are counted in int32
    return ffi::Error::InvalidArgument("a block holds at most 2^24 - 1 tokens");
  }
  if (tokens == 0) return ffi::Error::Success();
  const double z = isa_generic::normal_quantile(1.0 - static_cast<double>(keep_count) / neurons);
  std::vector<float> theta(tokens);
  float* counts = active->typed_data();
  const float* x = pre.typed_data();
  ParallelFor(pool, tokens, [&](int64_t t) {
    WithIsa([&](auto kk) {
      counts[t] = static_cast<float>(kk.SoftThreshold(x + t * neurons, neurons, z, &theta[t]));
    });
  });
  if (width == 0) return ffi::Error::Success();
  if (k2.element_type() == ffi::DataType::F32) {
    SparseFfnBlockRun(pool, x, theta.data(), x_rest.typed_data(),
                      static_cast<const float*>(k2.untyped_data()),
                      static_cast<const float*>(v.untyped_data()), y->typed_data(), tokens,
                      neurons, rest, width);
  } else {
    SparseFfnBlockRun(pool, x, theta.data(), x_rest.typed_data(),
                      static_cast<const uint16_t*>(k2.untyped_data()),
                      static_cast<const uint16_t*>(v.untyped_data()), y->typed_data(), tokens,
                      neurons, rest, width);
  }
  return ffi::Error::Success();
}

// Decode attention of one query per row over a cache of S slots plus the current token's own
// key (slot S, at the query's position), dense or Spark. Keys are scored in chunks of this
// many slots: a fixed size, so the result does not depend on the thread count.
constexpr int64_t kKeyChunk = 512;

struct DecodeShape {
  int64_t batch, heads, kv_heads, slots, groups;
  int64_t chunks() const { return std::max<int64_t>(1, (slots + kKeyChunk - 1) / kKeyChunk); }
  int64_t chunk_begin(int64_t c) const { return slots * c / chunks(); }
  int64_t chunk_end(int64_t c) const { return slots * (c + 1) / chunks(); }
};

// Checks one operand's shape against the expected dimensions (a -1 entry is free).
ffi::Error CheckDims(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want,
                     int64_t batch, const char* name) {
  // Leading axes (from vmap) multiply into the batch.
  const size_t tail = want.size();
  if (dims.size() < tail) {
    return ffi::Error::InvalidArgument(std::string(name) + " has too few axes");
  }
  if (Product(dims, 0, dims.size() - tail) != batch) {
    return ffi::Error::InvalidArgument(std::string(name) + ": its batch axes disagree with q_pos");
  }
  size_t i = dims.size() - tail;
  for (int64_t w : want) {
    if (w >= 0 && dims[i] != w) {
      return ffi::Error::InvalidArgument(std::string(name) + " has an inconsistent shape");
    }
    ++i;
  }
  return ffi::Error::Success();
}

bool CacheType(const ffi::AnyBuffer& a) {
  return a.element_type() == ffi::DataType::F32 || a.element_type() == ffi::DataType::BF16;
}

// Scores every query head's valid cached keys (chunks of slots of one kv head per task).
template <typename W>
void ScoreKeys(ffi::ThreadPool& pool, const DecodeShape& d, const float* q, const W* keys,
               int64_t width, const int32_t* pos, const int32_t* q_pos, const int32_t* window,
               float cap, float* scores) {
  const int64_t keys_per_head = d.slots + 1, chunks = d.chunks();
  ParallelFor(pool, d.batch * d.kv_heads * chunks, [&](int64_t task) {
    const int64_t b = task / (d.kv_heads * chunks), kv = task / chunks % d.kv_heads;
    const int64_t c = task % chunks;
    const int64_t head = b * d.heads + kv * d.groups;
    WithIsa([&](auto k) {
      k.KeyScores(q + head * width, d.groups, keys + (b * d.kv_heads + kv) * d.slots * width,
                  width, pos + b * d.slots, q_pos[b], window[b], cap,
                  scores + head * keys_per_head, keys_per_head, d.chunk_begin(c),
                  d.chunk_end(c));
    });
  });
}

// The current token's own key: slot S of each head's scores.
void ScoreNewKey(const DecodeShape& d, int64_t task, const float* q, const float* new_k,
                 int64_t width, const int32_t* q_pos, const int32_t* window, float cap,
                 float* scores) {
  const int64_t b = task / d.heads, kv = task % d.heads / d.groups;
  const int32_t qp = q_pos[b];
  float* s = scores + task * (d.slots + 1) + d.slots;
  if (!(qp >= 0 && window[b] > 0)) {
    *s = -__builtin_inff();
    return;
  }
  WithIsa([&](auto k) {
    *s = k.NewScore(new_k + (b * d.kv_heads + kv) * width, q + task * width, width, cap);
  });
}

template <typename W>
void SparkDecodeRun(ffi::ThreadPool& pool, const DecodeShape& d, const float* q_pred,
                    const float* q_rest, const W* k_pred, const W* k_rest, const W* v,
                    const int32_t* pos, const float* new_k_pred, const float* new_k_rest,
                    const float* new_v, const int32_t* q_pos, const int32_t* window,
                    int64_t pred, int64_t rest, int64_t width, int64_t top_k, float cap,
                    float* out, float* kept) {
  const int64_t keys = d.slots + 1;
  // The caller's thread keeps the scores; it waits in ParallelFor while pool threads use them.
  thread_local std::vector<float> score_buffer;
  float* scores = Scratch(score_buffer, d.batch * d.heads * keys);
  ScoreKeys(pool, d, q_pred, k_pred, pred, pos, q_pos, window, cap, scores);
  ParallelFor(pool, d.batch * d.heads, [&](int64_t task) {
    ScoreNewKey(d, task, q_pred, new_k_pred, pred, q_pos, window, cap, scores);
    const int64_t b = task / d.heads, kv = task % d.heads / d.groups;
    const int64_t cache = (b * d.kv_heads + kv) * d.slots;
    thread_local std::vector<int32_t> picked;
    thread_local std::vector<float> weights, gates;
    WithIsa([&](auto k) {
      kept[task] = static_cast<float>(k.SparkHead(
          scores + task * keys, d.slots, top_k, q_rest + task * rest, k_rest + cache * rest,
          v + cache * width, new_k_rest + (b * d.kv_heads + kv) * rest,
          new_v + (b * d.kv_heads + kv) * width, rest, width, out + task * width,
          Scratch(picked, keys), Scratch(weights, keys), Scratch(gates, keys)));
    });
  });
}

template <typename W>
void DenseDecodeRun(ffi::ThreadPool& pool, const DecodeShape& d, const float* q, const W* k,
                    const W* v, const int32_t* pos, const float* new_k, const float* new_v,
                    const int32_t* q_pos, const int32_t* window, int64_t width, float cap,
                    float* out, float* count) {
  const int64_t keys = d.slots + 1, chunks = d.chunks();
  // The caller's thread keeps both buffers; it waits in ParallelFor while pool threads use them.
  thread_local std::vector<float> score_buffer, partial_buffer;
  float* scores = Scratch(score_buffer, d.batch * d.heads * keys);
  ScoreKeys(pool, d, q, k, width, pos, q_pos, window, cap, scores);
  ParallelFor(pool, d.batch * d.heads, [&](int64_t task) {
    ScoreNewKey(d, task, q, new_k, width, q_pos, window, cap, scores);
    WithIsa([&](auto kk) {
      count[task] = static_cast<float>(kk.DenseWeights(scores + task * keys, keys));
    });
  });
  // Partial weighted sums of the values per chunk of slots, then their sum in chunk order.
  float* partial = Scratch(partial_buffer, d.batch * d.kv_heads * chunks * d.groups * width);
  ParallelFor(pool, d.batch * d.kv_heads * chunks, [&](int64_t task) {
    const int64_t b = task / (d.kv_heads * chunks), kv = task / chunks % d.kv_heads;
    const int64_t c = task % chunks;
    const int64_t head = b * d.heads + kv * d.groups;
    WithIsa([&](auto kk) {
      kk.WeightedValues(scores + head * keys, d.groups, keys,
                        v + (b * d.kv_heads + kv) * d.slots * width, width,
                        partial + task * d.groups * width, d.chunk_begin(c),
                        d.chunk_end(c));
    });
  });
  ParallelFor(pool, d.batch * d.heads, [&](int64_t task) {
    const int64_t b = task / d.heads, n = task % d.heads, kv = n / d.groups, g = n % d.groups;
    float* o = out + task * width;
    for (int64_t i = 0; i < width; ++i) o[i] = 0.0f;
    const float* part = partial + ((b * d.kv_heads + kv) * chunks) * d.groups * width;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* pc = part + (c * d.groups + g) * width;
      for (int64_t i = 0; i < width; ++i) o[i] += pc[i];
    }
    const float w_new = scores[task * keys + d.slots];
    if (w_new != 0.0f) {
      WithIsa([&](auto kk) {
        kk.AddScaled(o, w_new, new_v + (b * d.kv_heads + kv) * width, width);
      });
    }
  });
}

// q_pos [...] and window [...] give the batch; every other operand carries those axes first.
ffi::Error DecodeBatch(const ffi::Buffer<ffi::S32>& q_pos, const ffi::Buffer<ffi::S32>& window,
                       int64_t* batch) {
  *batch = static_cast<int64_t>(q_pos.element_count());
  if (static_cast<int64_t>(window.element_count()) != *batch) {
    return ffi::Error::InvalidArgument("window must have q_pos's shape");
  }
  return ffi::Error::Success();
}

ffi::Error SparkDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_pred,
                           ffi::Buffer<ffi::F32> q_rest, ffi::AnyBuffer k_pred,
                           ffi::AnyBuffer k_rest, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> pos,
                           ffi::Buffer<ffi::F32> new_k_pred, ffi::Buffer<ffi::F32> new_k_rest,
                           ffi::Buffer<ffi::F32> new_v, ffi::Buffer<ffi::S32> q_pos,
                           ffi::Buffer<ffi::S32> window, int64_t top_k, float softcap,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> kept) {
  int64_t batch = 0;
  if (ffi::Error err = DecodeBatch(q_pos, window, &batch); err.failure()) return err;
  if (!CacheType(k_pred) || k_pred.element_type() != k_rest.element_type() ||
      k_pred.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument(
        "k_pred, k_rest and v must share one dtype, float32 or bfloat16");
  }
  auto qd = q_pred.dimensions();
  auto kd = k_pred.dimensions();
  auto vd = v.dimensions();
  if (qd.size() < 2 || kd.size() < 3 || vd.size() < 1 || top_k < 1) {
    return ffi::Error::InvalidArgument("expected q_pred [..., N, R], caches [..., K, S, *]");
  }
  const int64_t heads = qd[qd.size() - 2], pred = qd[qd.size() - 1];
  const int64_t kv_heads = kd[kd.size() - 3], slots = kd[kd.size() - 2];
  const int64_t rest = q_rest.dimensions()[q_rest.dimensions().size() - 1];
  const int64_t width = vd[vd.size() - 1];
  if (kv_heads == 0 || heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument("the query heads must be a multiple of the kv heads");
  }
  ffi::Error err;
  auto check = [&](ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want,
                   const char* name) {
    if (err.success()) err = CheckDims(dims, want, batch, name);
  };
  check(qd, {heads, pred}, "q_pred");
  check(q_rest.dimensions(), {heads, rest}, "q_rest");
  check(kd, {kv_heads, slots, pred}, "k_pred");
  check(k_rest.dimensions(), {kv_heads, slots, rest}, "k_rest");
  check(vd, {kv_heads, slots, width}, "v");
  check(pos.dimensions(), {slots}, "pos");
  check(new_k_pred.dimensions(), {kv_heads, pred}, "new_k_pred");
  check(new_k_rest.dimensions(), {kv_heads, rest}, "new_k_rest");
  check(new_v.dimensions(), {kv_heads, width}, "new_v");
  check(out->dimensions(), {heads, width}, "out");
  check(kept->dimensions(), {heads}, "kept");
  if (err.failure()) return err;
  if (batch * heads == 0) return ffi::Error::Success();
  const DecodeShape d{batch, heads, kv_heads, slots, heads / kv_heads};
  const auto* qp = q_pos.typed_data();
  const auto* win = window.typed_data();
  if (k_pred.element_type() == ffi::DataType::F32) {
    SparkDecodeRun(pool, d, q_pred.typed_data(), q_rest.typed_data(),
                   static_cast<const float*>(k_pred.untyped_data()),
                   static_cast<const float*>(k_rest.untyped_data()),
                   static_cast<const float*>(v.untyped_data()), pos.typed_data(),
                   new_k_pred.typed_data(), new_k_rest.typed_data(), new_v.typed_data(), qp,
                   win, pred, rest, width, top_k, softcap, out->typed_data(),
                   kept->typed_data());
  } else {
    SparkDecodeRun(pool, d, q_pred.typed_data(), q_rest.typed_data(),
                   static_cast<const uint16_t*>(k_pred.untyped_data()),
                   static_cast<const uint16_t*>(k_rest.untyped_data()),
                   static_cast<const uint16_t*>(v.untyped_data()), pos.typed_data(),
                   new_k_pred.typed_data(), new_k_rest.typed_data(), new_v.typed_data(), qp,
                   win, pred, rest, width, top_k, softcap, out->typed_data(),
                   kept->typed_data());
  }
  return ffi::Error::Success();
}

// Spark attention of a prefill chunk's queries from their raw predictor scores [..., K, G, T,
// S] (q_pred . k_pred per query head and key of the table): each row is soft-capped and masked
// by the positions, then thresholded. A task is a group of rows of one kv head (as few groups
// as keep every thread busy): their kept keys are selected, then the table's rows are visited
// in blocks small enough to stay in the core's cache while every row of the group adds its
// kept keys of the block, so a key's rows come from memory about once per group rather than
// once per query. Each output row is summed in a fixed order (blocks in order, kept keys
// ascending) whatever the grouping.
constexpr int64_t kScoredBlockBytes = 768 << 10;  // k_rest and v bytes per block of keys

struct ScoredShape {
  int64_t batch, kv_heads, groups, queries, keys, rest, width;
  int64_t rows() const { return groups * queries; }  // per kv head
};

template <typename W>
void SparkScoredRun(ffi::ThreadPool& pool, const ScoredShape& d, const float* scores,
                    const float* q_rest, const W* k_rest, const W* v, const int32_t* q_pos,
                    const int32_t* k_pos, const int32_t* window, int64_t top_k, float cap,
                    float* out, float* kept) {
  const int64_t tables = d.batch * d.kv_heads, rows = d.rows(), keys = d.keys;
  const int64_t rest = d.rest, width = d.width;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_table = std::min(rows, (2 * threads + tables - 1) / tables);
  const int64_t group_rows = (rows + per_table - 1) / per_table;
  const int64_t row_bytes = static_cast<int64_t>(sizeof(W)) * (rest + width);
  const int64_t block = std::max<int64_t>(16, kScoredBlockBytes / std::max<int64_t>(1, row_bytes));
  ParallelFor(pool, tables * per_table, [&](int64_t task) {
    const int64_t t = task / per_table, m0 = task % per_table * group_rows;
    const int64_t m1 = std::min(rows, m0 + group_rows), b = t / d.kv_heads;
    if (m0 >= m1) return;
    // Kept lists of the group's rows, one after another, in scratch buffers.
    thread_local std::vector<int32_t> picked;
    thread_local std::vector<float> weights, gates, capped;
    thread_local std::vector<int64_t> start, cursor;
    start.assign(m1 - m0 + 1, 0);
    cursor.assign(m1 - m0, 0);
    Scratch(capped, keys);
    const W* kt = k_rest + t * keys * rest;
    const W* vt = v + t * keys * width;
    WithIsa([&](auto k) {
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = t * rows + m, at = start[m - m0];
        Scratch(picked, at + keys);
        Scratch(weights, at + keys);
        Scratch(gates, at + keys);
        k.CappedScores(scores + row * keys, k_pos + b * keys, q_pos[b * d.queries + m % d.queries],
                       window[b], cap, keys, capped.data());
        const int64_t n = k.SparkSelect(capped.data(), keys, top_k, picked.data() + at,
                                        weights.data() + at);
        start[m - m0 + 1] = at + n;
        cursor[m - m0] = at;
        kept[row] = static_cast<float>(n);
        std::memset(out + row * width, 0, sizeof(float) * width);
      }
      for (int64_t j0 = 0; j0 < keys; j0 += block) {
        const int64_t j1 = std::min(keys, j0 + block);
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t row = t * rows + m, begin = cursor[m - m0], stop = start[m - m0 + 1];
          int64_t end = begin;
          while (end < stop && picked[end] < j1) ++end;
          cursor[m - m0] = end;
          k.SparkScoredBlock(picked.data(), weights.data(), gates.data(), begin, end,
                             q_rest + row * rest, kt, vt, rest, width, out + row * width);
        }
      }
    });
    TrimScratch(picked, weights, gates, capped);
  });
}

ffi::Error SparkScoredImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores,
                           ffi::Buffer<ffi::F32> q_rest, ffi::AnyBuffer k_rest, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> k_pos,
                           ffi::Buffer<ffi::S32> window, int64_t top_k, float softcap,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> kept) {
  if (!CacheType(k_rest) || k_rest.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("k_rest and v must share one dtype, float32 or bfloat16");
  }
  auto sd = scores.dimensions();
  auto kd = k_rest.dimensions();
  auto vd = v.dimensions();
  const int64_t batch = static_cast<int64_t>(window.element_count());
  if (sd.size() < 4 || kd.size() < 3 || vd.size() < 3 || top_k < 1) {
    return ffi::Error::InvalidArgument(
        "expected scores [..., K, G, T, S], k_rest and v [..., K, S, *]");
  }
  const size_t r = sd.size();
  const ScoredShape d{batch,     sd[r - 4], sd[r - 3], sd[r - 2], sd[r - 1],
                      kd[kd.size() - 1], vd[vd.size() - 1]};
  ffi::Error err;
  auto check = [&](ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want,
                   const char* name) {
    if (err.success()) err = CheckDims(dims, want, batch, name);
  };
  check(sd, {d.kv_heads, d.groups, d.queries, d.keys}, "scores");
  check(q_rest.dimensions(), {d.kv_heads, d.groups, d.queries, d.rest}, "q_rest");
  check(kd, {d.kv_heads, d.keys, d.rest}, "k_rest");
  check(vd, {d.kv_heads, d.keys, d.width}, "v");
  check(q_pos.dimensions(), {d.queries}, "q_pos");
  check(k_pos.dimensions(), {d.keys}, "k_pos");
  check(out->dimensions(), {d.kv_heads, d.groups, d.queries, d.width}, "out");
  check(kept->dimensions(), {d.kv_heads, d.groups, d.queries}, "kept");
  if (err.failure()) return err;
  if (batch * d.kv_heads * d.rows() == 0) return ffi::Error::Success();
  if (k_rest.element_type() == ffi::DataType::F32) {
    SparkScoredRun(pool, d, scores.typed_data(), q_rest.typed_data(),
                   static_cast<const float*>(k_rest.untyped_data()),
                   static_cast<const float*>(v.untyped_data()), q_pos.typed_data(),
                   k_pos.typed_data(), window.typed_data(), top_k, softcap, out->typed_data(),
                   kept->typed_data());
  } else {
    SparkScoredRun(pool, d, scores.typed_data(), q_rest.typed_data(),
                   static_cast<const uint16_t*>(k_rest.untyped_data()),
                   static_cast<const uint16_t*>(v.untyped_data()), q_pos.typed_data(),
                   k_pos.typed_data(), window.typed_data(), top_k, softcap, out->typed_data(),
                   kept->typed_data());
  }
  return ffi::Error::Success();
}

// Spark attention over a sequence's own keys for training, forward and backward, in O(T)
// memory besides the inputs: per query position, the G query heads of a kv head score the
// keys in reach (R-wide predictor products, soft-cap, mask), select theirs by the statistical
// threshold, and only the kept keys' other half and values are read. The backward recomputes
// the scores and kept keys the same way and touches the kept keys only. Query tensors are
// laid out [..., K, T, G, *] so that a position's heads are one block.
struct TrainShape {
  int64_t batch, kv_heads, queries, groups, keys, pred, rest, width;
  int64_t tables() const { return batch * kv_heads; }
};

// Queries per task (forward) and per piece of a backward part.
constexpr int64_t kTrainQueryChunk = 16;
// The backward's key gradients are summed in this many parts per table, each over a fixed
// set of query chunks, then added in part order: the result does not depend on the threads.
constexpr int64_t kTrainParts = 4;

// The keys a query at qpos may reach: [lo, hi) of the table. When a row's key positions
// rise along the table with empty slots (-1) only at its end (a sequence's own keys), that is
// the run (qpos - window, qpos]; otherwise the whole table, masked key by key.
struct KeyRanges {
  std::vector<int64_t> filled;  // per batch row: the ascending run's length, or -1
  KeyRanges(const int32_t* k_pos, int64_t batch, int64_t keys) : filled(batch, -1) {
    for (int64_t b = 0; b < batch; ++b) {
      const int32_t* pos = k_pos + b * keys;
      int64_t n = 0;
      while (n < keys && pos[n] >= 0 && (n == 0 || pos[n] > pos[n - 1])) ++n;
      int64_t j = n;
      while (j < keys && pos[j] < 0) ++j;
      if (j == keys) filled[b] = n;
    }
  }
  void get(const int32_t* k_pos, int64_t b, int64_t keys, int32_t qpos, int32_t window,
           int64_t* lo, int64_t* hi) const {
    const int64_t n = filled[b];
    if (n < 0) {
      *lo = 0;
      *hi = keys;
      return;
    }
    const int32_t* pos = k_pos + b * keys;
    const int64_t first = static_cast<int64_t>(qpos) - window + 1;  // lowest position in reach
    *lo = std::lower_bound(pos, pos + n, first, [](int32_t a, int64_t x) { return a < x; }) - pos;
    *hi = std::upper_bound(pos, pos + n, qpos) - pos;
    if (*hi < *lo) *hi = *lo;
  }
};

// Scratch of one query position: its heads' capped scores over [lo, hi), then per head the
// kept keys (relative to lo) and their softmax weights.
struct TrainScratch {
  std::vector<float> scores, weights, gates;
  std::vector<int32_t> kept;
};

// Scores the keys [lo, hi) for the query heads at position tq of table t into s.scores
// ([G, hi - lo]) and sizes the other scratch; returns hi - lo.
template <typename W, typename K>
int64_t ScoreKeysInReach(K k, const TrainShape& d, TrainScratch& s, int64_t t, int64_t tq,
                       int64_t lo, int64_t hi, const float* q_pred, const W* k_pred,
                       const int32_t* k_pos, int32_t qpos, int32_t window, float cap) {
  const int64_t b = t / d.kv_heads, n = hi - lo;
  Scratch(s.scores, d.groups * n);
  k.KeyScores(q_pred + (t * d.queries + tq) * d.groups * d.pred, d.groups,
              k_pred + (t * d.keys + lo) * d.pred, d.pred, k_pos + b * d.keys + lo, qpos, window,
              cap, s.scores.data(), n, 0, n);
  Scratch(s.kept, d.groups * n);
  Scratch(s.weights, d.groups * n);
  Scratch(s.gates, n);
  return n;
}

template <typename W>
void SparkTrainForwardRun(ffi::ThreadPool& pool, const TrainShape& d, const float* q_pred,
                          const float* q_rest, const W* k_pred, const W* k_rest, const W* v,
                          const int32_t* q_pos, const int32_t* k_pos, const int32_t* window,
                          const int32_t* enabled, int64_t top_k, float cap, float* out,
                          float* kept_count) {
  const KeyRanges ranges(k_pos, d.batch, d.keys);
  const int64_t chunks = (d.queries + kTrainQueryChunk - 1) / kTrainQueryChunk;
  ParallelFor(pool, d.tables() * chunks, [&](int64_t task) {
    const int64_t t = task / chunks, b = t / d.kv_heads;
    const int64_t q0 = task % chunks * kTrainQueryChunk;
    const int64_t q1 = std::min(d.queries, q0 + kTrainQueryChunk);
    const int64_t k_eff = enabled[b] ? top_k : std::numeric_limits<int64_t>::max();
    thread_local TrainScratch s;
    WithIsa([&](auto k) {
      for (int64_t tq = q0; tq < q1; ++tq) {
        const int64_t row = (t * d.queries + tq) * d.groups;
        std::memset(out + row * d.width, 0, sizeof(float) * d.groups * d.width);
        const int32_t qpos = q_pos[b * d.queries + tq];
        int64_t lo = 0, hi = 0;
        if (qpos >= 0) ranges.get(k_pos, b, d.keys, qpos, window[b], &lo, &hi);
        if (hi <= lo) {
          for (int64_t g = 0; g < d.groups; ++g) kept_count[row + g] = 0.0f;
          continue;
        }
        const int64_t n = ScoreKeysInReach<W>(k, d, s, t, tq, lo, hi, q_pred, k_pred, k_pos,
                                              qpos, window[b], cap);
        for (int64_t g = 0; g < d.groups; ++g) {
          int32_t* kept = s.kept.data() + g * n;
          float* weights = s.weights.data() + g * n;
          const int64_t count = k.SparkSelect(s.scores.data() + g * n, n, k_eff, kept, weights);
          kept_count[row + g] = static_cast<float>(count);
          k.SparkScoredBlock(kept, weights, s.gates.data(), 0, count,
                             q_rest + (row + g) * d.rest, k_rest + (t * d.keys + lo) * d.rest,
                             v + (t * d.keys + lo) * d.width, d.rest, d.width,
                             out + (row + g) * d.width);
        }
      }
    });
    TrimScratch(s.scores, s.weights, s.gates, s.kept);
  });
}

template <typename W>
void SparkTrainBackwardRun(ffi::ThreadPool& pool, const TrainShape& d, const float* q_pred,
                           const float* q_rest, const W* k_pred, const W* k_rest, const W* v,
                           const int32_t* q_pos, const int32_t* k_pos, const int32_t* window,
                           const int32_t* enabled, int64_t top_k, float cap,
                           const float* d_out, const float* delta, float* dq_pred,
                           float* dq_rest, float* dk_pred, float* dk_rest, float* dv) {
  const KeyRanges ranges(k_pos, d.batch, d.keys);
  const int64_t chunks = (d.queries + kTrainQueryChunk - 1) / kTrainQueryChunk;
  // Per table and part: key gradients [S, R], [S, C], [S, H] one after another.
  const int64_t per_key = d.pred + d.rest + d.width, part_size = d.keys * per_key;
  std::vector<float> parts(static_cast<size_t>(d.tables() * kTrainParts * part_size), 0.0f);
  ParallelFor(pool, d.tables() * kTrainParts, [&](int64_t task) {
    const int64_t t = task / kTrainParts, part = task % kTrainParts, b = t / d.kv_heads;
    const int64_t k_eff = enabled[b] ? top_k : std::numeric_limits<int64_t>::max();
    float* acc = parts.data() + task * part_size;
    float* acc_pred = acc;
    float* acc_rest = acc + d.keys * d.pred;
    float* acc_v = acc_rest + d.keys * d.rest;
    thread_local TrainScratch s;
    WithIsa([&](auto k) {
      // Chunks part, part + kTrainParts, ...: each part gets early and late queries alike.
      for (int64_t c = part; c < chunks; c += kTrainParts) {
        const int64_t q1 = std::min(d.queries, (c + 1) * kTrainQueryChunk);
        for (int64_t tq = c * kTrainQueryChunk; tq < q1; ++tq) {
          const int64_t row = (t * d.queries + tq) * d.groups;
          std::memset(dq_pred + row * d.pred, 0, sizeof(float) * d.groups * d.pred);
          std::memset(dq_rest + row * d.rest, 0, sizeof(float) * d.groups * d.rest);
          const int32_t qpos = q_pos[b * d.queries + tq];
          int64_t lo = 0, hi = 0;
          if (qpos >= 0) ranges.get(k_pos, b, d.keys, qpos, window[b], &lo, &hi);
          if (hi <= lo) continue;
          const int64_t n = ScoreKeysInReach<W>(k, d, s, t, tq, lo, hi, q_pred, k_pred,
                                                k_pos, qpos, window[b], cap);
          for (int64_t g = 0; g < d.groups; ++g) {
            int32_t* kept = s.kept.data() + g * n;
            float* weights = s.weights.data() + g * n;
            const float* capped = s.scores.data() + g * n;
            const int64_t count = k.SparkSelect(capped, n, k_eff, kept, weights);
            const int64_t r = row + g;
            k.SparkHeadGrad(kept, weights, count, capped, cap, q_pred + r * d.pred,
                            q_rest + r * d.rest, d_out + r * d.width, delta[r],
                            k_pred + (t * d.keys + lo) * d.pred,
                            k_rest + (t * d.keys + lo) * d.rest, v + (t * d.keys + lo) * d.width,
                            d.pred, d.rest, d.width, dq_pred + r * d.pred, dq_rest + r * d.rest,
                            acc_pred + lo * d.pred, acc_rest + lo * d.rest, acc_v + lo * d.width);
          }
        }
      }
    });
    TrimScratch(s.scores, s.weights, s.gates, s.kept);
  });
  // The parts' sums, added in part order, key chunk by key chunk.
  const int64_t key_chunks = std::max<int64_t>(1, (d.keys + 255) / 256);
  ParallelFor(pool, d.tables() * key_chunks, [&](int64_t task) {
    const int64_t t = task / key_chunks, c = task % key_chunks;
    const int64_t j0 = c * 256, j1 = std::min(d.keys, j0 + 256);
    const float* base = parts.data() + t * kTrainParts * part_size;
    struct Target {
      float* out;
      int64_t offset, width;
    };
    const Target targets[3] = {{dk_pred + t * d.keys * d.pred, 0, d.pred},
                               {dk_rest + t * d.keys * d.rest, d.keys * d.pred, d.rest},
                               {dv + t * d.keys * d.width, d.keys * (d.pred + d.rest), d.width}};
    for (const Target& x : targets) {
      for (int64_t i = j0 * x.width; i < j1 * x.width; ++i) {
        float sum = 0.0f;
        for (int64_t p = 0; p < kTrainParts; ++p) sum += base[p * part_size + x.offset + i];
        x.out[i] = sum;
      }
    }
  });
}

// Checks the training attention's operands and fills its shape.
ffi::Error TrainShapeOf(const ffi::Buffer<ffi::F32>& q_pred, const ffi::Buffer<ffi::F32>& q_rest,
                        const ffi::AnyBuffer& k_pred, const ffi::AnyBuffer& k_rest,
                        const ffi::AnyBuffer& v, const ffi::Buffer<ffi::S32>& q_pos,
                        const ffi::Buffer<ffi::S32>& k_pos, const ffi::Buffer<ffi::S32>& window,
                        const ffi::Buffer<ffi::S32>& enabled, int64_t top_k, TrainShape* d) {
  if (!CacheType(k_pred) || k_pred.element_type() != k_rest.element_type() ||
      k_pred.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument(
        "k_pred, k_rest and v must share one dtype, float32 or bfloat16");
  }
  auto qd = q_pred.dimensions();
  auto kd = k_pred.dimensions();
  if (qd.size() < 4 || kd.size() < 3 || k_rest.dimensions().size() < 3 ||
      v.dimensions().size() < 3 || top_k < 1) {
    return ffi::Error::InvalidArgument(
        "expected q parts [..., K, T, G, *], key parts and v [..., K, S, *], top_k >= 1");
  }
  const int64_t batch = static_cast<int64_t>(window.element_count());
  const size_t r = qd.size();
  *d = TrainShape{batch,
                  qd[r - 4],
                  qd[r - 3],
                  qd[r - 2],
                  kd[kd.size() - 2],
                  qd[r - 1],
                  q_rest.dimensions()[q_rest.dimensions().size() - 1],
                  v.dimensions()[v.dimensions().size() - 1]};
  ffi::Error err;
  auto check = [&](ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want,
                   const char* name) {
    if (err.success()) err = CheckDims(dims, want, batch, name);
  };
  check(qd, {d->kv_heads, d->queries, d->groups, d->pred}, "q_pred");
  check(q_rest.dimensions(), {d->kv_heads, d->queries, d->groups, d->rest}, "q_rest");
  check(kd, {d->kv_heads, d->keys, d->pred}, "k_pred");
  check(k_rest.dimensions(), {d->kv_heads, d->keys, d->rest}, "k_rest");
  check(v.dimensions(), {d->kv_heads, d->keys, d->width}, "v");
  check(q_pos.dimensions(), {d->queries}, "q_pos");
  check(k_pos.dimensions(), {d->keys}, "k_pos");
  check(enabled.dimensions(), {}, "enabled");
  return err;
}

ffi::Error SparkTrainForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_pred,
                                 ffi::Buffer<ffi::F32> q_rest, ffi::AnyBuffer k_pred,
                                 ffi::AnyBuffer k_rest, ffi::AnyBuffer v,
                                 ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> k_pos,
                                 ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::S32> enabled,
                                 int64_t top_k, float softcap, ffi::ResultBuffer<ffi::F32> out,
                                 ffi::ResultBuffer<ffi::F32> kept) {
  TrainShape d{};
  if (ffi::Error err = TrainShapeOf(q_pred, q_rest, k_pred, k_rest, v, q_pos, k_pos, window,
                                    enabled, top_k, &d);
      err.failure()) {
    return err;
  }
  ffi::Error err;
  if (err.success()) {
    err = CheckDims(out->dimensions(), {d.kv_heads, d.queries, d.groups, d.width}, d.batch,
                    "out");
  }
  if (err.success()) {
    err = CheckDims(kept->dimensions(), {d.kv_heads, d.queries, d.groups}, d.batch, "kept");
  }
  if (err.failure()) return err;
  if (d.tables() * d.queries * d.groups == 0) return ffi::Error::Success();
  auto run = [&](auto* tag) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    SparkTrainForwardRun(pool, d, q_pred.typed_data(), q_rest.typed_data(),
                         static_cast<const W*>(k_pred.untyped_data()),
                         static_cast<const W*>(k_rest.untyped_data()),
                         static_cast<const W*>(v.untyped_data()), q_pos.typed_data(),
                         k_pos.typed_data(), window.typed_data(), enabled.typed_data(), top_k,
                         softcap, out->typed_data(), kept->typed_data());
  };
  if (k_pred.element_type() == ffi::DataType::F32) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<uint16_t*>(nullptr));
  }
  return ffi::Error::Success();
}

ffi::Error SparkTrainBackwardImpl(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_pred, ffi::Buffer<ffi::F32> q_rest,
    ffi::AnyBuffer k_pred, ffi::AnyBuffer k_rest, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_pos,
    ffi::Buffer<ffi::S32> k_pos, ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::S32> enabled,
    ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> delta, int64_t top_k, float softcap,
    ffi::ResultBuffer<ffi::F32> dq_pred, ffi::ResultBuffer<ffi::F32> dq_rest,
    ffi::ResultBuffer<ffi::F32> dk_pred, ffi::ResultBuffer<ffi::F32> dk_rest,
    ffi::ResultBuffer<ffi::F32> dv) {
  TrainShape d{};
  if (ffi::Error err = TrainShapeOf(q_pred, q_rest, k_pred, k_rest, v, q_pos, k_pos, window,
                                    enabled, top_k, &d);
      err.failure()) {
    return err;
  }
  ffi::Error err;
  auto check = [&](ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want,
                   const char* name) {
    if (err.success()) err = CheckDims(dims, want, d.batch, name);
  };
  check(d_out.dimensions(), {d.kv_heads, d.queries, d.groups, d.width}, "d_out");
  check(delta.dimensions(), {d.kv_heads, d.queries, d.groups}, "delta");
  check(dq_pred->dimensions(), {d.kv_heads, d.queries, d.groups, d.pred}, "dq_pred");
  check(dq_rest->dimensions(), {d.kv_heads, d.queries, d.groups, d.rest}, "dq_rest");
  check(dk_pred->dimensions(), {d.kv_heads, d.keys, d.pred}, "dk_pred");
  check(dk_rest->dimensions(), {d.kv_heads, d.keys, d.rest}, "dk_rest");
  check(dv->dimensions(), {d.kv_heads, d.keys, d.width}, "dv");
  if (err.failure()) return err;
  if (d.tables() == 0) return ffi::Error::Success();
  auto run = [&](auto* tag) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    SparkTrainBackwardRun(pool, d, q_pred.typed_data(), q_rest.typed_data(),
                          static_cast<const W*>(k_pred.untyped_data()),
                          static_cast<const W*>(k_rest.untyped_data()),
                          static_cast<const W*>(v.untyped_data()), q_pos.typed_data(),
                          k_pos.typed_data(), window.typed_data(), enabled.typed_data(), top_k,
                          softcap, d_out.typed_data(), delta.typed_data(),
                          dq_pred->typed_data(), dq_rest->typed_data(), dk_pred->typed_data(),
                          dk_rest->typed_data(), dv->typed_data());
  };
  if (k_pred.element_type() == ffi::DataType::F32) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<uint16_t*>(nullptr));
  }
  return ffi::Error::Success();
}

ffi::Error DenseDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::Buffer<ffi::S32> pos,
                           ffi::Buffer<ffi::F32> new_k, ffi::Buffer<ffi::F32> new_v,
                           ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> window,
                           float softcap, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> count) {
  int64_t batch = 0;
  if (ffi::Error err = DecodeBatch(q_pos, window, &batch); err.failure()) return err;
  if (!CacheType(k) || k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("k and v must share one dtype, float32 or bfloat16");
  }
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() < 2 || kd.size() < 3) {
    return ffi::Error::InvalidArgument("expected q [..., N, H], k and v [..., K, S, H]");
  }
  const int64_t heads = qd[qd.size() - 2], width = qd[qd.size() - 1];
  const int64_t kv_heads = kd[kd.size() - 3], slots = kd[kd.size() - 2];
  if (kv_heads == 0 || heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument("the query heads must be a multiple of the kv heads");
  }
  ffi::Error err;
  auto check = [&](ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want,
                   const char* name) {
    if (err.success()) err = CheckDims(dims, want, batch, name);
  };
  check(qd, {heads, width}, "q");
  check(kd, {kv_heads, slots, width}, "k");
  check(v.dimensions(), {kv_heads, slots, width}, "v");
  check(pos.dimensions(), {slots}, "pos");
  check(new_k.dimensions(), {kv_heads, width}, "new_k");
  check(new_v.dimensions(), {kv_heads, width}, "new_v");
  check(out->dimensions(), {heads, width}, "out");
  check(count->dimensions(), {heads}, "count");
  if (err.failure()) return err;
  if (batch * heads == 0) return ffi::Error::Success();
  const DecodeShape d{batch, heads, kv_heads, slots, heads / kv_heads};
  if (k.element_type() == ffi::DataType::F32) {
    DenseDecodeRun(pool, d, q.typed_data(), static_cast<const float*>(k.untyped_data()),
                   static_cast<const float*>(v.untyped_data()), pos.typed_data(),
                   new_k.typed_data(), new_v.typed_data(), q_pos.typed_data(),
                   window.typed_data(), width, softcap, out->typed_data(), count->typed_data());
  } else {
    DenseDecodeRun(pool, d, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()),
                   static_cast<const uint16_t*>(v.untyped_data()), pos.typed_data(),
                   new_k.typed_data(), new_v.typed_data(), q_pos.typed_data(),
                   window.typed_data(), width, softcap, out->typed_data(), count->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

// The library's interface: the handlers and the instruction-set controls (everything
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxSparseFfnBlock, SparseFfnBlockImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // act
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x_rest
                                  .Arg<ffi::AnyBuffer>()         // k2
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxSparkFfnBlock, SparkFfnBlockImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pre
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x_rest
                                  .Arg<ffi::AnyBuffer>()         // k2
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Attr<int64_t>("keep_count")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>());  // active

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxSparkDecodeAttention, SparkDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_pred
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rest
                                  .Arg<ffi::AnyBuffer>()         // k_pred
                                  .Arg<ffi::AnyBuffer>()         // k_rest
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new_k_pred
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new_k_rest
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new_v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window
                                  .Attr<int64_t>("top_k")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // kept

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxDenseDecodeAttention, DenseDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new_k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new_v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // count

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxSparkScoredAttention, SparkScoredImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rest
                                  .Arg<ffi::AnyBuffer>()         // k_rest
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window
                                  .Attr<int64_t>("top_k")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // kept

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxSparkTrainAttention, SparkTrainForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_pred
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rest
                                  .Arg<ffi::AnyBuffer>()         // k_pred
                                  .Arg<ffi::AnyBuffer>()         // k_rest
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window
                                  .Arg<ffi::Buffer<ffi::S32>>()  // enabled
                                  .Attr<int64_t>("top_k")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // kept

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxSparkTrainAttentionGrad, SparkTrainBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_pred
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rest
                                  .Arg<ffi::AnyBuffer>()         // k_pred
                                  .Arg<ffi::AnyBuffer>()         // k_rest
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window
                                  .Arg<ffi::Buffer<ffi::S32>>()  // enabled
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Attr<int64_t>("top_k")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_pred
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_rest
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk_pred
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk_rest
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv

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
