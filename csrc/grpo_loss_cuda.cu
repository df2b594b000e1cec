// CUDA kernels of the fused GRPO loss, behind the plain C++ launchers of grpo_loss.h (this file
// needs nvcc only, no torch headers).
//
// Kernels (one thread block per row unless said otherwise):
//   fused_fwd_kernel    single pass: the row (or, with a thread-block cluster of C blocks, a
//                       1/C chunk of it per block) is copied into shared memory with cp.async,
//                       reduced, the blocks of a cluster exchange their partial statistics
//                       through distributed shared memory, and each block writes the gradient
//                       of its chunk from shared memory: one read and one write of the logits.
//   stream_fwd_kernel   the same outputs from global memory (any alignment or size); with
//                       grad_scale it reads the row a second time to write the gradient.
//   stats_kernel        vocab-parallel phase 1 (per-row statistics of the shard).
//   grad_kernel         the backward: gradient from saved row statistics (may be in place).
//   scale_rows_kernel   grad[i] *= ratio[i] for rows with ratio != 1 (others return at once).
// Numerics follow grpo_loss_math.h: max of the raw logits first, exp2 of scaled differences
// (ex2.approx: about 2 ulp), float32 accumulation, per-row results independent of the grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "grpo_loss.h"

namespace megatron_r1 {
namespace {

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;     // 16-byte loads in flight per thread in the streaming loops
constexpr int kMaxCluster = 8; // portable cluster size limit
constexpr int64_t kDefaultChunkBytes = 48 * 1024;

// ---- element access ---------------------------------------------------------------------
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
struct Ex2 {
  __device__ __forceinline__ float operator()(float x) const { return ex2(x); }
};

template <class T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
  __device__ static void unpack(const uint4& u, float (&f)[kVec]) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 to_f2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ void from_f2(float2 v, __nv_bfloat162* out) {
  *out = __float22bfloat162_rn(v);
}
__device__ __forceinline__ void from_f2(float2 v, __half2* out) { *out = __float22half2_rn(v); }

// 8 half-precision values per 16 bytes, converted pairwise.
template <class T2>
struct Elem16 {
  static constexpr int kVec = 8;
  __device__ static void unpack(const uint4& u, float (&f)[kVec]) {
    const T2* h = reinterpret_cast<const T2*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 v = to_f2(h[k]);
      f[2 * k] = v.x;
      f[2 * k + 1] = v.y;
    }
  }
  __device__ static uint4 pack(const float (&f)[kVec]) {
    uint4 u;
    T2* h = reinterpret_cast<T2*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) from_f2(make_float2(f[2 * k], f[2 * k + 1]), h + k);
    return u;
  }
};
template <>
struct Elem<__nv_bfloat16> : Elem16<__nv_bfloat162> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Elem<__half> : Elem16<__half2> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};

// ---- online row statistics (grpo_loss_math.h units) --------------------------------------
__device__ __forceinline__ RowStats empty_stats() { return RowStats{-INFINITY, 0.f, 0.f}; }

// Add K logits; one rescale per call when the max grows.
template <int K>
__device__ __forceinline__ void online_add(RowStats& st, const float (&x)[K], float c2) {
  float vm = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vm = fmaxf(vm, x[k]);
  if (vm > st.m) {
    if (st.s != 0.f) {
      const float d = (st.m - vm) * c2;
      const float f = ex2(d);
      st.w = f * (st.w + d * st.s);
      st.s *= f;
    }
    st.m = vm;
  }
  if (st.m == -INFINITY) return;  // only -inf logits so far
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float t = (x[k] - st.m) * c2;
    const float e = ex2(t);
    st.s += e;
    st.w += e > 0.f ? e * t : 0.f;  // -inf logits: e = 0, t = -inf
  }
}

__device__ __forceinline__ RowStats shfl_xor(const RowStats& s, int lane_mask) {
  return RowStats{__shfl_xor_sync(0xffffffffu, s.m, lane_mask),
                  __shfl_xor_sync(0xffffffffu, s.s, lane_mask),
                  __shfl_xor_sync(0xffffffffu, s.w, lane_mask)};
}

__device__ __forceinline__ RowStats warp_reduce(RowStats st, float c2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge_stats(st, shfl_xor(st, off), c2, Ex2{});
  return st;
}

