// CUDA launchers of the Gaussian-mixture kernels (the math: fastdiff/gmm.cuh).
//
// gmm_noise: one thread per Philox group (4 consecutive elements of one sample): its 4 normals
// (philox_normal4), its components (given; per element the group's 4 categorical words; per channel /
// sample the draw's word), then x = mu_k + s_k * z and the drawn ids.
// gmm_score: one block per sample row: K block reductions over D (warp shuffles, then one partial per
// warp in shared memory), the log-sum-exp and responsibilities by one thread, then the score over D.
#include <cuda_runtime.h>

#include <algorithm>

#include "device_guard.cuh"
#include "entry.h"
#include "launch.cuh"
#include "fastdiff/gmm.cuh"

namespace fastdiff {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) gmm_noise_kernel(const GmmNoiseParams p) {
  const int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i0 = 4 * g;
  if (i0 >= p.numel) return;
  const int len = int(min(int64_t(4), p.numel - i0));
  const uint32_t step = uint32_t(p.step);
  for (int64_t n = blockIdx.y; n < p.batch; n += gridDim.y) {
    const uint64_t seed = p.seeds ? uint64_t(p.seeds[n]) : 0;
    float z[4];
    if (p.noise) {
      const T* zin = static_cast<const T*>(p.noise) + n * p.numel + i0;
      FD_UNROLL
      for (int j = 0; j < 4; ++j) z[j] = j < len ? to_float(zin[j]) : 0.0f;
    } else {
      philox_normal4(seed, uint64_t(g), step, kDomainTrain, z);
    }
    int64_t k[4];
    if (p.component_in) {
      FD_UNROLL
      for (int j = 0; j < 4; ++j) {  // ids outside [0, K) read as 0 (the host checks them before the launch)
        const int64_t v = j < len ? p.component_in[n * p.n_draws + (i0 + j) / p.group] : 0;
        k[j] = uint64_t(v) < uint64_t(p.n_comp) ? v : 0;
      }
    } else if (p.group == 1) {  // per element: the group's own 4 words
      uint32_t w[4];
      philox_words(seed, uint64_t(g), step, kDomainCategorical, w);
      FD_UNROLL
      for (int j = 0; j < 4; ++j) {
        k[j] = categorical_index(uniform_open(w[j]), p.cdf, p.n_comp);
        if (j < len) p.component_out[n * p.n_draws + i0 + j] = k[j];
      }
    } else {  // per channel / sample: the draw's word (one draw for all 4 unless a channel starts inside)
      int64_t last = -1;
      FD_UNROLL
      for (int j = 0; j < 4; ++j) {
        const int64_t d = (i0 + j) / p.group;
        if (j < len && d != last) {
          last = d;
          k[j] = draw_component(seed, d, step, p.cdf, p.n_comp);
          if ((i0 + j) % p.group == 0) p.component_out[n * p.n_draws + d] = k[j];
        } else {
          k[j] = k[j > 0 ? j - 1 : 0];
        }
      }
    }
    T* out = static_cast<T*>(p.out) + n * p.numel + i0;
    FD_UNROLL
    for (int j = 0; j < 4; ++j)
      if (j < len) out[j] = from_float<T>(gmm_value(p, k[j], i0 + j, z[j]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gmm_score_kernel(const GmmScoreParams p) {
  extern __shared__ float shared[];
  float* part = shared;                       // [K][kWarps] partial sums
  float* l = shared + p.n_comp * kWarps;      // [K] squared distances -> responsibilities
  const int64_t D = p.numel, K = p.n_comp;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n = blockIdx.x; n < p.batch; n += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + n * D;
    for (int64_t k = 0; k < K; ++k) {
      const float* mu = p.means + k * D;
      const float* iv = p.inv_std + k * D;
      float acc = 0.0f;
      for (int64_t i = threadIdx.x; i < D; i += kThreads) acc += gmm_sq_dist(to_float(x[i]), mu[i], iv[i]);
      FD_UNROLL
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
      if (lane == 0) part[k * kWarps + warp] = acc;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += part[k * kWarps + w];
      l[k] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) p.log_prob[n] = gmm_responsibilities(l, l, p.log_coef, K);
    __syncthreads();
    T* s = static_cast<T*>(p.score) + n * D;
    for (int64_t i = threadIdx.x; i < D; i += kThreads) {
      const float xi = to_float(x[i]);
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += gmm_score_term(l[k], xi, p.means[k * D + i], p.inv_std[k * D + i]);
      s[i] = from_float<T>(acc);
    }
    __syncthreads();  // the next row reuses part and l
  }
}

template <typename T>
cudaError_t launch_noise(const GmmNoiseParams& p, cudaStream_t stream) {
  const int64_t blocks = ((p.numel + 3) / 4 + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(blocks), unsigned(std::min<int64_t>(p.batch, kMaxGridY)));
  gmm_noise_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_score(const GmmScoreParams& p, cudaStream_t stream) {
  const size_t smem = size_t(p.n_comp) * (kWarps + 1) * sizeof(float);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // K > 1365 components
  const unsigned grid = unsigned(std::min<int64_t>(p.batch, kMaxRowBlocks));
  gmm_score_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

// Both return a cudaError_t code (0 on success).
int gmm_noise(const GmmNoiseParams& p, int device, uintptr_t stream) {
  if (p.batch == 0 || p.numel == 0) return cudaSuccess;
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return guard.error();
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kFloat32: return launch_noise<float>(p, s);
    case kFloat16: return launch_noise<half_t>(p, s);
    case kBFloat16: return launch_noise<bf16_t>(p, s);
    default: return cudaErrorInvalidValue;
  }
}

int gmm_score(const GmmScoreParams& p, int device, uintptr_t stream) {
  if (p.batch == 0 || p.numel == 0) return cudaSuccess;
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return guard.error();
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kFloat32: return launch_score<float>(p, s);
    case kFloat16: return launch_score<half_t>(p, s);
    case kBFloat16: return launch_score<bf16_t>(p, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastdiff
