// Kernel bodies, compiled once per instruction set: cpu_kernels.cc includes this file inside
// a namespace under a `#pragma GCC target`, with SPARSE_JAX_VECTOR_BYTES set to the width of
// that instruction set's registers (64 for AVX-512, 32 for AVX2, 16 for SSE2), so every vector
// below is one register. (GCC lowers a vector wider than the target's registers through the
// stack: 16-float vectors ran the AVX2 build at half the speed of the SSE2 one.)
//
// Weights are float32 (`float`) or bfloat16 (`uint16_t`, the high half of a float32);
// activations and accumulators are float32. kSideBySide and row_group (plain code, shared
// with cpu_kernels.cc's own loops) are defined before the includes.

#ifndef SPARSE_JAX_VECTOR_BYTES
#error "define SPARSE_JAX_VECTOR_BYTES before including kernels_impl.h"
#endif

typedef float vf __attribute__((vector_size(SPARSE_JAX_VECTOR_BYTES)));
typedef uint32_t vu __attribute__((vector_size(SPARSE_JAX_VECTOR_BYTES)));
typedef int32_t vi __attribute__((vector_size(SPARSE_JAX_VECTOR_BYTES)));

constexpr int64_t kLanes = SPARSE_JAX_VECTOR_BYTES / 4;

static inline __attribute__((always_inline)) vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 -> float32 lanes: each 16-bit value becomes the high half of a 32-bit lane. Written
// with intrinsics, one widening move per vector (GCC lowers the generic convertvector of 16
// lanes through four shuffles, which capped bfloat16 products at a third of the bandwidth).
static inline __attribute__((always_inline)) vf load(const uint16_t* p) {
#if SPARSE_JAX_VECTOR_BYTES == 64
  const __m512i u = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif SPARSE_JAX_VECTOR_BYTES == 32
  const __m256i u = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  const __m128i u =
      _mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#endif
  vf v;
  __builtin_memcpy(&v, &u, sizeof(v));
  return v;
}

static inline __attribute__((always_inline)) float scalar(float w) { return w; }

static inline __attribute__((always_inline)) float scalar(uint16_t w) {
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

static inline __attribute__((always_inline)) float sum_lanes(vf v) {
  // Pairwise (lane i += lane i + width, halving the width), so the order of the additions is
  // fixed for each instruction set; the halves are narrower vector types.
  typedef float vf4 __attribute__((vector_size(16)));
#if SPARSE_JAX_VECTOR_BYTES == 64
  typedef float vf8 __attribute__((vector_size(32)));
  const vf8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) +
                 __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
#elif SPARSE_JAX_VECTOR_BYTES == 32
  const vf4 s4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) +
                 __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  const vf4 s4 = v;
#endif
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// y[r, o] = sum_i x[r, i] * w[o, i] for NO outputs starting at o and NR rows starting at r
// (outputs before o_end are this call's).
template <int NO, int NR, typename W>
static void linear_tile(const float* x, const W* w, float* y, int64_t in, int64_t out,
                        int64_t o, int64_t r, int64_t o_end) {
  vf acc[NO][NR];
  for (int j = 0; j < NO; ++j)
    for (int q = 0; q < NR; ++q) acc[j][q] = vf{};
  const int64_t body = in / kLanes * kLanes;
  // The first rows' pass prefetches the next tile's weights at the offsets it reads, a line
  // at a time: one tile ahead, whatever the length of a weight row.
  const W* next = r == 0 && o + 2 * NO <= o_end ? w + (o + NO) * in : nullptr;
  for (int64_t i = 0; i < body; i += kLanes) {
    vf wv[NO], xv[NR];
    if (next != nullptr && (i * sizeof(W)) % 64 == 0) {
      for (int j = 0; j < NO; ++j) __builtin_prefetch(next + j * in + i);
    }
    for (int j = 0; j < NO; ++j) wv[j] = load(w + (o + j) * in + i);
    for (int q = 0; q < NR; ++q) xv[q] = load(x + (r + q) * in + i);
    for (int j = 0; j < NO; ++j)
      for (int q = 0; q < NR; ++q) acc[j][q] += wv[j] * xv[q];
  }
  for (int j = 0; j < NO; ++j) {
    for (int q = 0; q < NR; ++q) {
      float s = sum_lanes(acc[j][q]);
      for (int64_t i = body; i < in; ++i) s += scalar(w[(o + j) * in + i]) * x[(r + q) * in + i];
      y[(r + q) * out + o + j] = s;
    }
  }
}

template <int NO, typename W>
static void linear_outputs(const float* x, const W* w, float* y, int64_t rows, int64_t in,
                           int64_t out, int64_t o, int64_t o_end) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) linear_tile<NO, 4>(x, w, y, in, out, o, r, o_end);
  switch (rows - r) {
    case 3: linear_tile<NO, 3>(x, w, y, in, out, o, r, o_end); break;
    case 2: linear_tile<NO, 2>(x, w, y, in, out, o, r, o_end); break;
    case 1: linear_tile<NO, 1>(x, w, y, in, out, o, r, o_end); break;
    default: break;
  }
}

// Outputs [o_begin, o_end) of y [rows, out] = x [rows, in] . w [out, in]^T.
template <typename W>
void linear(const float* x, const W* w, float* y, int64_t rows, int64_t in, int64_t out,
            int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  if (rows == 1) {  // one row (decode): eight weight rows at a time, eight streams
    for (; o + 8 <= o_end; o += 8) linear_tile<8, 1>(x, w, y, in, out, o, 0, o_end);
  }
  for (; o + 4 <= o_end; o += 4) linear_outputs<4>(x, w, y, rows, in, out, o, o_end);
  switch (o_end - o) {
    case 3: linear_outputs<3>(x, w, y, rows, in, out, o, o_end); break;
    case 2: linear_outputs<2>(x, w, y, rows, in, out, o, o_end); break;
    case 1: linear_outputs<1>(x, w, y, rows, in, out, o, o_end); break;
    default: break;
  }
}

// An index clamped into [0, rows): out-of-range indices read an edge row, never outside.
static inline __attribute__((always_inline)) int64_t clamp_row(int32_t index, int64_t rows) {
  const int64_t i = index;
  return i < 0 ? 0 : (i >= rows ? rows - 1 : i);
}

// coef[s] = h[s] * (k2[idx[s]] . x) for the slots s in [s_begin, s_end) of one token; a slot
// whose h is 0 (padding) reads no row and gives 0.
template <typename W>
void gated_values(const float* h, const int32_t* idx, const float* x, const W* k2,
                  float* coef, int64_t rows, int64_t width, int64_t s_begin, int64_t s_end) {
  const int64_t body = width / kLanes * kLanes;
  for (int64_t s = s_begin; s < s_end; ++s) {
    if (h[s] == 0.0f) {
      coef[s] = 0.0f;
      continue;
    }
    const W* row = k2 + clamp_row(idx[s], rows) * width;
    vf a0 = vf{}, a1 = vf{};
    int64_t i = 0;
    for (; i + 2 * kLanes <= body; i += 2 * kLanes) {
      a0 += load(row + i) * load(x + i);
      a1 += load(row + i + kLanes) * load(x + i + kLanes);
    }
    for (; i < body; i += kLanes) a0 += load(row + i) * load(x + i);
    float dot = sum_lanes(a0 + a1);
    for (; i < width; ++i) dot += scalar(row[i]) * x[i];
    coef[s] = h[s] * dot;
  }
}