// Block-wide merge; every thread gets the result. `buf` holds kWarps entries; the trailing
// barrier lets the caller reuse it.
__device__ RowStats block_reduce(RowStats st, float c2, RowStats* buf) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  st = warp_reduce(st, c2);
  if (lane == 0) buf[warp] = st;
  __syncthreads();
  st = lane < kWarps ? buf[lane] : empty_stats();
  st = warp_reduce(st, c2);  // every warp reduces the same kWarps values in the same order
  __syncthreads();
  return st;
}

// The per-token terms of a row from its complete statistics, written to the outputs when
// `write`; returns coef / T for the gradient (grad_scale * d loss / d logp / T, or 0).
__device__ float token_outputs(const FwdArgs& a, int64_t row, const RowStats& st, float x_t,
                               bool valid, bool write) {
  const GRPOParams& p = a.params;
  const float inv_t = 1.f / p.temperature;
  const RowFinal fin = finish_stats(st);
  const float logp = valid ? (x_t - st.m) * inv_t - fin.log_norm : NAN;
  const TokenTerms tt = grpo_token_terms(
      logp, a.old_logp ? a.old_logp[row] : 0.f, a.old_logp != nullptr,
      a.ref_logp ? a.ref_logp[row] : 0.f, a.ref_logp != nullptr, a.advantages[row], a.mask[row], p);
  const float coef = a.grad_scale ? a.grad_scale[row] * tt.dlogp * inv_t : 0.f;
  if (!write) return coef;
  a.loss[row] = tt.loss;
  a.logp[row] = logp;
  a.kl[row] = tt.kl;
  a.clipped[row] = tt.clipped;
  a.entropy[row] = fin.entropy;
  a.row_max[row] = st.m;
  a.log_norm[row] = fin.log_norm;
  a.dlogp[row] = tt.dlogp;
  return coef;
}

// ---- streaming row loops (global memory) --------------------------------------------------
// Plain loads (not ld.global.nc): stream_fwd_kernel may later write the gradient over x.
template <class T, bool kAligned>
__device__ RowStats stream_stats(const T* x, int64_t V, float c2, RowStats* buf) {
  using E = Elem<T>;
  RowStats st = empty_stats();
  int64_t scalar_from = 0;
  if (kAligned) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const int64_t nvec = V / E::kVec;
    for (int64_t base = threadIdx.x; base < nvec; base += kThreads * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < nvec) v[u] = xv[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < nvec) {
          float f[E::kVec];
          E::unpack(v[u], f);
          online_add(st, f, c2);
        }
      }
    }
    scalar_from = nvec * E::kVec;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < V; j += kThreads) {
    const float f[1] = {E::load(x[j])};
    online_add(st, f, c2);
  }
  return block_reduce(st, c2, buf);
}

// g[j] = c * (onehot(tl)[j] - p_j), p_j = 2^((x_j - m) * c2 - log2s). g may alias x (each
// element is read and then written by the same thread, so no read-only loads here).
template <class T, bool kAligned>
__device__ void stream_grad(const T* x, T* g, int64_t V, int64_t tl, float m, float c2,
                            float log2s, float c) {
  using E = Elem<T>;
  int64_t scalar_from = 0;
  if (kAligned) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    uint4* gv = reinterpret_cast<uint4*>(g);
    const int64_t nvec = V / E::kVec;
    if (c == 0.f) {
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) gv[i] = make_uint4(0, 0, 0, 0);
    } else {
      for (int64_t base = threadIdx.x; base < nvec; base += kThreads * kUnroll) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + u * kThreads;
          if (i < nvec) v[u] = xv[i];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + u * kThreads;
          if (i < nvec) {
            float f[E::kVec];
            E::unpack(v[u], f);
            const int64_t rel = tl - i * E::kVec;
#pragma unroll
            for (int k = 0; k < E::kVec; ++k) {
              const float oh = rel == k ? 1.f : 0.f;
              f[k] = c * (oh - ex2((f[k] - m) * c2 - log2s));
            }
            gv[i] = E::pack(f);
          }
        }
      }
    }
    scalar_from = nvec * E::kVec;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < V; j += kThreads) {
    const float oh = j == tl ? 1.f : 0.f;
    g[j] = E::store(c == 0.f ? 0.f : c * (oh - ex2((E::load(x[j]) - m) * c2 - log2s)));
  }
}

