// CUDA launcher of the step kernel family: one thread owns N consecutive elements of one sample (one
// 16-byte vector: 4 fp32 or 8 fp16/bf16), loads them, runs the shared arithmetic (fastdiff/step.cuh) and
// stores the outputs. The plan row of the block's sample is staged in shared memory. Term flags are
// uniform across the grid, so an absent term costs a predicted branch and no load.
#include <cuda_runtime.h>

#include <algorithm>

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

template <int N>
__device__ FD_INLINE void load_table(const float* table, int64_t k, const StepParams& p, int64_t i0, int n,
                                     bool vec, float (&dst)[N]) {
  if (k < 0 || k >= p.table_rows) {  // NaN, not a silent clamp (see step_row)
    FD_UNROLL
    for (int j = 0; j < N; ++j) dst[j] = NAN;
    return;
  }
  load<float, N>(table, k * p.numel + i0, n, vec && N == 4, dst);  // float4 when fp32
}

// grid = (ceil(D / (kThreads*N)), min(B, 65535)); a block walks samples blockIdx.y, + gridDim.y, ...
template <typename T, int N, int NOUT>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepParams p, const StepTerms t, bool vec) {
  __shared__ float c[kNumCoef];
  const int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const int len = i0 < p.numel ? int(min(int64_t(N), p.numel - i0)) : 0;
  for (int64_t n = blockIdx.y; n < p.batch; n += gridDim.y) {
    __syncthreads();  // the previous sample's row is no longer read
    if (threadIdx.x < kNumCoef) c[threadIdx.x] = step_coef(p, step_row(p, n), threadIdx.x);
    __syncthreads();
    if (len == 0) continue;
    const int64_t off = n * p.numel + i0;
    const void* inputs[] = {p.x, p.e0, p.e1, p.eu0, p.eu1, p.m0, p.m1, p.m2, p.x_last};
    auto load_input = [&](int in, float(&dst)[N]) -> const float* {  // the loads step_lanes asks for
      if (in <= kInLast) {
        load<T, N>(inputs[in], off, len, vec, dst);
      } else if (in == kInRow || in == kInVar) {
        load_table<N>(in == kInRow ? p.row_table : p.var_table, p.idx[n], p, i0, len, vec, dst);
      } else if (p.noise) {
        load<T, N>(p.noise, off, len, vec, dst);
      } else {
        philox_lanes<N>(uint64_t(p.seeds[n]), i0, uint32_t(p.noise_step), uint32_t(p.noise_stream), dst);
      }
      return dst;
    };
    float out[kMaxOut][N];
    step_lanes<N, NOUT>(c, t, t.offset ? p.offset[n] : 0.0f, load_input, out);
    store<T, N>(p.out0, off, len, vec, out[0]);
    if (NOUT > 1) store<T, N>(p.out1, off, len, vec, out[1]);
    if (NOUT > 2) store<T, N>(p.out2, off, len, vec, out[2]);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, int N>
cudaError_t launch(const StepParams& p, cudaStream_t stream) {
  const StepTerms t = step_terms(p);
  // 16-byte vectors need every sample to start on a vector boundary and every base pointer aligned.
  bool vec = p.numel % N == 0;
  for (const void* q : {p.x, p.e0, p.e1, p.eu0, p.eu1, p.m0, p.m1, p.m2, p.x_last, p.noise,
                        static_cast<const void*>(p.out0), static_cast<const void*>(p.out1),
                        static_cast<const void*>(p.out2), static_cast<const void*>(p.row_table),
                        static_cast<const void*>(p.var_table)})
    vec = vec && aligned16(q);
  const int64_t blocks_x = (p.numel + int64_t(kThreads) * N - 1) / (int64_t(kThreads) * N);
  if (blocks_x > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(blocks_x), unsigned(std::min<int64_t>(p.batch, 65535)));
  switch (p.n_out) {
    case 1: step_kernel<T, N, 1><<<grid, kThreads, 0, stream>>>(p, t, vec); break;
    case 2: step_kernel<T, N, 2><<<grid, kThreads, 0, stream>>>(p, t, vec); break;
    default: step_kernel<T, N, 3><<<grid, kThreads, 0, stream>>>(p, t, vec); break;
  }
  return cudaGetLastError();
}

}  // namespace

// Returns a cudaError_t code (0 on success).
int step(const StepParams& p, int device, uintptr_t stream) {
  if (p.batch == 0 || p.numel == 0) return cudaSuccess;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
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
