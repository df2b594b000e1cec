// pybind11 bindings of the fused GRPO loss kernels (module megatron_r1._C).
//
// Out-style: the caller (megatron_r1/ops/grpo_loss.py) allocates every output, so tests can
// poison them. Every check names the offending tensor, what was expected and what it got;
// shape and dtype errors raise ValueError / TypeError in Python. CPU work is parallelised over
// rows with at::parallel_for; CUDA work goes to the launchers in grpo_loss_cuda.cu on the
// current stream (compiled in only with MEGATRON_R1_WITH_CUDA).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#ifdef MEGATRON_R1_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "grpo_loss.h"

namespace megatron_r1 {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// torch's Python name of a dtype ("float32", "bfloat16", "int64").
std::string dtype_name(at::ScalarType st) { return std::string(c10::getDtypeNames(st).first); }

std::string describe(const Tensor& t) {
  std::ostringstream os;
  os << dtype_name(t.scalar_type()) << " " << t.sizes() << " on " << t.device();
  if (t.dim() > 0 && !t.is_contiguous()) os << " with strides " << t.strides();
  return os.str();
}

DType dtype_of(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, bfloat16 or float16, got ",
                       describe(t));
  }
  return DType::kFloat32;  // unreachable
}

// [N, V] with contiguous, non-overlapping rows.
void check_matrix(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) >= 1, op, ": ", name,
                    " must be 2-D [N, V] with V >= 1, got ", describe(t));
  TORCH_CHECK_VALUE(t.size(1) == 1 || t.stride(1) == 1, op, ": ", name,
                    " must have contiguous rows (stride(1) == 1), got ", describe(t));
  TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) >= t.size(1), op, ": ", name,
                    " rows must not overlap (stride(0) >= V), got ", describe(t));
}

int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void check_same_matrix(const char* op, const char* name, const Tensor& t, const Tensor& logits) {
  check_matrix(op, name, t);
  TORCH_CHECK_VALUE(t.sizes() == logits.sizes(), op, ": ", name, " must have the shape of logits ",
                    logits.sizes(), ", got ", describe(t));
  TORCH_CHECK_TYPE(t.scalar_type() == logits.scalar_type(), op, ": ", name,
                   " must have the dtype of logits (", dtype_name(logits.scalar_type()), "), got ",
                   describe(t));
  TORCH_CHECK_VALUE(t.device() == logits.device(), op, ": ", name,
                    " must be on the device of logits (", logits.device(), "), got ", describe(t));
  const auto overlap = at::get_overlap_status(t, logits);
  TORCH_CHECK_VALUE(overlap == at::MemOverlapStatus::No ||
                        (overlap == at::MemOverlapStatus::Full && t.strides() == logits.strides()),
                    op, ": ", name, " must either be logits itself (in place) or not overlap it");
}

// A contiguous [N] tensor of `dtype` on `device`.
void check_rows(const char* op, const char* name, const Tensor& t, int64_t n,
                at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [N] = [", n,
                    "], got ", describe(t));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   describe(t));
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, ", got ",
                    describe(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got ", describe(t));
}

template <class T>
const T* opt_ptr(const char* op, const char* name, const OptTensor& t, int64_t n,
                 at::ScalarType dtype, const at::Device& device) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_rows(op, name, *t, n, dtype, device);
  return t->data_ptr<T>();
}

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be finite and > 0, got ", temperature);
}

int64_t grain_for(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

#ifdef MEGATRON_R1_WITH_CUDA
#define GRPO_CUDA_FN(fn) fn
void check_launch(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
}
void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#else
#define GRPO_CUDA_FN(fn) nullptr
#endif

template <class Args, class CpuFn, class CudaFn>
void run(const char* op, const Tensor& logits, DType dtype, const Args& args, int64_t n_rows,
         int64_t vocab, CpuFn cpu_fn, CudaFn cuda_fn) {
  if (n_rows == 0) return;
  if (logits.is_cpu()) {
    at::parallel_for(0, n_rows, grain_for(vocab),
                     [&](int64_t begin, int64_t end) { cpu_fn(dtype, args, begin, end); });
    return;
  }
#ifdef MEGATRON_R1_WITH_CUDA
  if (logits.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logits.device());
    check_launch(op, cuda_fn(dtype, args, current_stream()));
    return;
  }
#else
  (void)cuda_fn;
#endif
  TORCH_CHECK(false, op, ": logits on ", logits.device(),
              " is not supported by this build of megatron_r1._C (CPU",
#ifdef MEGATRON_R1_WITH_CUDA
              " and CUDA",
#endif
              " only)");
}