template <class T, bool kAligned>
__global__ void __launch_bounds__(kThreads) stream_fwd_kernel(FwdArgs a) {
  __shared__ RowStats buf[kWarps];
  __shared__ float s_c;
  using E = Elem<T>;
  const int64_t row = blockIdx.x;
  const float c2 = kLog2e / a.params.temperature;
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
  const RowStats st = stream_stats<T, kAligned>(x, a.vocab, c2, buf);
  const int64_t t = a.target[row];
  const bool valid = t >= 0 && t < a.vocab;
  if (threadIdx.x == 0) {
    const float x_t = valid ? E::load(x[t]) : NAN;
    s_c = token_outputs(a, row, st, x_t, valid, true);
  }
  if (a.grad_scale == nullptr) return;
  __syncthreads();
  T* g = static_cast<T*>(a.grad) + row * a.grad_row_stride;
  stream_grad<T, kAligned>(x, g, a.vocab, valid ? t : -1, st.m, c2, log2f(st.s), s_c);
}

template <class T, bool kAligned>
__global__ void __launch_bounds__(kThreads) stats_kernel(StatsArgs a) {
  __shared__ RowStats buf[kWarps];
  const int64_t row = blockIdx.x;
  const float c2 = kLog2e / a.temperature;
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
  const RowStats st = stream_stats<T, kAligned>(x, a.vocab, c2, buf);
  if (threadIdx.x == 0) {
    const int64_t tl = a.target[row] - a.vocab_start;
    a.row_max[row] = st.m;
    a.sum_exp[row] = st.s;
    a.sum_exp_x[row] = st.w * kLn2;
    a.target_logit[row] = (tl >= 0 && tl < a.vocab) ? Elem<T>::load(x[tl]) : 0.f;
  }
}

template <class T, bool kAligned>
__global__ void __launch_bounds__(kThreads) grad_kernel(GradArgs a) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
  T* g = static_cast<T*>(a.grad) + row * a.grad_row_stride;
  const int64_t tl = a.target[row] - a.vocab_start;
  stream_grad<T, kAligned>(x, g, a.vocab, (tl >= 0 && tl < a.vocab) ? tl : -1, a.row_max[row],
                           kLog2e / a.temperature, a.log_norm[row] * kLog2e,
                           a.coef[row] / a.temperature);
}

template <class T, bool kAligned>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(ScaleArgs a) {
  using E = Elem<T>;
  const int64_t row = blockIdx.x;
  const float r = a.ratio[row];
  if (r == 1.f) return;
  T* g = static_cast<T*>(a.grad) + row * a.row_stride;
  int64_t scalar_from = 0;
  if (kAligned) {
    uint4* gv = reinterpret_cast<uint4*>(g);
    const int64_t nvec = a.vocab / E::kVec;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      float f[E::kVec];
      E::unpack(gv[i], f);
#pragma unroll
      for (int k = 0; k < E::kVec; ++k) f[k] *= r;
      gv[i] = E::pack(f);
    }
    scalar_from = nvec * E::kVec;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < a.vocab; j += kThreads)
    g[j] = E::store(E::load(g[j]) * r);
}

// ---- single-pass kernel ---------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// What each block of a cluster publishes to its peers.
struct ChunkPart {
  float m, s, w;
  float x_t;  // the target logit if it lies in this chunk
  int has_t;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GRPO_HAS_CLUSTERS 1
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Field `k` (32-bit) of the ChunkPart at `local` in the shared memory of cluster block `rank`.
__device__ __forceinline__ uint32_t load_peer_u32(const ChunkPart* local, int k, int rank) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(local)) + 4u * k;
  uint32_t remote, v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("ld.shared::cluster.u32 %0, [%1];\n" : "=r"(v) : "r"(remote) : "memory");
  return v;
}
#else
#define GRPO_HAS_CLUSTERS 0
#endif

