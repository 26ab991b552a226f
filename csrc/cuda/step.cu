// CUDA launcher of the step kernel family: one thread owns N consecutive elements of one sample (one
// 16-byte vector: 4 fp32 or 8 fp16/bf16). The block's sample is mapped onto linear terms once
// (linear_terms, fastdiff/step.cuh) in shared memory; each thread accumulates its elements through
// registers and stores the outputs. Every branch is uniform across the block, and absent terms cost
// nothing: they are not in the list.
#include <cuda_runtime.h>

#include <algorithm>

#include "device_guard.cuh"
#include "entry.h"
#include "launch.cuh"
#include "fastdiff/step.cuh"

namespace fastdiff {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ FD_INLINE void load(const void* base, int64_t off, int n, bool vec, float (&dst)[N]) {
  const T* p = static_cast<const T*>(base) + off;
  if (vec && n == N) {
    const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
    FD_UNROLL
    for (int j = 0; j < N; ++j) dst[j] = to_float(v.v[j]);
  } else {
    FD_UNROLL
    for (int j = 0; j < N; ++j) dst[j] = j < n ? to_float(p[j]) : 0.0f;
  }
}

template <typename T, int N>
__device__ FD_INLINE void store(void* base, int64_t off, int n, bool vec, const float (&src)[N]) {
  T* p = static_cast<T*>(base) + off;
  if (vec && n == N) {
    Vec<T, N> v;
    FD_UNROLL
    for (int j = 0; j < N; ++j) v.v[j] = from_float<T>(src[j]);
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  } else {
    FD_UNROLL
    for (int j = 0; j < N; ++j)
      if (j < n) p[j] = from_float<T>(src[j]);
  }
}

// grid = (ceil(D / (kThreads*N)), min(B, kMaxGridY)); a block walks samples blockIdx.y, + gridDim.y, ...
// Thread 0 maps the sample's plan row onto linear terms (linear_terms) in shared memory; every thread
// then accumulates its N elements through registers. A zero weight skips its product (uniform branch).
template <typename T, int N, int NOUT>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepParams p, bool vec) {
  __shared__ float c[kNumCoef];
  __shared__ LinearTerms s;
  const int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const int len = i0 < p.numel ? int(min(int64_t(N), p.numel - i0)) : 0;
  for (int64_t n = blockIdx.y; n < p.batch; n += gridDim.y) {
    __syncthreads();  // the previous sample's row and terms are no longer read
    if (threadIdx.x < kNumCoef) c[threadIdx.x] = step_coef(p, step_row(p, n), threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) linear_terms(p, c, n, s);
    __syncthreads();
    if (len == 0) continue;
    float x0[N], o[NOUT][N], v[N];
    FD_UNROLL
    for (int j = 0; j < N; ++j) x0[j] = 0.0f;
    FD_UNROLL
    for (int k = 0; k < NOUT; ++k) {
      FD_UNROLL
      for (int j = 0; j < N; ++j) o[k][j] = s.base[k];
    }
    for (int q = 0; q < s.n; ++q) {  // x0 += a*v, out_k += c_k*v
      load<T, N>(s.p[q], i0, len, vec, v);
      const int use = s.use[q];
      if (use & kUseX0) {
        const float a = s.a[q];
        FD_UNROLL
        for (int j = 0; j < N; ++j) x0[j] += a * v[j];
      }
      FD_UNROLL
      for (int k = 0; k < NOUT; ++k) {
        if (!(use >> k & 1)) continue;
        const float ck = s.c[q][k];
        FD_UNROLL
        for (int j = 0; j < N; ++j) o[k][j] += ck * v[j];
      }
    }
    if (s.delta) {  // fp32 table row: float4 loads when the storage is fp32 too
      load<float, N>(s.delta, i0, len, vec && N == 4, v);
      FD_UNROLL
      for (int k = 0; k < NOUT; ++k) {
        if (!(s.delta_use >> k & 1)) continue;
        FD_UNROLL
        for (int j = 0; j < N; ++j) o[k][j] += s.c_delta[k] * v[j];
      }
    }
    if (s.z) {
      if (s.noise) {
        load<T, N>(s.noise, i0, len, vec, v);
      } else {
        philox_lanes<N>(s.seed, i0, uint32_t(p.noise_step), uint32_t(p.noise_domain), v);
      }
      scale_by_std<N>(v, s.var ? s.var + i0 : nullptr, s.var_total, len);
      FD_UNROLL
      for (int k = 0; k < NOUT; ++k) {
        if (!(s.z_use >> k & 1)) continue;
        FD_UNROLL
        for (int j = 0; j < N; ++j) o[k][j] += s.c_z[k] * v[j];
      }
    }
    if (s.x0) {
      FD_UNROLL
      for (int j = 0; j < N; ++j) x0[j] = clampf(s.as * x0[j], -s.r, s.r);
      FD_UNROLL
      for (int k = 0; k < NOUT; ++k) {
        if (!(s.x0_use >> k & 1)) continue;
        FD_UNROLL
        for (int j = 0; j < N; ++j) o[k][j] += s.c_x0[k] * x0[j];
      }
    }
    const int64_t off = n * p.numel + i0;
    void* dst[kMaxOut] = {p.out0, p.out1, p.out2};
    FD_UNROLL
    for (int k = 0; k < NOUT; ++k) store<T, N>(dst[k], off, len, vec, o[k]);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, int N>
cudaError_t launch(const StepParams& p, cudaStream_t stream) {
  // 16-byte vectors need every sample to start on a vector boundary and every base pointer aligned.
  bool vec = p.numel % N == 0;
  for (const void* q : {p.x, p.e0, p.e1, p.eu0, p.eu1, p.m0, p.m1, p.m2, p.x_last, p.noise,
                        static_cast<const void*>(p.out0), static_cast<const void*>(p.out1),
                        static_cast<const void*>(p.out2), static_cast<const void*>(p.delta_table),
                        static_cast<const void*>(p.var_table)})
    vec = vec && aligned16(q);
  const int64_t blocks_x = (p.numel + int64_t(kThreads) * N - 1) / (int64_t(kThreads) * N);
  if (blocks_x > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(blocks_x), unsigned(std::min<int64_t>(p.batch, kMaxGridY)));
  switch (p.n_out) {
    case 1: step_kernel<T, N, 1><<<grid, kThreads, 0, stream>>>(p, vec); break;
    case 2: step_kernel<T, N, 2><<<grid, kThreads, 0, stream>>>(p, vec); break;
    default: step_kernel<T, N, 3><<<grid, kThreads, 0, stream>>>(p, vec); break;
  }
  return cudaGetLastError();
}

}  // namespace

// Returns a cudaError_t code (0 on success).
int step(const StepParams& p, int device, uintptr_t stream) {
  if (p.batch == 0 || p.numel == 0) return cudaSuccess;
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return guard.error();
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kFloat32: return launch<float, 4>(p, s);
    case kFloat16: return launch<half_t, 8>(p, s);
    case kBFloat16: return launch<bf16_t, 8>(p, s);
    default: return cudaErrorInvalidValue;
  }
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count(int* count) { return cudaGetDeviceCount(count); }

}  // namespace cuda
}  // namespace fastdiff