void grpo_fwd(const Tensor& logits, const Tensor& target, const OptTensor& old_logp,
              const OptTensor& ref_logp, const Tensor& advantages, const Tensor& mask,
              const OptTensor& grad_scale, const OptTensor& grad, const Tensor& loss,
              const Tensor& logp, const Tensor& kl, const Tensor& clipped, const Tensor& entropy,
              const Tensor& row_max, const Tensor& log_norm, const Tensor& dlogp,
              double clip_low, double clip_high, double kl_coef, int64_t kl_estimator,
              double temperature) {
  constexpr const char* op = "grpo_fwd";
  check_matrix(op, "logits", logits);
  const DType dtype = dtype_of(op, "logits", logits);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto dev = logits.device();
  check_temperature(op, temperature);
  TORCH_CHECK_VALUE(kl_estimator >= 0 && kl_estimator <= 2, op,
                    ": kl_estimator must be 0 (k1), 1 (k2) or 2 (k3), got ", kl_estimator);
  // clip_low >= 1 is valid: 1 - clip_low <= 0 never clips a (positive) ratio.
  TORCH_CHECK_VALUE(clip_low >= 0 && clip_high >= 0, op,
                    ": need clip_low >= 0 and clip_high >= 0, got clip_low=", clip_low,
                    " clip_high=", clip_high);
  check_rows(op, "target", target, n, at::kLong, dev);
  check_rows(op, "advantages", advantages, n, at::kFloat, dev);
  check_rows(op, "mask", mask, n, at::kFloat, dev);
  const char* out_names[] = {"loss", "logp", "kl", "entropy", "row_max", "log_norm", "dlogp"};
  const Tensor* outs[] = {&loss, &logp, &kl, &entropy, &row_max, &log_norm, &dlogp};
  for (int k = 0; k < 7; ++k) check_rows(op, out_names[k], *outs[k], n, at::kFloat, dev);
  check_rows(op, "clipped", clipped, n, at::kBool, dev);

  FwdArgs a{};
  a.logits = logits.data_ptr();
  a.row_stride = row_stride(logits);
  a.n_rows = n;
  a.vocab = vocab;
  a.target = target.data_ptr<int64_t>();
  a.old_logp = opt_ptr<float>(op, "old_logp", old_logp, n, at::kFloat, dev);
  a.ref_logp = opt_ptr<float>(op, "ref_logp", ref_logp, n, at::kFloat, dev);
  a.advantages = advantages.data_ptr<float>();
  a.mask = mask.data_ptr<float>();
  a.grad_scale = opt_ptr<float>(op, "grad_scale", grad_scale, n, at::kFloat, dev);
  if (a.grad_scale) {
    TORCH_CHECK_VALUE(grad.has_value() && grad->defined(), op,
                      ": grad must be given (an [N, V] buffer or logits itself) with grad_scale");
    check_same_matrix(op, "grad", *grad, logits);
    a.grad = grad->data_ptr();
    a.grad_row_stride = row_stride(*grad);
  }
  a.loss = loss.data_ptr<float>();
  a.logp = logp.data_ptr<float>();
  a.kl = kl.data_ptr<float>();
  a.clipped = clipped.data_ptr<bool>();
  a.entropy = entropy.data_ptr<float>();
  a.row_max = row_max.data_ptr<float>();
  a.log_norm = log_norm.data_ptr<float>();
  a.dlogp = dlogp.data_ptr<float>();
  a.params = GRPOParams{static_cast<float>(clip_low), static_cast<float>(clip_high),
                        static_cast<float>(kl_coef), static_cast<int>(kl_estimator),
                        static_cast<float>(temperature)};
  run(op, logits, dtype, a, n, vocab, cpu_grpo_fwd, GRPO_CUDA_FN(cuda_grpo_fwd));
}