// y[d] = sum_s coef[s] * v[idx[s], d] for d in [d_begin, d_end) of one token (d_end - d_begin
// a multiple of kLanes, or the row's end).
template <typename W>
void scatter_rows(const float* coef, const int32_t* idx, const W* v, float* y, int64_t slots,
                  int64_t rows, int64_t width, int64_t d_begin, int64_t d_end) {
  constexpr int kBlock = 8;  // vectors of y kept in registers
  int64_t d = d_begin;
  for (; d + kBlock * kLanes <= d_end; d += kBlock * kLanes) {
    vf acc[kBlock];
    for (int k = 0; k < kBlock; ++k) acc[k] = vf{};
    for (int64_t s = 0; s < slots; ++s) {
      const float c = coef[s];
      if (c == 0.0f) continue;
      const W* row = v + clamp_row(idx[s], rows) * width + d;
      for (int k = 0; k < kBlock; ++k) acc[k] += c * load(row + k * kLanes);
    }
    for (int k = 0; k < kBlock; ++k) __builtin_memcpy(y + d + k * kLanes, &acc[k], sizeof(vf));
  }
  for (; d + kLanes <= d_end; d += kLanes) {
    vf acc = vf{};
    for (int64_t s = 0; s < slots; ++s) {
      const float c = coef[s];
      if (c == 0.0f) continue;
      acc += c * load(v + clamp_row(idx[s], rows) * width + d);
    }
    __builtin_memcpy(y + d, &acc, sizeof(vf));
  }
  for (; d < d_end; ++d) {
    float acc = 0.0f;
    for (int64_t s = 0; s < slots; ++s) {
      if (coef[s] != 0.0f) acc += coef[s] * scalar(v[clamp_row(idx[s], rows) * width + d]);
    }
    y[d] = acc;
  }
}

// One query head of top-k attention at decode:
//   out[h] = sum_a p[a] * softplus(q . k_rest[idx[a]]) * v[idx[a], h]
// over the selected cache slots of its kv head (k_rest [rows, rest], v [rows, width]); a slot
// whose p is 0 (padding) reads no row.
template <typename W>
void gated_attention(const float* q, const float* p, const int32_t* idx, const W* k_rest,
                     const W* v, float* out, int64_t slots, int64_t rows, int64_t rest,
                     int64_t width) {
  const int64_t body = rest / kLanes * kLanes;
  const int64_t vbody = width / kLanes * kLanes;
  for (int64_t d = 0; d < width; ++d) out[d] = 0.0f;
  for (int64_t s = 0; s < slots; ++s) {
    if (p[s] == 0.0f) continue;
    const int64_t row = clamp_row(idx[s], rows);
    const W* k = k_rest + row * rest;
    vf acc = vf{};
    for (int64_t i = 0; i < body; i += kLanes) acc += load(k + i) * load(q + i);
    float dot = sum_lanes(acc);
    for (int64_t i = body; i < rest; ++i) dot += scalar(k[i]) * q[i];
    // softplus(x) = max(x, 0) + log1p(exp(-|x|)), without overflow.
    const float gate = (dot > 0.0f ? dot : 0.0f) + std::log1p(std::exp(-std::fabs(dot)));
    const float weight = p[s] * gate;
    const W* vr = v + row * width;
    for (int64_t d = 0; d < vbody; d += kLanes) {
      vf o;
      __builtin_memcpy(&o, out + d, sizeof(vf));
      o += weight * load(vr + d);
      __builtin_memcpy(out + d, &o, sizeof(vf));
    }
    for (int64_t d = vbody; d < width; ++d) out[d] += weight * scalar(vr[d]);
  }
}

static inline __attribute__((always_inline)) vf splat(float x) { return vf{} + x; }

static inline __attribute__((always_inline)) vf as_float(vi bits) {
  return reinterpret_cast<vf&>(bits);
}

static inline __attribute__((always_inline)) vi as_bits(vf x) { return reinterpret_cast<vi&>(x); }

// exp(x) lane by lane for x <= 88 (larger x gives 2^127-ish, not inf); 0 below -87, so
// exp(-inf) = 0. x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is exact), then
// a degree-7 Taylor polynomial of exp(r) (truncation below 6e-9) times 2^n from its bits.
static inline __attribute__((always_inline)) vf exp_lanes(vf x) {
  const vi under = x < splat(-87.0f);
  x = x > splat(88.0f) ? splat(88.0f) : x;
  x = under ? splat(0.0f) : x;
  const vf t = x * 1.44269504088896341f;
  const vi n = __builtin_convertvector(t + (t >= splat(0.0f) ? splat(0.5f) : splat(-0.5f)), vi);
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  vf p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vf y = p * as_float((n + 127) << 23);
  return under ? splat(0.0f) : y;
}

// tanh(x) lane by lane: |x| < 0.625 by an odd polynomial (a least-squares fit of tanh(x)/x
// in x^2 on that interval; its largest error in float32 Horner form was 0.83 ulp over 200k
// points), above it by 1 - 2 / (exp(2|x|) + 1), which has no cancellation there; the sign is
// x's. The kernel tests hold the soft-capped scores to a float64 tanh through their outputs.
static inline __attribute__((always_inline)) vf tanh_lanes(vf x) {
  const vi sign = as_bits(x) & static_cast<int32_t>(0x80000000u);
  const vf a = as_float(as_bits(x) & 0x7fffffff);
  const vf t = a * a;
  vf p = splat(-0.005664775360992441f);
  p = p * t + 0.020595679965422484f;
  p = p * t + -0.05372267934589393f;
  p = p * t + 0.13331150161457603f;
  p = p * t + -0.3333326164181036f;
  p = p * t + 0.9999999961636127f;
  const vf small = a * p;
  const vf e = exp_lanes(2.0f * (a > splat(10.0f) ? splat(10.0f) : a));
  const vf large = 1.0f - 2.0f / (e + 1.0f);
  const vf y = a < splat(0.625f) ? small : large;
  return as_float(as_bits(y) | sign);
}

// row . q; with `ahead`, the row read next (at least `width` long) is prefetched as this one
// is read, so a gather of scattered rows streams the next row while it sums this one.
template <typename W>
static inline __attribute__((always_inline)) float dot(const W* row, const float* q,
                                                       int64_t width,
                                                       const W* ahead = nullptr) {
  const int64_t body = width / kLanes * kLanes;
  vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
  int64_t i = 0;
  for (; i + 4 * kLanes <= body; i += 4 * kLanes) {
    if (ahead != nullptr) {
      for (size_t b = 0; b < 4 * kLanes * sizeof(W); b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(ahead + i) + b);
      }
    }
    a0 += load(row + i) * load(q + i);
    a1 += load(row + i + kLanes) * load(q + i + kLanes);
    a2 += load(row + i + 2 * kLanes) * load(q + i + 2 * kLanes);
    a3 += load(row + i + 3 * kLanes) * load(q + i + 3 * kLanes);
  }
  for (; i < body; i += kLanes) a0 += load(row + i) * load(q + i);
  float s = sum_lanes((a0 + a1) + (a2 + a3));
  for (; i < width; ++i) s += scalar(row[i]) * q[i];
  return s;
}