// Grid: n_rows * cluster blocks; the `cluster` consecutive blocks of a row form one thread-
// block cluster (kCluster) and block `rank` owns columns [rank * chunk, (rank + 1) * chunk).
// Requires 16-byte aligned rows of logits and grad and chunk % kVec == 0.
template <class T, bool kCluster>
__global__ void __launch_bounds__(kThreads, 2)
    fused_fwd_kernel(FwdArgs a, int cluster, int64_t chunk) {
  using E = Elem<T>;
  constexpr int kVec = E::kVec;
  extern __shared__ uint4 s_row[];
  __shared__ RowStats buf[kWarps];
  __shared__ ChunkPart part;
  __shared__ float s_m, s_log2s, s_c;
#if !GRPO_HAS_CLUSTERS
  if (kCluster) {  // never launched: the host picks clusters only on sm_90+
    __trap();
  }
#endif
  const int rank = kCluster ? static_cast<int>(blockIdx.x % cluster) : 0;
  const int64_t row = blockIdx.x / (kCluster ? cluster : 1);
  const float c2 = kLog2e / a.params.temperature;
  const int64_t v0 = rank * chunk;
  const int64_t n = v0 < a.vocab ? (a.vocab - v0 < chunk ? a.vocab - v0 : chunk) : 0;
  const int64_t nvec = n / kVec;
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride + v0;
  T* s_elem = reinterpret_cast<T*>(s_row);

  // 1. the chunk into shared memory: 16-byte async copies, the last block's tail by hand
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) cp_async16(s_row + i, xv + i);
  for (int64_t j = nvec * kVec + threadIdx.x; j < n; j += kThreads) s_elem[j] = x[j];
  cp_async_wait_all();
  __syncthreads();

  // 2. statistics of the chunk
  RowStats st = empty_stats();
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    float f[kVec];
    E::unpack(s_row[i], f);
    online_add(st, f, c2);
  }
  for (int64_t j = nvec * kVec + threadIdx.x; j < n; j += kThreads) {
    const float f[1] = {E::load(s_elem[j])};
    online_add(st, f, c2);
  }
  st = block_reduce(st, c2, buf);
  const int64_t t = a.target[row];
  const bool valid = t >= 0 && t < a.vocab;
  const int64_t tl = valid ? t - v0 : -1;  // local column of the target (may be outside)
  if (threadIdx.x == 0) {
    const bool has = tl >= 0 && tl < n;
    part = ChunkPart{st.m, st.s, st.w, has ? E::load(s_elem[tl]) : 0.f, has ? 1 : 0};
  }

  // 3. the row's statistics: merge the cluster's parts in rank order (identical in every
  // block), then the per-token outputs (block rank 0 writes them)
  if (kCluster) {
#if GRPO_HAS_CLUSTERS
    cluster_arrive_release();
    cluster_wait();
#endif
  } else {
    __syncthreads();
  }
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    ChunkPart mine = part;
#if GRPO_HAS_CLUSTERS
    if (kCluster && lane < cluster) {  // one peer per lane: the loads go out together
      mine.m = __uint_as_float(load_peer_u32(&part, 0, lane));
      mine.s = __uint_as_float(load_peer_u32(&part, 1, lane));
      mine.w = __uint_as_float(load_peer_u32(&part, 2, lane));
      mine.x_t = __uint_as_float(load_peer_u32(&part, 3, lane));
      mine.has_t = static_cast<int>(load_peer_u32(&part, 4, lane));
    }
#endif
    RowStats tot = empty_stats();
    float x_t = NAN;
    const int parts = kCluster ? cluster : 1;
    for (int r = 0; r < parts; ++r) {
      const RowStats pr{__shfl_sync(0xffffffffu, mine.m, r), __shfl_sync(0xffffffffu, mine.s, r),
                        __shfl_sync(0xffffffffu, mine.w, r)};
      const float xr = __shfl_sync(0xffffffffu, mine.x_t, r);
      const int hr = __shfl_sync(0xffffffffu, mine.has_t, r);
      tot = merge_stats(tot, pr, c2, Ex2{});
      if (hr) x_t = xr;
    }
    if (lane == 0) {  // peers compute the same values but leave the outputs to rank 0
      s_c = token_outputs(a, row, tot, x_t, valid, rank == 0);
      s_m = tot.m;
      s_log2s = log2f(tot.s);
    }
  }
#if GRPO_HAS_CLUSTERS
  if (kCluster) cluster_arrive_relaxed();  // done reading the peers' shared memory
#endif
  __syncthreads();

  // 4. the gradient of the chunk, from shared memory
  const float m = s_m, log2s = s_log2s, c = s_c;
  T* g = static_cast<T*>(a.grad) + row * a.grad_row_stride + v0;
  uint4* gv = reinterpret_cast<uint4*>(g);
  if (c == 0.f) {
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) gv[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      float f[kVec];
      E::unpack(s_row[i], f);
      const int64_t rel = tl - i * kVec;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float oh = rel == k ? 1.f : 0.f;
        f[k] = c * (oh - ex2((f[k] - m) * c2 - log2s));
      }
      gv[i] = E::pack(f);
    }
  }
  for (int64_t j = nvec * kVec + threadIdx.x; j < n; j += kThreads) {
    const float oh = j == tl ? 1.f : 0.f;
    g[j] = E::store(c == 0.f ? 0.f : c * (oh - ex2((E::load(s_elem[j]) - m) * c2 - log2s)));
  }
