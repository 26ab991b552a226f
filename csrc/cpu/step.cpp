// CPU (OpenMP) launcher of the step kernel family. Each task takes a chunk of one sample, maps the
// sample's plan row onto linear terms (linear_terms, fastdiff/step.cuh) and makes one pass over the
// chunk, 16 elements at a time in vector registers: x0 += a*v, out_k += c_k*v (products with a zero
// weight skipped: `accumulate`), then clamp and store. Every tensor crosses memory once. In-kernel Philox
// noise is made a block of 256 at a time first, in one vectorised loop; given noise with a gathered std
// (DDIM-GMM) is scaled in the main loop, so that all its streams are read together, as one loop reads them.
// Portable build: the loops are compiled for baseline x86-64, x86-64-v3 (AVX2/FMA) and x86-64-v4
// (AVX-512), picked at run time (GCC target_clones), as numpy does.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "fastdiff/step.cuh"

#if defined(FASTDIFF_WITH_OPENMP)
#include <omp.h>
#endif

#include "streaming.h"
#include "target_clones.h"

namespace fastdiff {
namespace cpu {
namespace {

constexpr int kW = 16;         // elements per vector: one AVX-512 register (two AVX2 ones)
constexpr int kBlock = 256;    // noise is drawn this many elements at a time
constexpr int kChunk = 4096;   // elements per task
constexpr int64_t kParallelMin = 32768;  // elements below which one thread does the step

typedef float vfloat __attribute__((vector_size(kW * sizeof(float))));
// The weighted sums of one term value v, for the sums in the bit set USE (output k: bit k, x0: kUseX0),
// chosen at compile time: straight-line multiply-adds, and no product at all where a weight is 0 (0*inf
// would be NaN). `accumulate(use, ...)` picks the instance with one switch per term and vector.
template <int USE, typename V, int NOUT>
FD_INLINE void accumulate(V v, float a, const float* c, V& x0, V (&o)[NOUT]) {
  if constexpr ((USE & kUseX0) != 0) x0 += a * v;
  if constexpr (NOUT > 0 && (USE & 1)) o[0] += c[0] * v;
  if constexpr (NOUT > 1 && (USE & 2)) o[1] += c[1] * v;
  if constexpr (NOUT > 2 && (USE & 4)) o[2] += c[2] * v;
}

template <typename V, int NOUT>
FD_INLINE void accumulate(int use, V v, float a, const float* c, V& x0, V (&o)[NOUT]) {
  static_assert(kUseX0 == 8, "four use bits");
  switch (use & 15) {
#define FD_USE(U) case U: accumulate<U>(v, a, c, x0, o); break;
    FD_USE(1) FD_USE(2) FD_USE(3) FD_USE(4) FD_USE(5) FD_USE(6) FD_USE(7) FD_USE(8)
    FD_USE(9) FD_USE(10) FD_USE(11) FD_USE(12) FD_USE(13) FD_USE(14) FD_USE(15)
#undef FD_USE
    default: break;
  }
}

// Loads and stores of one element (float) or one vector (vfloat), converting the storage dtype.
template <typename T>
FD_INLINE float ld(const T* p, float) { return to_float(*p); }
template <typename T>
FD_INLINE vfloat ld(const T* p, vfloat) {
  float t[kW];
  for (int j = 0; j < kW; ++j) t[j] = to_float(p[j]);
  vfloat v;
  std::memcpy(&v, t, sizeof v);
  return v;
}
template <typename T>
FD_INLINE void st(T* p, float v) { *p = from_float<T>(v); }
template <typename T>
FD_INLINE void st(T* p, vfloat v) {
  float t[kW];
  std::memcpy(t, &v, sizeof v);
  for (int j = 0; j < kW; ++j) p[j] = from_float<T>(t[j]);
}

// Streaming store of a vector to 16-byte aligned p (streaming.h).
template <typename T>
FD_INLINE void st_stream(T* p, vfloat v) {
  T t[kW];
  st(t, v);
  put(p, t, sizeof t, true);
}

// Given noise times the gathered component's std, sqrt(max(VAR - var, 0)) (DDIM-GMM), at element j: one
// element or one vector (the square roots lane by lane, branch-free, so that they vectorise). No std row
// (a component outside the tables, whose outputs are NaN): the noise as given.
template <typename T>
FD_INLINE float scaled_noise(const LinearTerms& s, int64_t j, float) {
  const float z = ld(static_cast<const T*>(s.noise) + j, 0.0f);
  return s.var ? z * sqrtf(component_var(s.var_total, s.var[j])) : z;
}
template <typename T>
FD_INLINE vfloat scaled_noise(const LinearTerms& s, int64_t j, vfloat) {
  if (!s.var) return ld(static_cast<const T*>(s.noise) + j, vfloat{});
  float t[kW];
  const vfloat v = component_var(s.var_total, ld(s.var + j, vfloat{}));
  std::memcpy(t, &v, sizeof t);
  for (int i = 0; i < kW; ++i) t[i] = __builtin_sqrtf(t[i]);
  vfloat std;
  std::memcpy(&std, t, sizeof std);
  return ld(static_cast<const T*>(s.noise) + j, vfloat{}) * std;
}

// Element (V = float) or vector (V = vfloat) j of the sample: every term, then x0, then the outputs.
// z: this block's Philox noise, indexed by j - zj. NT: streaming stores (vectors only).
template <typename V, typename T, int NOUT, bool NT = false>
FD_INLINE void step_at(const LinearTerms& s, const float* z, int64_t zj, T* const* out, int64_t j) {
  V x0{}, o[NOUT];
  for (int k = 0; k < NOUT; ++k) o[k] = V{} + s.base[k];
  for (int q = 0; q < s.n; ++q)
    accumulate(s.use[q], ld(static_cast<const T*>(s.p[q]) + j, V{}), s.a[q], s.c[q], x0, o);
  if (s.delta) accumulate(s.delta_use, ld(s.delta + j, V{}), 0.0f, s.c_delta, x0, o);
  if (z) accumulate(s.z_use, ld(z + (j - zj), V{}), 0.0f, s.c_z, x0, o);
  if (s.z && s.noise) accumulate(s.z_use, scaled_noise<T>(s, j, V{}), 0.0f, s.c_z, x0, o);
  if (s.x0) accumulate(s.x0_use, clampf(s.as * x0, -s.r, s.r), 0.0f, s.c_x0, x0, o);
  for (int k = 0; k < NOUT; ++k) {
    if constexpr (NT) {
      st_stream(out[k] + j, o[k]);
    } else {
      st(out[k] + j, o[k]);
    }
  }
}

template <typename T, int NOUT>
FD_INLINE void step_range(const LinearTerms& s, const float* z, int64_t zj, T* const* out, int64_t j0,
                            int64_t j1, bool nt) {
  int64_t j = j0;
  if (nt) {
    for (; j + kW <= j1; j += kW) step_at<vfloat, T, NOUT, true>(s, z, zj, out, j);
  } else {
    for (; j + kW <= j1; j += kW) step_at<vfloat, T, NOUT>(s, z, zj, out, j);
  }
  for (; j < j1; ++j) step_at<float, T, NOUT>(s, z, zj, out, j);
}

// Elements [i0, i1) of sample n.
template <typename T, int NOUT>
FD_INLINE void step_chunk(const StepParams& p, int64_t n, int64_t i0, int64_t i1, bool nt) {
  float c[kNumCoef];
  const int64_t r = step_row(p, n);
  for (int j = 0; j < kNumCoef; ++j) c[j] = step_coef(p, r, j);
  LinearTerms s;
  linear_terms(p, c, n, s);
  T* out[kMaxOut] = {static_cast<T*>(p.out0) + n * p.numel, static_cast<T*>(p.out1) + n * p.numel,
                     static_cast<T*>(p.out2) + n * p.numel};
  if (!s.z || s.noise) return step_range<T, NOUT>(s, nullptr, 0, out, i0, i1, nt);
  for (int64_t b = i0; b < i1; b += kBlock) {  // Philox noise first, a block at a time
    const int len = int(std::min<int64_t>(kBlock, i1 - b));
    float z[kBlock];
    philox_lanes<kBlock>(s.seed, b, uint32_t(p.noise_step), uint32_t(p.noise_domain), z);
    scale_by_std<kBlock>(z, s.var ? s.var + b : nullptr, s.var_total, len);
    step_range<T, NOUT>(s, z, b, out, b, b + len, nt);
  }
}

// Streaming stores pay off when the outputs cannot stay in cache anyway, and need each sample's output
// to start 16-byte aligned; an output that is also an input is written where it was just read.
template <typename T>
bool use_streaming_stores(const StepParams& p) {
  const void* outs[kMaxOut] = {p.out0, p.out1, p.out2};
  const void* ins[] = {p.x, p.e0, p.e1, p.eu0, p.eu1, p.m0, p.m1, p.m2, p.x_last, p.noise};
  if (p.batch * p.numel * int64_t(sizeof(T)) * p.n_out < (int64_t(16) << 20)) return false;
  if ((p.numel * sizeof(T)) % 16 != 0) return false;
  for (int k = 0; k < p.n_out; ++k) {
    if (reinterpret_cast<uintptr_t>(outs[k]) % 16 != 0) return false;
    for (const void* in : ins)
      if (in == outs[k]) return false;
  }
  return true;
}

template <typename T>
FD_INLINE void run_chunks(const StepParams& p, int64_t c0, int64_t c1) {
  const int64_t per_sample = (p.numel + kChunk - 1) / kChunk;
  const bool nt = use_streaming_stores<T>(p);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n = c / per_sample, i0 = (c % per_sample) * kChunk, i1 = std::min(i0 + kChunk, p.numel);
    switch (p.n_out) {
      case 1: step_chunk<T, 1>(p, n, i0, i1, nt); break;
      case 2: step_chunk<T, 2>(p, n, i0, i1, nt); break;
      default: step_chunk<T, 3>(p, n, i0, i1, nt); break;
    }
  }
  if (nt) stream_fence();  // streaming stores are weakly ordered: visible before the step returns
}

FD_CLONES void run_chunks_f32(const StepParams& p, int64_t c0, int64_t c1) { run_chunks<float>(p, c0, c1); }
FD_CLONES void run_chunks_f16(const StepParams& p, int64_t c0, int64_t c1) { run_chunks<half_t>(p, c0, c1); }
FD_CLONES void run_chunks_bf16(const StepParams& p, int64_t c0, int64_t c1) { run_chunks<bf16_t>(p, c0, c1); }

}  // namespace

void step(const StepParams& p) {
  if (p.coef == nullptr || p.out0 == nullptr) throw std::invalid_argument("step: coef and out0 are required");
  if (p.n_out < 1 || p.n_out > kMaxOut) throw std::invalid_argument("step: n_out must be 1, 2 or 3");
  void (*run)(const StepParams&, int64_t, int64_t) = nullptr;
  switch (p.dtype) {
    case kFloat32: run = run_chunks_f32; break;
    case kFloat16: run = run_chunks_f16; break;
    case kBFloat16: run = run_chunks_bf16; break;
    default: throw std::invalid_argument("step: dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
  const int64_t total = p.batch * ((p.numel + kChunk - 1) / kChunk);
  if (total == 0) return;
#if defined(FASTDIFF_WITH_OPENMP)
  // One task per thread at least. A step of a few hundred KiB is faster on this thread than waking a
  // team (and a team of one still costs an OpenMP region), so small steps run here directly.
  const int threads = int(std::min<int64_t>(omp_get_max_threads(), total));
  if (threads > 1 && p.batch * p.numel >= kParallelMin) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      run(p, total * tid / nt, total * (tid + 1) / nt);
    }
    return;
  }
#endif
  run(p, 0, total);
}

}  // namespace cpu
}  // namespace fastdiff