// out[j] = dot(rows[j], qs[j], width) for j in [0, N), bit for bit, the N rows read side by
// side; the lines of the n_ahead rows `ahead` are prefetched at the offsets read.
template <int N, typename W>
static inline __attribute__((always_inline)) void dot_rows(const W* const* rows,
                                                          const float* const* qs,
                                                          int64_t width, float* out,
                                                          const W* const* ahead,
                                                          int n_ahead) {
  const int64_t body = width / kLanes * kLanes;
  vf acc[N][4];
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = vf{};
  int64_t i = 0;
  for (; i + 4 * kLanes <= body; i += 4 * kLanes) {
    for (int j = 0; j < n_ahead; ++j) {
      for (size_t b = 0; b < 4 * kLanes * sizeof(W); b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(ahead[j] + i) + b);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        acc[j][u] += load(rows[j] + i + u * kLanes) * load(qs[j] + i + u * kLanes);
      }
    }
  }
  for (; i < body; i += kLanes) {
    for (int j = 0; j < N; ++j) acc[j][0] += load(rows[j] + i) * load(qs[j] + i);
  }
  for (int j = 0; j < N; ++j) {
    float s = sum_lanes((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]));
    for (int64_t t = i; t < width; ++t) s += scalar(rows[j][t]) * qs[j][t];
    out[j] = s;
  }
}

// out[d] += w * row[d] for d in [0, width); `ahead` as in dot.
template <typename W>
static inline __attribute__((always_inline)) void add_scaled(float* out, float w, const W* row,
                                                            int64_t width,
                                                            const W* ahead = nullptr) {
  const int64_t body = width / kLanes * kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    if (ahead != nullptr && (d * sizeof(W)) % 64 == 0) __builtin_prefetch(ahead + d);
    vf o;
    __builtin_memcpy(&o, out + d, sizeof(vf));
    o += w * load(row + d);
    __builtin_memcpy(out + d, &o, sizeof(vf));
  }
  for (int64_t d = body; d < width; ++d) out[d] += w * scalar(row[d]);
}

// Prefetches the cache line at column d of each of the n rows, once per line (at the first
// vector of each 64-byte line).
template <typename W>
static inline __attribute__((always_inline)) void prefetch_line_at(const W* const* rows, int n,
                                                                  int64_t d) {
  if ((d * sizeof(W)) % 64 != 0) return;
  for (int j = 0; j < n; ++j) __builtin_prefetch(rows[j] + d);
}

// For j in [0, N): out[d] += w[j] * rows[j][d], d in [0, width): the same sums in the same
// order as N add_scaled calls, but the N rows are read side by side (N streams in flight
// rather than one, for gathered rows). The lines of the n_ahead rows `ahead` are prefetched
// at the offsets read.
template <int N, typename W>
static inline __attribute__((always_inline)) void add_rows(float* out, const float* w,
                                                          const W* const* rows, int64_t width,
                                                          const W* const* ahead,
                                                          int n_ahead) {
  const int64_t body = width / kLanes * kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    prefetch_line_at(ahead, n_ahead, d);
    vf o;
    __builtin_memcpy(&o, out + d, sizeof(vf));
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) o += w[j] * load(rows[j] + d);
    __builtin_memcpy(out + d, &o, sizeof(vf));
  }
  for (int64_t d = body; d < width; ++d) {
    for (int j = 0; j < N; ++j) out[d] += w[j] * scalar(rows[j][d]);
  }
}

// For j in [0, N): outs[j][d] += w[j] * rows[j][d], d in [0, width), in order of j at each
// d: the same sums as N add_scaled calls in turn, also when outs repeat, with the N rows read
// side by side. The lines of the n_ahead rows `ahead` are prefetched at the offsets read.
template <int N, typename W>
static inline __attribute__((always_inline)) void add_rows_to(float* const* outs,
                                                             const float* w,
                                                             const W* const* rows,
                                                             int64_t width,
                                                             const W* const* ahead,
                                                             int n_ahead) {
  const int64_t body = width / kLanes * kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    prefetch_line_at(ahead, n_ahead, d);
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) {
      vf o;
      __builtin_memcpy(&o, outs[j] + d, sizeof(vf));
      o += w[j] * load(rows[j] + d);
      __builtin_memcpy(outs[j] + d, &o, sizeof(vf));
    }
  }
  for (int64_t d = body; d < width; ++d) {
    for (int j = 0; j < N; ++j) outs[j][d] += w[j] * scalar(rows[j][d]);
  }
}

// f(std::integral_constant<int, n>{}) for n in [1, 4] (4 for anything larger): the row count
// of dot_rows and add_rows as a compile-time constant.
template <typename F>
static inline void with_row_count(int n, const F& f) {
  switch (n) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, 4>{});
  }
}

// Whether a cached key at position `pos` is valid for a query at `qpos` (causal, inside the
// window, slot filled).
static inline __attribute__((always_inline)) bool key_valid(int32_t pos, int32_t qpos,
                                                            int32_t window) {
  return pos >= 0 && pos <= qpos && static_cast<int64_t>(qpos) - pos < window;
}

