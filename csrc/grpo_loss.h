// The fused GRPO loss kernels' plain C++ interface: raw pointers and sizes, no torch types.
//
// grpo_loss_bind.cpp checks torch tensors and fills these structs; grpo_loss_cpu.cpp and
// grpo_loss_cuda.cu implement them, so the CUDA file compiles with nvcc alone (no CUDA torch)
// and the CPU file compiles without torch headers (fast CI builds).
//
// Shapes: N rows (tokens), V = this rank's vocabulary shard; logits and grad rows are
// contiguous with a row stride in elements (>= V). Per-row tensors are contiguous [N].
#pragma once

#include <cstdint>

#include "grpo_loss_math.h"

namespace megatron_r1 {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Unsharded forward: statistics, per-token outputs and, when grad_scale is set, the gradient
// for upstream grad_scale[i] (written to grad, which may alias logits), in one launch.
struct FwdArgs {
  const void* logits;
  int64_t row_stride;
  void* grad;  // nullptr unless grad_scale is set
  int64_t grad_row_stride;
  int64_t n_rows;
  int64_t vocab;
  const int64_t* target;     // valid ids in [0, vocab); others give logp = NaN
  const float* old_logp;     // nullptr: ratio = 1
  const float* ref_logp;     // nullptr: kl = 0
  const float* advantages;
  const float* mask;
  const float* grad_scale;   // nullptr: no gradient in the forward
  float* loss;
  float* logp;
  float* kl;
  bool* clipped;
  float* entropy;
  float* row_max;   // saved for the backward
  float* log_norm;  // saved for the backward
  float* dlogp;     // saved for the backward
  GRPOParams params;
};

// Vocab-parallel phase 1: local statistics of a shard [vocab_start, vocab_start + vocab).
struct StatsArgs {
  const void* logits;
  int64_t row_stride;
  int64_t n_rows;
  int64_t vocab;
  int64_t vocab_start;
  const int64_t* target;  // global ids
  float temperature;
  float* row_max;       // max raw logit of the shard
  float* sum_exp;       // sum exp((x - row_max) / T)
  float* sum_exp_x;     // sum exp((x - row_max) / T) * (x - row_max) / T
  float* target_logit;  // raw target logit if it lies in the shard, else 0
};

// grad[i, j] = coef[i] / T * (onehot(target[i] - vocab_start)[j] - p[i, j]),
// p = exp((x - row_max) / T - log_norm). grad may alias logits.
struct GradArgs {
  const void* logits;
  int64_t row_stride;
  void* grad;
  int64_t grad_row_stride;
  int64_t n_rows;
  int64_t vocab;
  int64_t vocab_start;
  const int64_t* target;
  const float* row_max;
  const float* log_norm;
  const float* coef;
  float temperature;
};

// grad[i, :] *= ratio[i], rows with ratio == 1 untouched (not even read).
struct ScaleArgs {
  void* grad;
  int64_t row_stride;
  int64_t n_rows;
  int64_t vocab;
  const float* ratio;
};

// CPU kernels over the row range [begin, end); the binding parallelises over rows.
void cpu_grpo_fwd(DType dtype, const FwdArgs& a, int64_t begin, int64_t end);
void cpu_grpo_stats(DType dtype, const StatsArgs& a, int64_t begin, int64_t end);
void cpu_grpo_grad(DType dtype, const GradArgs& a, int64_t begin, int64_t end);
void cpu_grpo_scale_rows(DType dtype, const ScaleArgs& a, int64_t begin, int64_t end);

// CUDA launchers (grpo_loss_cuda.cu): enqueue on `stream` (a cudaStream_t), return nullptr on
// success or a static error string.
const char* cuda_grpo_fwd(DType dtype, const FwdArgs& a, void* stream);
const char* cuda_grpo_stats(DType dtype, const StatsArgs& a, void* stream);
const char* cuda_grpo_grad(DType dtype, const GradArgs& a, void* stream);
const char* cuda_grpo_scale_rows(DType dtype, const ScaleArgs& a, void* stream);

// The single-pass plan cuda_grpo_fwd would use for a gradient-writing forward on the current
// device: cluster size (1 = one block per row, 0 = no single-pass plan: streaming kernels)
// and the bytes of row each block keeps in shared memory.
struct FusedPlan {
  int cluster;
  int64_t chunk_bytes;
};
FusedPlan cuda_grpo_fused_plan(DType dtype, int64_t vocab);

}  // namespace megatron_r1
