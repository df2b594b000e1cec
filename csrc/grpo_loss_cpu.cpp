// CPU kernels of the fused GRPO loss: plain C++ over row ranges (no torch headers, so this
// file compiles in seconds); grpo_loss_bind.cpp parallelises over rows with at::parallel_for.
//
// Each row is read once for its statistics and, when a gradient is wanted, once more (from
// cache: a row is at most a few hundred KB) while the gradient is written, possibly over the
// logits. Hot loops work on fixed-size float chunks with a branch-free exp2 so the compiler
// vectorises them; on x86-64 they are also compiled for AVX2 and AVX-512, picked at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "grpo_loss.h"

namespace megatron_r1 {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// Dispatch on ISA level (AVX-512, AVX2+FMA, baseline), not on CPU model ("arch=haswell"
// would skip AMD parts).
#define GRPO_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GRPO_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GRPO_CLONES
#endif
#define GRPO_INLINE inline __attribute__((always_inline))

constexpr int kChunk = 256;  // floats per chunk: 1 KB, stays in L1
constexpr int kLanes = 16;   // independent partial sums (vectorisable, fixed summation order)
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

GRPO_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
GRPO_INLINE uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// 2^x for x <= 126, about 2 ulp: round-to-nearest split x = n + f with the 1.5 * 2^23 trick,
// a degree-6 polynomial for 2^f on [-1/2, 1/2] (weighted least squares on Chebyshev nodes),
// times 2^n built from its exponent bits. NaN propagates through the polynomial; x < -126
// gives 0 (the true value is below 1.2e-38).
GRPO_INLINE float exp2_fast(float x) {
  float xc = x < -126.f ? -126.f : x;
  xc = xc > 126.f ? 126.f : xc;
  const float r = xc + 12582912.f;
  const int32_t n = static_cast<int32_t>(bits_from_f32(r)) - 0x4B400000;
  const float f = xc - (r - 12582912.f);
  float p = 1.5337577497120947e-4f;
  p = p * f + 1.3399859890341759e-3f;
  p = p * f + 9.618519805371761e-3f;
  p = p * f + 5.550329014658928e-2f;
  p = p * f + 0.24022646248340607f;
  p = p * f + 0.6931471824645996f;
  p = p * f + 1.0f;
  const float y = p * f32_from_bits(static_cast<uint32_t>(n + 127) << 23);
  return x < -126.f ? 0.f : y;
}

// ---- element types ------------------------------------------------------------------------
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

GRPO_INLINE float load_f32(float v) { return v; }
GRPO_INLINE float load_f32(BF16 v) { return f32_from_bits(static_cast<uint32_t>(v.bits) << 16); }
// IEEE half -> float, branch-free (normal, subnormal, inf, NaN).
GRPO_INLINE float load_f32(F16 v) {
  const uint32_t w = static_cast<uint32_t>(v.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized);
  return f32_from_bits(sign | mag);
}

template <class T>
GRPO_INLINE T store_as(float f);
template <>
GRPO_INLINE float store_as<float>(float f) {
  return f;
}
// float -> bfloat16, round to nearest even, NaN kept NaN.
template <>
GRPO_INLINE BF16 store_as<BF16>(float f) {
  const uint32_t u = bits_from_f32(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BF16{static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};
}
// float -> half, round to nearest even (overflow to inf, subnormals, NaN).
template <>
GRPO_INLINE F16 store_as<F16>(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_from_f32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_from_f32(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return F16{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

template <class T>
GRPO_INLINE void to_f32(const T* __restrict src, float* __restrict dst, int n) {
  for (int j = 0; j < n; ++j) dst[j] = load_f32(src[j]);
}

// ---- hot loops on float chunks (vectorised; AVX2 clones) ----------------------------------
struct Lanes {
  float m;  // running raw max; the lanes below are relative to it
  float s[kLanes];
  float w[kLanes];
  bool nan;
};

GRPO_CLONES void stats_chunk(const float* __restrict x, int n, float c2, Lanes* __restrict st) {
  // chunk max and NaN flag, per lane so that the loop vectorises
  float mx[kLanes];
  int nan[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    mx[l] = -kInf;
    nan[l] = 0;
  }
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      mx[l] = x[j + l] > mx[l] ? x[j + l] : mx[l];
      nan[l] |= x[j + l] != x[j + l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    mx[l] = x[j] > mx[l] ? x[j] : mx[l];
    nan[l] |= x[j] != x[j];
  }
  float cm = -kInf;
  for (int l = 0; l < kLanes; ++l) {
    cm = mx[l] > cm ? mx[l] : cm;
    st->nan |= nan[l] != 0;
  }
  if (cm > st->m) {  // new max: rescale the lanes (no-op while they are empty)
    const float d = (st->m - cm) * c2;
    const float f = exp2_fast(d);
    for (int l = 0; l < kLanes; ++l) {
      st->w[l] = st->s[l] == 0.f ? 0.f : f * (st->w[l] + d * st->s[l]);
      st->s[l] *= f;
    }
    st->m = cm;
  }
  if (st->m == -kInf) return;  // only -inf logits so far
  const float m = st->m;
  float s[kLanes], w[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    s[l] = st->s[l];
    w[l] = st->w[l];
  }
  j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float t = (x[j + l] - m) * c2;
      const float e = exp2_fast(t);
      s[l] += e;
      w[l] += e > 0.f ? e * t : 0.f;  // -inf logits: e = 0, t = -inf
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const float t = (x[j] - m) * c2;
    const float e = exp2_fast(t);
    s[l] += e;
    w[l] += e > 0.f ? e * t : 0.f;
  }
  for (int l = 0; l < kLanes; ++l) {
    st->s[l] = s[l];
    st->w[l] = w[l];
  }
}

// g = c * (0 - p) with p = 2^((x - m) * c2 - log2s); the caller patches the target column.
GRPO_CLONES void grad_chunk(const float* __restrict x, float* __restrict g, int n, float m,
                            float c2, float log2s, float c) {
  for (int j = 0; j < n; ++j) g[j] = -c * exp2_fast((x[j] - m) * c2 - log2s);
}

GRPO_CLONES void scale_chunk(float* __restrict x, int n, float r) {
  for (int j = 0; j < n; ++j) x[j] *= r;
}

// ---- rows ---------------------------------------------------------------------------------
// Statistics of one row in base-2 units (see grpo_loss_math.h).
template <class T>
RowStats row_stats(const T* __restrict x, int64_t V, float c2) {
  Lanes st;
  st.m = -kInf;
  st.nan = false;
  for (int l = 0; l < kLanes; ++l) st.s[l] = st.w[l] = 0.f;
  alignas(64) float buf[kChunk];
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, V - v0));
    to_f32(x + v0, buf, n);
    stats_chunk(buf, n, c2, &st);
  }
  RowStats r{st.m, 0.f, 0.f};
  for (int l = 0; l < kLanes; ++l) {
    r.s += st.s[l];
    r.w += st.w[l];
  }
  if (st.nan) r.s = r.w = kNaN;
  return r;
}

// Writes grad row = c * (onehot(t) - p); x_t is the target logit read before any write
// (grad may alias x). c == 0 writes zeros without reading the row.
template <class T>
void row_grad(const T* x, T* g, int64_t V, int64_t t, float x_t, float m, float c2, float log2s,
              float c) {
  if (c == 0.f) {
    const T zero = store_as<T>(0.f);
    for (int64_t j = 0; j < V; ++j) g[j] = zero;
    return;
  }
  alignas(64) float buf[kChunk];
  alignas(64) float out[kChunk];
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, V - v0));
    to_f32(x + v0, buf, n);
    grad_chunk(buf, out, n, m, c2, log2s, c);
    for (int j = 0; j < n; ++j) g[v0 + j] = store_as<T>(out[j]);
  }
  if (t >= 0 && t < V) g[t] = store_as<T>(c * (1.f - exp2_fast((x_t - m) * c2 - log2s)));
}