// Scores of `groups` queries q [groups, width] against the cached keys [begin, end) of one kv
// head (keys [rows, width]): scores[g * stride + j] = softcap(q_g . keys[j]), -inf for an
// invalid key (which is not read). cap <= 0 means no soft-cap.
template <typename W>
void key_scores(const float* q, int64_t groups, const W* keys, int64_t width,
                const int32_t* pos, int32_t qpos, int32_t window, float cap, float* scores,
                int64_t stride, int64_t begin, int64_t end) {
  constexpr int kRows = 4;  // rows scored together: four independent accumulator chains
  constexpr int64_t kAheadRows = 16;  // how far ahead the rows are prefetched
  const int64_t body = width / kLanes * kLanes;
  int64_t j = begin;
  for (; j + kRows <= end; j += kRows) {
    bool all_valid = true;
    for (int r = 0; r < kRows; ++r) all_valid &= key_valid(pos[j + r], qpos, window);
    if (!all_valid) {
      for (int r = 0; r < kRows; ++r) {
        const bool valid = key_valid(pos[j + r], qpos, window);
        for (int64_t g = 0; g < groups; ++g) {
          scores[g * stride + j + r] =
              valid ? dot(keys + (j + r) * width, q + g * width, width) : 0.0f;
        }
      }
      continue;
    }
    const W* rows = keys + j * width;
    // The rows kAheadRows further on (the last full block at the end), a cache line at a
    // time: these four rows are short streams that the hardware prefetcher did not run far
    // enough ahead of. Without it, on an AMD EPYC, the Spark scores read their keys at 12-15
    // GB/s where the dense kernel read keys and values at 19-21 GB/s.
    const W* ahead_row = keys + std::min(j + kAheadRows, end - kRows) * width;
    const char* ahead = reinterpret_cast<const char*>(ahead_row);
    for (int64_t b = 0; b < static_cast<int64_t>(kRows * width * sizeof(W)); b += 64) {
      __builtin_prefetch(ahead + b);
    }
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = q + g * width;
      vf acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = vf{};
      for (int64_t i = 0; i < body; i += kLanes) {
        const vf qv = load(qg + i);
        for (int r = 0; r < kRows; ++r) acc[r] += load(rows + r * width + i) * qv;
      }
      for (int r = 0; r < kRows; ++r) {
        float sum = sum_lanes(acc[r]);
        for (int64_t i = body; i < width; ++i) sum += scalar(rows[r * width + i]) * qg[i];
        scores[g * stride + j + r] = sum;
      }
    }
  }
  for (; j < end; ++j) {
    const bool valid = key_valid(pos[j], qpos, window);
    for (int64_t g = 0; g < groups; ++g) {
      scores[g * stride + j] = valid ? dot(keys + j * width, q + g * width, width) : 0.0f;
    }
  }
  const float neg_inf = -__builtin_inff();
  for (int64_t g = 0; g < groups; ++g) {
    float* s = scores + g * stride;
    j = begin;
    if (cap > 0.0f) {
      for (; j + kLanes <= end; j += kLanes) {
        vf x;
        __builtin_memcpy(&x, s + j, sizeof(vf));
        x = cap * tanh_lanes(x * (1.0f / cap));
        __builtin_memcpy(s + j, &x, sizeof(vf));
      }
      for (; j < end; ++j) {
        vf x = splat(s[j] * (1.0f / cap));
        s[j] = cap * tanh_lanes(x)[0];
      }
    }
    for (j = begin; j < end; ++j) {
      if (!key_valid(pos[j], qpos, window)) s[j] = neg_inf;
    }
  }
}

// The standard normal quantile for p in (0, 1): the Cephes rational approximation (three
// ranges), in double.
static double normal_quantile(double p) {
  static const double p0[5] = {-5.99633501014107895267e1, 9.80010754185999661536e1,
                               -5.66762857469070293439e1, 1.39312609387279679503e1,
                               -1.23916583867381258016e0};
  static const double q0[8] = {1.95448858338141759834e0,  4.67627912898881538453e0,
                               8.63602421390890590575e1,  -2.25462687854119370527e2,
                               2.00260212380060660359e2,  -8.20372256168333339912e1,
                               1.59056225126211695515e1,  -1.18331621121330003142e0};
  static const double p1[9] = {4.05544892305962419923e0,   3.15251094599893866154e1,
                               5.71628192246421288162e1,   4.40805073893200834700e1,
                               1.46849561928858024014e1,   2.18663306850790267539e0,
                               -1.40256079171354495875e-1, -3.50424626827848203418e-2,
                               -8.57456785154685413611e-4};
  static const double q1[8] = {1.57799883256466749731e1,   4.53907635128879210584e1,
                               4.13172038254672030440e1,   1.50425385692907503408e1,
                               2.50464946208309415979e0,   -1.42182922854787788574e-1,
                               -3.80806407691578277194e-2, -9.33259480895457427372e-4};
  static const double p2[9] = {3.23774891776946035970e0,  6.91522889068984211695e0,
                               3.93881025292474443415e0,  1.33303460815807542389e0,
                               2.01485389549179081538e-1, 1.23716634817820021358e-2,
                               3.01581553508235416007e-4, 2.65806974686737550832e-6,
                               6.23974539184983293730e-9};
  static const double q2[8] = {6.02427039364742014255e0,  3.67983563856160859403e0,
                               1.37702099489081330271e0,  2.16236993594496635890e-1,
                               1.34204006088543189037e-2, 3.28014464682127739104e-4,
                               2.89247864745380683936e-6, 6.79019408009981274425e-9};
  auto poly = [](const double* c, int n, double x) {
    double r = 0.0;
    for (int i = 0; i < n; ++i) r = r * x + c[i];
    return r;
  };
  auto poly1 = [](const double* c, int n, double x) {  // leading coefficient 1
    double r = 1.0;
    for (int i = 0; i < n; ++i) r = r * x + c[i];
    return r;
  };
  const double e2 = 0.1353352832366127;  // exp(-2)
  bool upper = p > 1.0 - e2;
  double y = upper ? 1.0 - p : p;
  if (y > e2) {
    y -= 0.5;
    const double y2 = y * y;
    const double x = y + y * (y2 * poly(p0, 5, y2) / poly1(q0, 8, y2));
    return x * 2.50662827463100050242;  // sqrt(2 pi)
  }
  const double x = std::sqrt(-2.0 * std::log(y));
  const double x0 = x - std::log(x) / x;
  const double z = 1.0 / x;
  const double x1 = x < 8.0 ? z * poly(p1, 9, z) / poly1(q1, 8, z) : z * poly(p2, 9, z) / poly1(q2, 8, z);
  const double out = x0 - x1;
  return upper ? out : -out;
}

// Bit i set where lane i of a comparison result is true.
static inline __attribute__((always_inline)) uint32_t mask_bits(vi m) {
#if SPARSE_JAX_VECTOR_BYTES == 64
  return _mm512_movepi32_mask(reinterpret_cast<__m512i&>(m));
#elif SPARSE_JAX_VECTOR_BYTES == 32
  return static_cast<uint32_t>(_mm256_movemask_ps(reinterpret_cast<__m256&>(m)));
#else
  return static_cast<uint32_t>(_mm_movemask_ps(reinterpret_cast<__m128&>(m)));
#endif
}

// log1p(y) lane by lane for y in [0, 1]: u = 1 + y (rounded), ln u = e ln2 + 2 atanh(f) with
// u = 2^e m, m in [sqrt(2)/2, sqrt(2)], f = (m - 1) / (m + 1), |f| <= 0.172 (the atanh series
// to f^13, truncation below 1e-11), plus u's rounding error c as c / u.
static inline __attribute__((always_inline)) vf log1p_unit_lanes(vf y) {
  const vf u = 1.0f + y;
  const vf c = y - (u - 1.0f);
  const vi big = u > splat(1.41421356f);
  const vf m = big ? u * 0.5f : u;
  const vf f = (m - 1.0f) / (m + 1.0f);
  const vf f2 = f * f;
  vf p = splat(2.0f / 13.0f);
  p = p * f2 + 2.0f / 11.0f;
  p = p * f2 + 2.0f / 9.0f;
  p = p * f2 + 2.0f / 7.0f;
  p = p * f2 + 2.0f / 5.0f;
  p = p * f2 + 2.0f / 3.0f;
  p = p * f2 + 2.0f;
  const vf e = big ? splat(0.693147180559945f) : splat(0.0f);
  return e + (f * p + c / u);
}

