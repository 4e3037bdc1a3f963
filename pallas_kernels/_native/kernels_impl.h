// Kernel bodies, compiled once per instruction set: cpu_kernels.cc includes this file inside
// a namespace under a `#pragma GCC target`, so GCC lowers the 16-float vectors below to
// AVX-512, to pairs of AVX2 registers, or to SSE2 for the generic build.
//
// Weights are float32 (`float`) or bfloat16 (`uint16_t`, the high half of a float32);
// activations and accumulators are float32.

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

constexpr int64_t kLanes = 16;

static inline __attribute__((always_inline)) vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

static inline __attribute__((always_inline)) vf load(const uint16_t* p) {
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  vu u = __builtin_convertvector(h, vu) << 16;
  return reinterpret_cast<vf&>(u);
}

static inline __attribute__((always_inline)) float scalar(float w) { return w; }

static inline __attribute__((always_inline)) float scalar(uint16_t w) {
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

static inline __attribute__((always_inline)) float sum_lanes(vf v) {
  // Pairwise, so the order of the additions is fixed whatever the instruction set.
  float s[kLanes];
  __builtin_memcpy(s, &v, sizeof(s));
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  }
  return s[0];
}

// y[r, o] = sum_i x[r, i] * w[o, i] for NO outputs starting at o and NR rows starting at r.
template <int NO, int NR, typename W>
static void linear_tile(const float* x, const W* w, float* y, int64_t in, int64_t out,
                        int64_t o, int64_t r) {
  vf acc[NO][NR];
  for (int j = 0; j < NO; ++j)
    for (int q = 0; q < NR; ++q) acc[j][q] = vf{};
  const int64_t body = in / kLanes * kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    vf wv[NO], xv[NR];
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
                           int64_t out, int64_t o) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) linear_tile<NO, 4>(x, w, y, in, out, o, r);
  switch (rows - r) {
    case 3: linear_tile<NO, 3>(x, w, y, in, out, o, r); break;
    case 2: linear_tile<NO, 2>(x, w, y, in, out, o, r); break;
    case 1: linear_tile<NO, 1>(x, w, y, in, out, o, r); break;
    default: break;
  }
}

// Outputs [o_begin, o_end) of y [rows, out] = x [rows, in] . w [out, in]^T.
template <typename W>
void linear(const float* x, const W* w, float* y, int64_t rows, int64_t in, int64_t out,
            int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) linear_outputs<4>(x, w, y, rows, in, out, o);
  switch (o_end - o) {
    case 3: linear_outputs<3>(x, w, y, rows, in, out, o); break;
    case 2: linear_outputs<2>(x, w, y, rows, in, out, o); break;
    case 1: linear_outputs<1>(x, w, y, rows, in, out, o); break;
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
};