void grpo_stats(const Tensor& logits, const Tensor& target, const Tensor& row_max,
                const Tensor& sum_exp, const Tensor& sum_exp_x, const Tensor& target_logit,
                double temperature, int64_t vocab_start) {
  constexpr const char* op = "grpo_stats";
  check_matrix(op, "logits", logits);
  const DType dtype = dtype_of(op, "logits", logits);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto dev = logits.device();
  check_temperature(op, temperature);
  TORCH_CHECK_VALUE(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  check_rows(op, "target", target, n, at::kLong, dev);
  check_rows(op, "row_max", row_max, n, at::kFloat, dev);
  check_rows(op, "sum_exp", sum_exp, n, at::kFloat, dev);
  check_rows(op, "sum_exp_x", sum_exp_x, n, at::kFloat, dev);
  check_rows(op, "target_logit", target_logit, n, at::kFloat, dev);
  StatsArgs a{logits.data_ptr(),
              row_stride(logits),
              n,
              vocab,
              vocab_start,
              target.data_ptr<int64_t>(),
              static_cast<float>(temperature),
              row_max.data_ptr<float>(),
              sum_exp.data_ptr<float>(),
              sum_exp_x.data_ptr<float>(),
              target_logit.data_ptr<float>()};
  run(op, logits, dtype, a, n, vocab, cpu_grpo_stats, GRPO_CUDA_FN(cuda_grpo_stats));
}

void grpo_grad(const Tensor& logits, const Tensor& target, const Tensor& row_max,
               const Tensor& log_norm, const Tensor& coef, const Tensor& grad, double temperature,
               int64_t vocab_start) {
  constexpr const char* op = "grpo_grad";
  check_matrix(op, "logits", logits);
  const DType dtype = dtype_of(op, "logits", logits);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto dev = logits.device();
  check_temperature(op, temperature);
  TORCH_CHECK_VALUE(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  check_rows(op, "target", target, n, at::kLong, dev);
  check_rows(op, "row_max", row_max, n, at::kFloat, dev);
  check_rows(op, "log_norm", log_norm, n, at::kFloat, dev);
  check_rows(op, "coef", coef, n, at::kFloat, dev);
  check_same_matrix(op, "grad", grad, logits);
  GradArgs a{logits.data_ptr(),         row_stride(logits),
             grad.data_ptr(),           row_stride(grad),
             n,                         vocab,
             vocab_start,               target.data_ptr<int64_t>(),
             row_max.data_ptr<float>(), log_norm.data_ptr<float>(),
             coef.data_ptr<float>(),    static_cast<float>(temperature)};
  run(op, logits, dtype, a, n, vocab, cpu_grpo_grad, GRPO_CUDA_FN(cuda_grpo_grad));
}

void grpo_scale_rows(const Tensor& grad, const Tensor& ratio) {
  constexpr const char* op = "grpo_scale_rows";
  check_matrix(op, "grad", grad);
  const DType dtype = dtype_of(op, "grad", grad);
  const int64_t n = grad.size(0), vocab = grad.size(1);
  check_rows(op, "ratio", ratio, n, at::kFloat, grad.device());
  ScaleArgs a{grad.data_ptr(), row_stride(grad), n, vocab, ratio.data_ptr<float>()};
  run(op, grad, dtype, a, n, vocab, cpu_grpo_scale_rows, GRPO_CUDA_FN(cuda_grpo_scale_rows));
}

bool has_cuda() {
#ifdef MEGATRON_R1_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// (cluster, chunk_bytes) of the single-pass CUDA plan for this dtype and V; (0, 0) when the
// streaming kernels would run or CUDA is not built.
std::tuple<int64_t, int64_t> cuda_fused_plan(const Tensor& like, int64_t vocab) {
#ifdef MEGATRON_R1_WITH_CUDA
  const c10::cuda::CUDAGuard guard(like.device());
  const FusedPlan p = cuda_grpo_fused_plan(dtype_of("cuda_fused_plan", "like", like), vocab);
  return {p.cluster, p.chunk_bytes};
#else
  (void)like;
  (void)vocab;
  return {0, 0};
#endif
}

}  // namespace
}  // namespace megatron_r1

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace megatron_r1;
  m.doc() = "Fused GRPO loss kernels (csrc/); see megatron_r1/ops/grpo_loss.py";
  m.def("grpo_fwd", &grpo_fwd, "Fused GRPO forward (optionally writing the gradient)",
        py::arg("logits"), py::arg("target"), py::arg("old_logp"), py::arg("ref_logp"),
        py::arg("advantages"), py::arg("mask"), py::arg("grad_scale"), py::arg("grad"),
        py::arg("loss"), py::arg("logp"), py::arg("kl"), py::arg("clipped"), py::arg("entropy"),
        py::arg("row_max"), py::arg("log_norm"), py::arg("dlogp"), py::arg("clip_low"),
        py::arg("clip_high"), py::arg("kl_coef"), py::arg("kl_estimator"),
        py::arg("temperature"));
  m.def("grpo_stats", &grpo_stats, "Per-row statistics of a vocabulary shard",
        py::arg("logits"), py::arg("target"), py::arg("row_max"), py::arg("sum_exp"),
        py::arg("sum_exp_x"), py::arg("target_logit"), py::arg("temperature"),
        py::arg("vocab_start"));
  m.def("grpo_grad", &grpo_grad, "Gradient w.r.t. the logits (may write over them)",
        py::arg("logits"), py::arg("target"), py::arg("row_max"), py::arg("log_norm"),
        py::arg("coef"), py::arg("grad"), py::arg("temperature"), py::arg("vocab_start"));
  m.def("grpo_scale_rows", &grpo_scale_rows, "grad[i] *= ratio[i] where ratio[i] != 1",
        py::arg("grad"), py::arg("ratio"));
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels are compiled in");
  m.def("cuda_fused_plan", &cuda_fused_plan, "Single-pass plan (cluster, chunk bytes)",
        py::arg("like"), py::arg("vocab"));
}