// softplus(g) = max(g, 0) + log1p(exp(-|g|)) lane by lane, without overflow.
static inline __attribute__((always_inline)) vf softplus_lanes(vf g) {
  const vf a = as_float(as_bits(g) & 0x7fffffff);
  return (g > splat(0.0f) ? g : splat(0.0f)) + log1p_unit_lanes(exp_lanes(-a));
}

// One query's predictor scores over a table of keys as the threshold reads them: the raw dot
// products [keys] soft-capped (cap > 0) and -inf where the key (position pos[j]) is invalid
// for a query at qpos (a padding query, qpos < 0, has none).
static void capped_scores(const float* raw, const int32_t* pos, int32_t qpos, int32_t window,
                          float cap, int64_t keys, float* out) {
  const float neg_inf = -__builtin_inff();
  if (qpos < 0 || window <= 0) {
    for (int64_t j = 0; j < keys; ++j) out[j] = neg_inf;
    return;
  }
  // qpos - p < window as p > qpos - window: no overflow for qpos >= 0 and window > 0.
  const vi lo = vi{} + (qpos - window), hi = vi{} + qpos;
  int64_t j = 0;
  for (; j + kLanes <= keys; j += kLanes) {
    vf x = load(raw + j);
    if (cap > 0.0f) x = cap * tanh_lanes(x * (1.0f / cap));
    vi p;
    __builtin_memcpy(&p, pos + j, sizeof(vi));
    const vi ok = (p >= 0) & (p <= hi) & (p > lo);
    x = ok ? x : splat(neg_inf);
    __builtin_memcpy(out + j, &x, sizeof(vf));
  }
  for (; j < keys; ++j) {
    const float x = cap > 0.0f ? cap * tanh_lanes(splat(raw[j] * (1.0f / cap)))[0] : raw[j];
    out[j] = key_valid(pos[j], qpos, window) ? x : neg_inf;
  }
}

// Half a register of floats, and as many doubles in a whole register.
typedef float vhalf __attribute__((vector_size(SPARSE_JAX_VECTOR_BYTES / 2)));
typedef double vd __attribute__((vector_size(SPARSE_JAX_VECTOR_BYTES)));

static inline __attribute__((always_inline)) vhalf low_half(vf x) {
  vhalf h;
  __builtin_memcpy(&h, &x, sizeof(h));
  return h;
}

static inline __attribute__((always_inline)) vhalf high_half(vf x) {
  vhalf h;
  __builtin_memcpy(&h, reinterpret_cast<const char*>(&x) + sizeof(h), sizeof(h));
  return h;
}

// Moments are summed in float32 lanes over blocks of this many keys, then in float64.
constexpr int64_t kMomentBlock = 256;

// The statistical top-k of one query head's predictor scores [keys] (-inf marks an invalid
// key): theta = min(mean + z * std, max) over the valid scores, z = Phi^-1(1 - k / n_valid),
// every valid key kept when n_valid <= k. The sum is exact up to float32 rounding inside blocks
// of kMomentBlock keys (block sums are added in float64); the squared deviations are summed in
// float64. Writes the kept keys' indices
// (ascending) and normalized softmax weights and returns their number.
static int64_t spark_select(const float* scores, int64_t keys, int64_t top_k, int32_t* kept,
                            float* weights) {
  const vf ninf = splat(-__builtin_inff());
  const int64_t body = keys / kLanes * kLanes;
  int64_t n = 0;
  double total = 0.0;
  vf vtop = ninf;
  for (int64_t j0 = 0; j0 < body; j0 += kMomentBlock) {
    const int64_t j1 = std::min(body, j0 + kMomentBlock);
    vf sum = vf{};
    vi count = vi{};
    for (int64_t j = j0; j < j1; j += kLanes) {
      const vf x = load(scores + j);
      const vi ok = x > ninf;
      sum += as_float(as_bits(x) & ok);
      count -= ok;
      vtop = x > vtop ? x : vtop;
    }
    total += sum_lanes(sum);
    for (int l = 0; l < kLanes; ++l) n += count[l];
  }
  float top = -__builtin_inff();
  for (int l = 0; l < kLanes; ++l) top = vtop[l] > top ? vtop[l] : top;
  for (int64_t j = body; j < keys; ++j) {
    const float x = scores[j];
    if (x == -__builtin_inff()) continue;
    ++n;
    total += x;
    top = x > top ? x : top;
  }
  if (n == 0) return 0;
  float theta = -__builtin_inff();
  if (n > top_k) {
    const double mean = total / static_cast<double>(n);
    const vf vmean = splat(static_cast<float>(mean));
    double squares = 0.0;
    // Squares in float64 lanes: deviations of scores near 1e-30 would underflow in float32.
    vd sq = vd{};
    for (int64_t j = 0; j < body; j += kLanes) {
      const vf x = load(scores + j);
      const vf dev = as_float(as_bits(x - vmean) & (x > ninf));
      const vd lo = __builtin_convertvector(low_half(dev), vd);
      const vd hi = __builtin_convertvector(high_half(dev), vd);
      sq += lo * lo + hi * hi;
    }
    for (int l = 0; l < kLanes / 2; ++l) squares += sq[l];
    for (int64_t j = body; j < keys; ++j) {
      if (scores[j] == -__builtin_inff()) continue;
      const double dev = scores[j] - mean;
      squares += dev * dev;
    }
    const double std_dev = std::sqrt(squares / static_cast<double>(n));
    double frac = 1.0 - static_cast<double>(top_k) / static_cast<double>(n);
    frac = frac < 1e-6 ? 1e-6 : (frac > 1.0 - 1e-6 ? 1.0 - 1e-6 : frac);
    const float t = static_cast<float>(mean + normal_quantile(frac) * std_dev);
    theta = t < top ? t : top;
  }
  // The kept keys (valid, at or above theta), then exp(s - max) over them in lanes.
  const vf vtheta = splat(theta);
  int64_t count = 0;
  for (int64_t j = 0; j < body; j += kLanes) {
    const vf x = load(scores + j);
    for (uint32_t bits = mask_bits((x > ninf) & (x >= vtheta)); bits != 0; bits &= bits - 1) {
      const int l = __builtin_ctz(bits);
      kept[count] = static_cast<int32_t>(j + l);
      weights[count++] = x[l];
    }
  }
  for (int64_t j = body; j < keys; ++j) {
    const float x = scores[j];
    if (x == -__builtin_inff() || x < theta) continue;
    kept[count] = static_cast<int32_t>(j);
    weights[count++] = x;
  }
  const int64_t cbody = count / kLanes * kLanes;
  const vf vmax = splat(top);
  vf acc = vf{};
  for (int64_t a = 0; a < cbody; a += kLanes) {
    const vf e = exp_lanes(load(weights + a) - vmax);
    __builtin_memcpy(weights + a, &e, sizeof(vf));
    acc += e;
  }
  double denom = sum_lanes(acc);
  for (int64_t a = cbody; a < count; ++a) {
    weights[a] = exp_lanes(splat(weights[a] - top))[0];
    denom += weights[a];
  }
  const float inv = static_cast<float>(1.0 / denom);
  for (int64_t a = 0; a < count; ++a) weights[a] *= inv;
  return count;
}

