// Per-token GRPO math shared by the CPU (grpo_loss_cpu.cpp) and CUDA (grpo_loss_cuda.cu) kernels.
//
// The executable spec is megatron_r1/ops/grpo_loss_reference.py; this header restates its
// per-token part (ratio, clipping, KL estimators, d loss / d logp) and the row statistics in
// float32 so both kernels compute them with the same operations in the same order.
//
// Row statistics are kept in "raw max" form: m = max_j x_j over the *unscaled* logits and
// s = sum_j exp((x_j - m) / T). Subtracting the max before scaling by 1/T keeps logp exact
// for large logits (x = 1e4: scaling first would round x/T to ulp(1e4) ~ 1e-3).
// Exponentials are evaluated as exp2((x - m) * log2(e) / T); w accumulates e * t in those
// base-2 units t = (x - m) * log2(e) / T and is converted once per row.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GRPO_HD __host__ __device__ __forceinline__
#else
#define GRPO_HD inline
#endif

namespace megatron_r1 {

// Same order as megatron_r1/ops/grpo_loss_reference.py KL_ESTIMATORS.
enum KLEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2 };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct GRPOParams {
  float clip_low;
  float clip_high;
  float kl_coef;
  int kl_estimator;
  float temperature;
};

struct TokenTerms {
  float loss;   // mask * (kl_coef * kl - surr)
  float kl;     // the chosen estimator; 0 where mask == 0
  float dlogp;  // d loss / d logp (mask included)
  bool clipped; // the clipped branch is strictly the smaller one (its gradient is 0)
};

// The GRPO terms of one token. Inactive tokens (mask == 0) return exact zeros without
// touching their inputs, so padding may hold anything (NaN old log-probs, target -100).
GRPO_HD TokenTerms grpo_token_terms(float logp, float old_logp, bool has_old, float ref_logp,
                                    bool has_ref, float adv, float mask, const GRPOParams& p) {
  TokenTerms t{0.f, 0.f, 0.f, false};
  if (mask == 0.f) return t;
  const float ratio = has_old ? expf(logp - old_logp) : 1.f;
  const float surr1 = ratio * adv;
  const float lo = 1.f - p.clip_low, hi = 1.f + p.clip_high;
  const float clipped_ratio = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const float surr2 = clipped_ratio * adv;
  // min(surr1, surr2) picks surr2 only when it is strictly smaller: A > 0 and ratio > 1 + hi,
  // or A < 0 and ratio < 1 - lo. At a tie both branches have the same value and slope.
  t.clipped = surr2 < surr1;
  const float surr = t.clipped ? surr2 : surr1;
  float kl = 0.f, dkl = 0.f;
  if (has_ref) {
    const float d = ref_logp - logp;
    if (p.kl_estimator == kK1) {
      kl = -d;
      dkl = 1.f;
    } else if (p.kl_estimator == kK2) {
      kl = 0.5f * d * d;
      dkl = -d;
    } else {
      const float em1 = expm1f(d);  // exp(d) - 1 without cancellation for small d
      kl = em1 - d;
      dkl = -em1;
    }
  }
  t.kl = kl;
  t.loss = mask * (p.kl_coef * kl - surr);
  t.dlogp = mask * (p.kl_coef * dkl - (t.clipped ? 0.f : surr1));
  return t;
}

// Online softmax statistics of a set of logits, see the header comment for the units.
struct RowStats {
  float m;  // max raw logit (-inf when empty)
  float s;  // sum exp((x - m) / T)
  float w;  // sum exp((x - m) / T) * (x - m) * log2(e) / T
};

// Merge two partial statistics; c2 = log2(e) / T. Empty parts (s == 0) contribute nothing,
// which also keeps -inf logits from producing -inf * 0 = NaN.
template <class Exp2>
GRPO_HD RowStats merge_stats(const RowStats& a, const RowStats& b, float c2, Exp2 exp2_fn) {
  if (a.s == 0.f) return b;
  if (b.s == 0.f) return a;
  const float m = a.m > b.m ? a.m : b.m;
  const float da = (a.m - m) * c2, db = (b.m - m) * c2;
  const float fa = exp2_fn(da), fb = exp2_fn(db);
  return RowStats{m, a.s * fa + b.s * fb, fa * (a.w + da * a.s) + fb * (b.w + db * b.s)};
}

// Row outputs from complete statistics.
struct RowFinal {
  float log_norm;  // ln s: logsumexp(x / T) = m / T + log_norm
  float entropy;   // -sum p ln p
};

GRPO_HD RowFinal finish_stats(const RowStats& st) {
  const float log2s = log2f(st.s);
  return RowFinal{log2s * kLn2, kLn2 * (log2s - st.w / st.s)};
}

}  // namespace megatron_r1