#if GRPO_HAS_CLUSTERS
  if (kCluster) cluster_wait();  // no block leaves while a peer may still read its `part`
#endif
}

// ---- host side ------------------------------------------------------------------------------
int elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

bool aligned16(const void* p, int64_t row_stride, int esize) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (row_stride * esize) % 16 == 0;
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <template <class, bool> class Launch, class Args>
const char* dispatch(DType dtype, bool aligned, const Args& a, int64_t n_rows,
                     cudaStream_t stream) {
  if (n_rows <= 0) return nullptr;
  if (n_rows > INT32_MAX) return "more rows than one launch supports (2^31 - 1)";
  const dim3 grid(static_cast<unsigned>(n_rows)), block(kThreads);
#define GRPO_LAUNCH(T)                                                        \
  if (aligned)                                                                \
    Launch<T, true>::kernel<<<grid, block, 0, stream>>>(a);                    \
  else                                                                        \
    Launch<T, false>::kernel<<<grid, block, 0, stream>>>(a);
  switch (dtype) {
    case DType::kFloat32: GRPO_LAUNCH(float) break;
    case DType::kBFloat16: GRPO_LAUNCH(__nv_bfloat16) break;
    case DType::kFloat16: GRPO_LAUNCH(__half) break;
  }
#undef GRPO_LAUNCH
  return last_error();
}

template <class T, bool A>
struct StreamFwd {
  static constexpr auto kernel = stream_fwd_kernel<T, A>;
};
template <class T, bool A>
struct Stats {
  static constexpr auto kernel = stats_kernel<T, A>;
};
template <class T, bool A>
struct Grad {
  static constexpr auto kernel = grad_kernel<T, A>;
};
template <class T, bool A>
struct Scale {
  static constexpr auto kernel = scale_rows_kernel<T, A>;
};

// Bytes of a row each block should hold at most (MEGATRON_R1_GRPO_CHUNK_KB, a tuning knob for
// benchmarks/bench_grpo_loss.py; read on every call so a benchmark can sweep it).
int64_t target_chunk_bytes() {
  const char* env = std::getenv("MEGATRON_R1_GRPO_CHUNK_KB");
  if (env == nullptr || *env == '\0') return kDefaultChunkBytes;
  const long kb = std::strtol(env, nullptr, 10);
  return kb > 0 ? static_cast<int64_t>(kb) * 1024 : kDefaultChunkBytes;
}

template <class T>
void* fused_kernel_ptr(bool cluster) {
  return cluster ? reinterpret_cast<void*>(fused_fwd_kernel<T, true>)
                 : reinterpret_cast<void*>(fused_fwd_kernel<T, false>);
}
void* fused_kernel_for(DType dtype, bool cluster) {
  switch (dtype) {
    case DType::kFloat32: return fused_kernel_ptr<float>(cluster);
    case DType::kBFloat16: return fused_kernel_ptr<__nv_bfloat16>(cluster);
    case DType::kFloat16: return fused_kernel_ptr<__half>(cluster);
  }
  return nullptr;
}

struct DeviceInfo {
  int major = 0;
  int64_t smem_optin = 0;   // dynamic + static shared memory one block may use
};

DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  int v = 0;
  cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  info.smem_optin = v;
  // Allow the fused kernels the opt-in limit once; each launch passes its own size.
  for (DType d : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
    for (bool cl : {false, true}) {
      if (cl && info.major < 9) continue;
      cudaFuncSetAttribute(fused_kernel_for(d, cl), cudaFuncAttributeMaxDynamicSharedMemorySize,
                           v - 1024);
    }
  cudaGetLastError();
  cache[device] = info;
  return info;
}

// Whether a cluster of `c` blocks with `smem` bytes each can be resident at all.
bool cluster_fits(DType dtype, int c, int64_t smem) {
  if (c == 1) return true;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(c);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = c;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  const cudaError_t e = cudaOccupancyMaxActiveClusters(&clusters, fused_kernel_for(dtype, true),
                                                       &cfg);
  cudaGetLastError();
  return e == cudaSuccess && clusters > 0;
}

}  // namespace