// out[d] += sum_a weights[a] * v[kept[a] * width + d] for d in [0, width): the rows are read
// in column tiles of 8 vectors summed in registers (in order of a), then added to out.
template <typename W>
static void weighted_rows_add(const float* weights, const int32_t* kept, int64_t n, const W* v,
                              int64_t width, float* out) {
  constexpr int64_t kTile = 8 * kLanes;
  int64_t d0 = 0;
  for (; d0 + kTile <= width; d0 += kTile) {
    vf acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = vf{};
    for (int64_t a = 0; a < n; ++a) {
      const W* row = v + kept[a] * width + d0;
      const float w = weights[a];
      for (int q = 0; q < 8; ++q) acc[q] += w * load(row + q * kLanes);
    }
    for (int q = 0; q < 8; ++q) {
      vf o;
      __builtin_memcpy(&o, out + d0 + q * kLanes, sizeof(vf));
      o += acc[q];
      __builtin_memcpy(out + d0 + q * kLanes, &o, sizeof(vf));
    }
  }
  if (d0 < width) {
    for (int64_t a = 0; a < n; ++a) {
      add_scaled(out + d0, weights[a], v + kept[a] * width + d0, width - d0);
    }
  }
}

// weights[a] *= softplus(gates[a]) for a in [0, n).
static void apply_gates(float* weights, const float* gates, int64_t n) {
  const int64_t body = n / kLanes * kLanes;
  for (int64_t a = 0; a < body; a += kLanes) {
    const vf w = load(weights + a) * softplus_lanes(load(gates + a));
    __builtin_memcpy(weights + a, &w, sizeof(vf));
  }
  for (int64_t a = body; a < n; ++a) weights[a] *= softplus_lanes(splat(gates[a]))[0];
}

// Spark attention of one query head at decode, from its predictor scores over the cache's S
// slots and its own key (scores[S + 1]; -inf marks an invalid key): the keys spark_select
// keeps, out = sum_kept softmax(scores)[j] * softplus(q_rest . k_rest[j]) * v[j]. Only the
// kept keys' k_rest and v rows are read. Returns the number of kept keys. kept, weights and
// gates hold S + 1 entries.
template <typename W>
int64_t spark_head(const float* scores, int64_t slots, int64_t top_k, const float* q_rest,
                   const W* k_rest, const W* v, const float* new_k_rest, const float* new_v,
                   int64_t rest, int64_t width, float* out, int32_t* kept, float* weights,
                   float* gates) {
  for (int64_t d = 0; d < width; ++d) out[d] = 0.0f;
  const int64_t count = spark_select(scores, slots + 1, top_k, kept, weights);
  // The kept cached keys' rows are read four at a time, side by side (dot_rows and add_rows
  // give each row's sums as one row at a time would), each group prefetching the next
  // group's; the current token's key, the last kept index when kept, comes after them.
  const int64_t cached = count > 0 && kept[count - 1] == slots ? count - 1 : count;
  const W* rows[kSideBySide];
  const W* ahead[kSideBySide];
  const float* qs[kSideBySide];
  std::fill(qs, qs + kSideBySide, q_rest);
  int g_ahead = 0;
  for (int64_t a = 0; a < cached; a += kSideBySide) {
    const int g = row_group(k_rest, rest, kept, cached, a, rows, ahead, &g_ahead);
    with_row_count(g, [&](auto n) {
      dot_rows<decltype(n)::value>(rows, qs, rest, gates + a, ahead, g_ahead);
    });
  }
  if (cached < count) gates[cached] = dot(new_k_rest, q_rest, rest);
  apply_gates(weights, gates, count);
  for (int64_t a = 0; a < cached; a += kSideBySide) {
    const int g = row_group(v, width, kept, cached, a, rows, ahead, &g_ahead);
    with_row_count(g, [&](auto n) {
      add_rows<decltype(n)::value>(out, weights + a, rows, width, ahead, g_ahead);
    });
  }
  if (cached < count) add_scaled(out, weights[cached], new_v, width);
  return count;
}

// The same for a query whose keys are all in one table (a prefill chunk's query over the cache
// joined with the chunk's own keys), in steps so that a run of queries shares the table's
// rows in the core's cache: spark_select picks the keys, then per block of the table
// spark_scored_block adds the block's kept keys: weights[a] * softplus(q_rest . k_rest[j]) *
// v[j] into out (kept[a] in [begin, end) of the ascending kept list).
template <typename W>
void spark_scored_block(const int32_t* kept, float* weights, float* gates, int64_t begin,
                        int64_t end, const float* q_rest, const W* k_rest, const W* v,
                        int64_t rest, int64_t width, float* out) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  for (int64_t a = begin; a < end; ++a) gates[a] = dot(k_rest + kept[a] * rest, q_rest, rest);
  apply_gates(weights + begin, gates + begin, n);
  weighted_rows_add(weights + begin, kept + begin, n, v, width, out);
}

// Backward of one query head's Spark attention over its kept keys (training). kept [n]
// indexes the key tables, p [n] are the kept keys' softmax weights and capped [keys] the
// head's soft-capped predictor scores; q_pred [pred], q_rest [rest], d_out [width] and delta =
// d_out . out are the query's. With gate = softplus(q_rest . k_rest[j]) and
// dv_dot = d_out . v[j], per kept key, in order:
//   dv[j] += p gate d_out;  d_gate = p dv_dot sigmoid(q_rest . k_rest[j]);
//   dq_rest += d_gate k_rest[j];  dk_rest[j] += d_gate q_rest;
//   d_raw = p (gate dv_dot - delta) cap'(capped[j]);
//   dq_pred += d_raw k_pred[j];  dk_pred[j] += d_raw q_pred.
// Keys not kept have p = 0 and no gradient (none flows through the threshold). cap <= 0: no
// soft-cap.
template <typename W>
void spark_head_grad(const int32_t* kept, const float* p, int64_t n, const float* capped,
                     float cap, const float* q_pred, const float* q_rest, const float* d_out,
                     float delta, const W* k_pred, const W* k_rest, const W* v, int64_t pred,
                     int64_t rest, int64_t width, float* dq_pred, float* dq_rest,
                     float* dk_pred, float* dk_rest, float* dv) {
  for (int64_t a = 0; a < n; ++a) {
    const int64_t j = kept[a];
    const float x = dot(k_rest + j * rest, q_rest, rest);
    // softplus(x) = max(x, 0) + log1p(e^-|x|) and sigmoid(x) from the same e^-|x|.
    const float e = std::exp(-std::fabs(x));
    const float gate = (x > 0.0f ? x : 0.0f) + std::log1p(e);
    const float sigmoid = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
    const float dv_dot = dot(v + j * width, d_out, width);
    add_scaled(dv + j * width, p[a] * gate, d_out, width);
    const float d_gate = p[a] * dv_dot * sigmoid;
    add_scaled(dq_rest, d_gate, k_rest + j * rest, rest);
    add_scaled(dk_rest + j * rest, d_gate, q_rest, rest);
    const float c = cap > 0.0f ? capped[j] / cap : 0.0f;
    const float d_raw = p[a] * (gate * dv_dot - delta) * (1.0f - c * c);
    add_scaled(dq_pred, d_raw, k_pred + j * pred, pred);
    add_scaled(dk_pred + j * pred, d_raw, q_pred, pred);
  }
}