inline float opt(const float* p, int64_t i, float fallback) { return p ? p[i] : fallback; }

template <class T>
void fwd_rows(const FwdArgs& a, int64_t begin, int64_t end) {
  const float T_ = a.params.temperature;
  const float c2 = kLog2e / T_, inv_t = 1.f / T_;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  for (int64_t i = begin; i < end; ++i) {
    const T* x = logits + i * a.row_stride;
    const RowStats st = row_stats(x, a.vocab, c2);
    const RowFinal fin = finish_stats(st);
    const int64_t t = a.target[i];
    const bool valid = t >= 0 && t < a.vocab;
    const float x_t = valid ? load_f32(x[t]) : kNaN;
    const float logp = (x_t - st.m) * inv_t - fin.log_norm;
    const float mask = a.mask[i];
    const TokenTerms tt = grpo_token_terms(logp, opt(a.old_logp, i, 0.f), a.old_logp != nullptr,
                                           opt(a.ref_logp, i, 0.f), a.ref_logp != nullptr,
                                           a.advantages[i], mask, a.params);
    a.loss[i] = tt.loss;
    a.logp[i] = logp;
    a.kl[i] = tt.kl;
    a.clipped[i] = tt.clipped;
    a.entropy[i] = fin.entropy;
    a.row_max[i] = st.m;
    a.log_norm[i] = fin.log_norm;
    a.dlogp[i] = tt.dlogp;
    if (a.grad_scale) {
      row_grad(x, grad + i * a.grad_row_stride, a.vocab, valid ? t : -1, x_t, st.m, c2,
               fin.log_norm * kLog2e, a.grad_scale[i] * tt.dlogp * inv_t);
    }
  }
}