FusedPlan cuda_grpo_fused_plan(DType dtype, int64_t vocab) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return FusedPlan{0, 0};
  }
  const DeviceInfo info = device_info(device);
  const int esize = elem_size(dtype), vec = 16 / esize;
  const int max_cluster = info.major >= 9 ? kMaxCluster : 1;
  const int64_t limit = info.smem_optin - 1024;  // room for the kernel's static shared memory
  const int64_t target = target_chunk_bytes();
  auto chunk_bytes = [&](int c) {
    const int64_t per = (vocab + c - 1) / c;
    return ((per + vec - 1) / vec) * vec * esize;
  };
  // The smallest cluster whose chunk is under the target; failing that, the largest chunk
  // count (smallest chunk) that fits in shared memory at all.
  for (int c = 1; c <= max_cluster; c *= 2)
    if (chunk_bytes(c) <= target && cluster_fits(dtype, c, chunk_bytes(c)))
      return FusedPlan{c, chunk_bytes(c)};
  for (int c = max_cluster; c >= 1; c /= 2)
    if (chunk_bytes(c) <= limit && cluster_fits(dtype, c, chunk_bytes(c)))
      return FusedPlan{c, chunk_bytes(c)};
  return FusedPlan{0, 0};
}

const char* cuda_grpo_fwd(DType dtype, const FwdArgs& a, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int esize = elem_size(dtype);
  const bool aligned = aligned16(a.logits, a.row_stride, esize) &&
                       (a.grad_scale == nullptr || aligned16(a.grad, a.grad_row_stride, esize));
  if (a.grad_scale != nullptr && aligned) {
    const FusedPlan plan = cuda_grpo_fused_plan(dtype, a.vocab);
    if (plan.cluster > 0 && a.n_rows * plan.cluster <= INT32_MAX) {
      const int64_t chunk = plan.chunk_bytes / esize;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(static_cast<unsigned>(a.n_rows * plan.cluster));
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = static_cast<size_t>(plan.chunk_bytes);
      cfg.stream = stream;
      cudaLaunchAttribute attr;
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = plan.cluster;
      attr.val.clusterDim.y = 1;
      attr.val.clusterDim.z = 1;
      cfg.attrs = &attr;
      cfg.numAttrs = plan.cluster > 1 ? 1 : 0;
      const bool cl = plan.cluster > 1;
      cudaError_t e = cudaSuccess;
      switch (dtype) {
        case DType::kFloat32:
          e = cl ? cudaLaunchKernelEx(&cfg, fused_fwd_kernel<float, true>, a, plan.cluster, chunk)
                 : cudaLaunchKernelEx(&cfg, fused_fwd_kernel<float, false>, a, 1, chunk);
          break;
        case DType::kBFloat16:
          e = cl ? cudaLaunchKernelEx(&cfg, fused_fwd_kernel<__nv_bfloat16, true>, a,
                                      plan.cluster, chunk)
                 : cudaLaunchKernelEx(&cfg, fused_fwd_kernel<__nv_bfloat16, false>, a, 1, chunk);
          break;
        case DType::kFloat16:
          e = cl ? cudaLaunchKernelEx(&cfg, fused_fwd_kernel<__half, true>, a, plan.cluster, chunk)
                 : cudaLaunchKernelEx(&cfg, fused_fwd_kernel<__half, false>, a, 1, chunk);
          break;
      }
      return e == cudaSuccess ? last_error() : cudaGetErrorString(e);
    }
  }
  return dispatch<StreamFwd>(dtype, aligned, a, a.n_rows, stream);
}

const char* cuda_grpo_stats(DType dtype, const StatsArgs& a, void* stream) {
  return dispatch<Stats>(dtype, aligned16(a.logits, a.row_stride, elem_size(dtype)), a, a.n_rows,
                         static_cast<cudaStream_t>(stream));
}

const char* cuda_grpo_grad(DType dtype, const GradArgs& a, void* stream) {
  const int esize = elem_size(dtype);
  const bool aligned =
      aligned16(a.logits, a.row_stride, esize) && aligned16(a.grad, a.grad_row_stride, esize);
  return dispatch<Grad>(dtype, aligned, a, a.n_rows, static_cast<cudaStream_t>(stream));
}

const char* cuda_grpo_scale_rows(DType dtype, const ScaleArgs& a, void* stream) {
  return dispatch<Scale>(dtype, aligned16(a.grad, a.row_stride, elem_size(dtype)), a, a.n_rows,
                         static_cast<cudaStream_t>(stream));
}

}  // namespace megatron_r1