// Dense attention weights of one query head at decode: scores [S + 1] (-inf: invalid) become
// softmax weights in place (0 on invalid keys). Returns the number of valid keys.
static int64_t dense_weights(float* scores, int64_t keys) {
  float top = -__builtin_inff();
  int64_t n = 0;
  for (int64_t j = 0; j < keys; ++j) {
    if (scores[j] == -__builtin_inff()) continue;
    ++n;
    top = scores[j] > top ? scores[j] : top;
  }
  if (n == 0) {
    for (int64_t j = 0; j < keys; ++j) scores[j] = 0.0f;
    return 0;
  }
  vf acc = vf{};
  int64_t j = 0;
  for (; j + kLanes <= keys; j += kLanes) {
    vf x;
    __builtin_memcpy(&x, scores + j, sizeof(vf));
    x = exp_lanes(x - top);
    __builtin_memcpy(scores + j, &x, sizeof(vf));
    acc += x;
  }
  float total = sum_lanes(acc);
  for (; j < keys; ++j) {
    const float e = exp_lanes(splat(scores[j] - top))[0];
    scores[j] = e;
    total += e;
  }
  const float inv = 1.0f / total;
  for (j = 0; j < keys; ++j) scores[j] *= inv;
  return n;
}

// partial[g] = sum_{j in [begin, end)} weights[g * stride + j] * v[j] for `groups` query
// heads of one kv head; a key no head weighs is not read.
template <typename W>
void weighted_values(const float* weights, int64_t groups, int64_t stride, const W* v,
                     int64_t width, float* partial, int64_t begin, int64_t end) {
  for (int64_t i = 0; i < groups * width; ++i) partial[i] = 0.0f;
  for (int64_t j = begin; j < end; ++j) {
    const W* row = v + j * width;
    for (int64_t g = 0; g < groups; ++g) {
      const float w = weights[g * stride + j];
      if (w != 0.0f) add_scaled(partial + g * width, w, row, width);
    }
  }
}

// coef[k] *= row . x[token[k]] for the n tokens of one neuron (row [width], x [*, width]);
// the first dot prefetches the row `ahead` (nullptr: none).
template <typename W>
void token_dots(const W* row, const float* x, int64_t width, const int32_t* token, float* coef,
                int64_t n, const W* ahead) {
  for (int64_t k = 0; k < n; ++k) {
    coef[k] *= dot(row, x + token[k] * width, width, k == 0 ? ahead : nullptr);
  }
}

// The statistical top-k's soft threshold of one row x [n] (the Spark FFN's pre-activations):
// theta = min(mean + z * std, max), population std; the sum in float32 lanes per block of
// kMomentBlock entries (added in float64), the squared deviations in float64 lanes. Writes
// theta and returns the number of entries above it.
static int64_t soft_threshold(const float* x, int64_t n, double z, float* theta) {
  const int64_t body = n / kLanes * kLanes;
  double total = 0.0;
  vf vtop = splat(-__builtin_inff());
  for (int64_t j0 = 0; j0 < body; j0 += kMomentBlock) {
    const int64_t j1 = std::min(body, j0 + kMomentBlock);
    vf sum = vf{};
    for (int64_t j = j0; j < j1; j += kLanes) {
      const vf v = load(x + j);
      sum += v;
      vtop = v > vtop ? v : vtop;
    }
    total += sum_lanes(sum);
  }
  float top = -__builtin_inff();
  for (int l = 0; l < kLanes; ++l) top = vtop[l] > top ? vtop[l] : top;
  for (int64_t j = body; j < n; ++j) {
    total += x[j];
    top = x[j] > top ? x[j] : top;
  }
  const double mean = total / static_cast<double>(n);
  const vf vmean = splat(static_cast<float>(mean));
  vd sq = vd{};
  for (int64_t j = 0; j < body; j += kLanes) {
    const vf dev = load(x + j) - vmean;
    const vd lo = __builtin_convertvector(low_half(dev), vd);
    const vd hi = __builtin_convertvector(high_half(dev), vd);
    sq += lo * lo + hi * hi;
  }
  double squares = 0.0;
  for (int l = 0; l < kLanes / 2; ++l) squares += sq[l];
  for (int64_t j = body; j < n; ++j) squares += (x[j] - mean) * (x[j] - mean);
  const float t = static_cast<float>(mean + z * std::sqrt(squares / static_cast<double>(n)));
  *theta = t < top ? t : top;
  const vf vtheta = splat(*theta);
  int64_t above = 0;
  for (int64_t j = 0; j < body; j += kLanes) {
    above += __builtin_popcount(mask_bits(load(x + j) > vtheta));
  }
  for (int64_t j = body; j < n; ++j) above += x[j] > *theta;
  return above;
}

// Gemma's gelu (tanh approximation), lane by lane.
static inline __attribute__((always_inline)) vf gelu_lanes(vf u) {
  const vf inner = 0.7978845608028654f * (u + 0.044715f * u * u * u);
  return 0.5f * u * (1.0f + tanh_lanes(inner));
}

// x[j] = gelu(x[j]) for j in [0, n), a vector at a time; the last partial vector goes through
// the same lanes, so each value's gelu does not depend on where it sits in x.
static void gelu_in_place(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf g = gelu_lanes(load(x + j));
    __builtin_memcpy(x + j, &g, sizeof(vf));
  }
  if (j < n) {
    vf u = vf{};
    __builtin_memcpy(&u, x + j, sizeof(float) * (n - j));
    const vf g = gelu_lanes(u);
    __builtin_memcpy(x + j, &g, sizeof(float) * (n - j));
  }
}

// Columns of y summed in registers per pass of the block FFN's phase 2: eight vectors.
constexpr int64_t kSliceCols = 8 * kLanes;
constexpr int64_t kSliceAhead = 4;  // how many neurons ahead phase 2 prefetches a slice

// out[d] += sum_k coef[k] * v[neuron[k] * stride + d] for d in [0, width) (a full slice is
// kSliceCols wide): the sum over k runs in order in registers (eight independent FMA chains),
// then is added to out.
template <typename W>
void gather_add_slice(const W* v, int64_t stride, int64_t width, const int32_t* neuron,
                      const float* coef, int64_t n, float* out) {
  if (width == kSliceCols) {
    // Unrolled by hand (pragmas), so that acc stays in registers: otherwise GCC keeps it on
    // the stack, zeroed and reloaded on every call.
    vf acc[8];
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) acc[q] = vf{};
    for (int64_t k = 0; k < n; ++k) {
      const W* row = v + neuron[k] * stride;
      if (k + kSliceAhead < n) {  // the slice kSliceAhead neurons on, a line at a time
        const char* next = reinterpret_cast<const char*>(v + neuron[k + kSliceAhead] * stride);
        for (size_t b = 0; b < kSliceCols * sizeof(W); b += 64) __builtin_prefetch(next + b);
      }
      const float c = coef[k];
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) acc[q] += c * load(row + q * kLanes);
    }
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      vf o;
      __builtin_memcpy(&o, out + q * kLanes, sizeof(vf));
      o += acc[q];
      __builtin_memcpy(out + q * kLanes, &o, sizeof(vf));
    }
    return;
  }
  for (int64_t d = 0; d < width; ++d) {  // a narrower last slice
    float acc = 0.0f;
    for (int64_t k = 0; k < n; ++k) acc += coef[k] * scalar(v[neuron[k] * stride + d]);
    out[d] += acc;
  }
}