template <class T>
void stats_rows(const StatsArgs& a, int64_t begin, int64_t end) {
  const float c2 = kLog2e / a.temperature;
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t i = begin; i < end; ++i) {
    const T* x = logits + i * a.row_stride;
    const RowStats st = row_stats(x, a.vocab, c2);
    const int64_t t = a.target[i] - a.vocab_start;
    a.row_max[i] = st.m;
    a.sum_exp[i] = st.s;
    a.sum_exp_x[i] = st.w * kLn2;
    a.target_logit[i] = (t >= 0 && t < a.vocab) ? load_f32(x[t]) : 0.f;
  }
}

template <class T>
void grad_rows(const GradArgs& a, int64_t begin, int64_t end) {
  const float c2 = kLog2e / a.temperature, inv_t = 1.f / a.temperature;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  for (int64_t i = begin; i < end; ++i) {
    const T* x = logits + i * a.row_stride;
    const int64_t t = a.target[i] - a.vocab_start;
    const bool local = t >= 0 && t < a.vocab;
    const float x_t = local ? load_f32(x[t]) : 0.f;
    row_grad(x, grad + i * a.grad_row_stride, a.vocab, local ? t : -1, x_t, a.row_max[i], c2,
             a.log_norm[i] * kLog2e, a.coef[i] * inv_t);
  }
}

template <class T>
void scale_rows(const ScaleArgs& a, int64_t begin, int64_t end) {
  T* grad = static_cast<T*>(a.grad);
  alignas(64) float buf[kChunk];
  for (int64_t i = begin; i < end; ++i) {
    const float r = a.ratio[i];
    if (r == 1.f) continue;
    T* g = grad + i * a.row_stride;
    for (int64_t v0 = 0; v0 < a.vocab; v0 += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, a.vocab - v0));
      to_f32(g + v0, buf, n);
      scale_chunk(buf, n, r);
      for (int j = 0; j < n; ++j) g[v0 + j] = store_as<T>(buf[j]);
    }
  }
}

}  // namespace

#define GRPO_DISPATCH(dtype, FN, ...)                    \
  switch (dtype) {                                        \
    case DType::kFloat32: return FN<float>(__VA_ARGS__); \
    case DType::kBFloat16: return FN<BF16>(__VA_ARGS__); \
    case DType::kFloat16: return FN<F16>(__VA_ARGS__);   \
  }

void cpu_grpo_fwd(DType dtype, const FwdArgs& a, int64_t begin, int64_t end) {
  GRPO_DISPATCH(dtype, fwd_rows, a, begin, end);
}
void cpu_grpo_stats(DType dtype, const StatsArgs& a, int64_t begin, int64_t end) {
  GRPO_DISPATCH(dtype, stats_rows, a, begin, end);
}
void cpu_grpo_grad(DType dtype, const GradArgs& a, int64_t begin, int64_t end) {
  GRPO_DISPATCH(dtype, grad_rows, a, begin, end);
}
void cpu_grpo_scale_rows(DType dtype, const ScaleArgs& a, int64_t begin, int64_t end) {
  GRPO_DISPATCH(dtype, scale_rows, a, begin, end);
}

}  // namespace megatron_r1