// This instruction set's entry points, as one type the dispatcher can pass around.
struct Kernels {
  template <typename W>
  static void Linear(const float* x, const W* w, float* y, int64_t rows, int64_t in,
                     int64_t out, int64_t o_begin, int64_t o_end) {
    linear(x, w, y, rows, in, out, o_begin, o_end);
  }
  template <typename W>
  static void GatedValues(const float* h, const int32_t* idx, const float* x, const W* k2,
                          float* coef, int64_t rows, int64_t width, int64_t s_begin,
                          int64_t s_end) {
    gated_values(h, idx, x, k2, coef, rows, width, s_begin, s_end);
  }
  template <typename W>
  static void ScatterRows(const float* coef, const int32_t* idx, const W* v, float* y,
                          int64_t slots, int64_t rows, int64_t width, int64_t d_begin,
                          int64_t d_end) {
    scatter_rows(coef, idx, v, y, slots, rows, width, d_begin, d_end);
  }
  template <typename W>
  static void GatedAttention(const float* q, const float* p, const int32_t* idx,
                             const W* k_rest, const W* v, float* out, int64_t slots,
                             int64_t rows, int64_t rest, int64_t width) {
    gated_attention(q, p, idx, k_rest, v, out, slots, rows, rest, width);
  }
  template <typename W>
  static void KeyScores(const float* q, int64_t groups, const W* keys, int64_t width,
                        const int32_t* pos, int32_t qpos, int32_t window, float cap,
                        float* scores, int64_t stride, int64_t begin, int64_t end) {
    key_scores(q, groups, keys, width, pos, qpos, window, cap, scores, stride, begin, end);
  }
  template <typename W>
  static int64_t SparkHead(const float* scores, int64_t slots, int64_t top_k,
                           const float* q_rest, const W* k_rest, const W* v,
                           const float* new_k_rest, const float* new_v, int64_t rest,
                           int64_t width, float* out, int32_t* kept, float* weights,
                           float* gates) {
    return spark_head(scores, slots, top_k, q_rest, k_rest, v, new_k_rest, new_v, rest, width,
                      out, kept, weights, gates);
  }
  static void CappedScores(const float* raw, const int32_t* pos, int32_t qpos, int32_t window,
                           float cap, int64_t keys, float* out) {
    capped_scores(raw, pos, qpos, window, cap, keys, out);
  }
  static int64_t SparkSelect(const float* scores, int64_t keys, int64_t top_k, int32_t* kept,
                             float* weights) {
    return spark_select(scores, keys, top_k, kept, weights);
  }
  template <typename W>
  static void SparkScoredBlock(const int32_t* kept, float* weights, float* gates, int64_t begin,
                               int64_t end, const float* q_rest, const W* k_rest, const W* v,
                               int64_t rest, int64_t width, float* out) {
    spark_scored_block(kept, weights, gates, begin, end, q_rest, k_rest, v, rest, width, out);
  }
  template <typename W>
  static void SparkHeadGrad(const int32_t* kept, const float* p, int64_t n, const float* capped,
                            float cap, const float* q_pred, const float* q_rest,
                            const float* d_out, float delta, const W* k_pred, const W* k_rest,
                            const W* v, int64_t pred, int64_t rest, int64_t width,
                            float* dq_pred, float* dq_rest, float* dk_pred, float* dk_rest,
                            float* dv) {
    spark_head_grad(kept, p, n, capped, cap, q_pred, q_rest, d_out, delta, k_pred, k_rest, v,
                    pred, rest, width, dq_pred, dq_rest, dk_pred, dk_rest, dv);
  }
  static int64_t DenseWeights(float* scores, int64_t keys) { return dense_weights(scores, keys); }
  template <typename W>
  static void WeightedValues(const float* weights, int64_t groups, int64_t stride, const W* v,
                             int64_t width, float* partial, int64_t begin, int64_t end) {
    weighted_values(weights, groups, stride, v, width, partial, begin, end);
  }
  // softcap(q . k) of one float32 key (the current token's own).
  static float NewScore(const float* k, const float* q, int64_t width, float cap) {
    const float x = dot(k, q, width);
    return cap > 0.0f ? cap * tanh_lanes(splat(x * (1.0f / cap)))[0] : x;
  }
  template <typename W>
  static void Dots(const W* row, const float* x, int64_t width, const int32_t* token,
                   float* coef, int64_t n, const W* ahead) {
    token_dots(row, x, width, token, coef, n, ahead);
  }
  template <typename W>
  static void GatherAddSlice(const W* v, int64_t stride, int64_t width, const int32_t* neuron,
                             const float* coef, int64_t n, float* out) {
    gather_add_slice(v, stride, width, neuron, coef, n, out);
  }
  template <typename W>
  static void AddRow(float* out, float w, const W* row, int64_t width, const W* ahead) {
    add_scaled(out, w, row, width, ahead);
  }
  // dot_rows and add_rows of n <= 4 rows.
  template <typename W>
  static void DotRows(const W* const* rows, const float* const* qs, int n, int64_t width,
                      float* out, const W* const* ahead, int n_ahead) {
    with_row_count(n, [&](auto count) {
      dot_rows<decltype(count)::value>(rows, qs, width, out, ahead, n_ahead);
    });
  }
  template <typename W>
  static void AddRows(float* out, const float* w, const W* const* rows, int n, int64_t width,
                      const W* const* ahead, int n_ahead) {
    with_row_count(n, [&](auto count) {
      add_rows<decltype(count)::value>(out, w, rows, width, ahead, n_ahead);
    });
  }
  template <typename W>
  static void AddRowsTo(float* const* outs, const float* w, const W* const* rows, int n,
                        int64_t width, const W* const* ahead, int n_ahead) {
    with_row_count(n, [&](auto count) {
      add_rows_to<decltype(count)::value>(outs, w, rows, width, ahead, n_ahead);
    });
  }
  static constexpr int64_t SliceCols() { return kSliceCols; }
  static int64_t SoftThreshold(const float* x, int64_t n, double z, float* theta) {
    return soft_threshold(x, n, z, theta);
  }
  static void GeluInPlace(float* x, int64_t n) { gelu_in_place(x, n); }
  static void AddScaled(float* out, float w, const float* row, int64_t width) {
    add_scaled(out, w, row, width);
  }
};
