// CPU (OpenMP) launcher of the step kernel family. Each task takes a chunk of one sample, maps the
// sample's plan row onto linear terms (linear_terms, fastdiff/step.cuh) and works it in blocks of 256
// elements whose sums stay in L1: term by term, x0 += a*v and out_k += c_k*v (products with a zero weight
// skipped: `add_term`), then the clamped x0 term and the stores. Every tensor crosses memory once. In-kernel
// Philox noise is made a block at a time first, in one vectorised loop; given noise with a gathered std
// (DDIM-GMM) is scaled in its block. Portable build: the loops are compiled for baseline x86-64,
// x86-64-v3 (AVX2/FMA) and x86-64-v4 (AVX-512), picked at run time (GCC target_clones), as numpy does;
// each is a plain loop over floats, so that every ISA vectorises it with its own registers.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "fastdiff/step.cuh"

#include "parallel.h"
#include "streaming.h"
#include "target_clones.h"

namespace fastdiff {
namespace cpu {
namespace {

constexpr int kBlock = 256;    // elements worked at a time (their sums stay in L1)
constexpr int kChunk = 4096;   // elements per task
constexpr int64_t kParallelMin = 32768;  // elements below which one thread does the step

// A block's sums: x0 and the outputs, kBlock floats each, term by term. Each term is one loop over the
// block with its weights fixed, so that the choice of sums it enters (its use bits) is made once per term
// and block, not per element, and the loop vectorises for every ISA (target_clones) on its own.

template <typename T>
FD_INLINE float ld(const T* p) { return to_float(*p); }

// Adds term v with weight a in x0 and c[k] in output k, for the sums in the bit set USE (output k: bit k,
// x0: kUseX0), chosen at compile time: no product at all where a weight is 0 (0*inf would be NaN).
template <int USE, int NOUT, typename T>
FD_INLINE void add_term(const T* __restrict v, int len, float a, const float* c, float* __restrict x0,
                        float (*__restrict o)[kBlock]) {
  const float c0 = c[0], c1 = NOUT > 1 ? c[1] : 0.0f, c2 = NOUT > 2 ? c[2] : 0.0f;
  for (int j = 0; j < len; ++j) {
    const float t = ld(v + j);
    if constexpr ((USE & kUseX0) != 0) x0[j] += a * t;
    if constexpr (NOUT > 0 && (USE & 1)) o[0][j] += c0 * t;
    if constexpr (NOUT > 1 && (USE & 2)) o[1][j] += c1 * t;
    if constexpr (NOUT > 2 && (USE & 4)) o[2][j] += c2 * t;
  }
}

template <int NOUT, typename T>
FD_INLINE void add_term(int use, const T* v, int len, float a, const float* c, float* x0, float (*o)[kBlock]) {
  static_assert(kUseX0 == 8, "four use bits");
  switch (use & 15) {
#define FD_USE(U) case U: add_term<U, NOUT>(v, len, a, c, x0, o); break;
    FD_USE(1) FD_USE(2) FD_USE(3) FD_USE(4) FD_USE(5) FD_USE(6) FD_USE(7) FD_USE(8)
    FD_USE(9) FD_USE(10) FD_USE(11) FD_USE(12) FD_USE(13) FD_USE(14) FD_USE(15)
#undef FD_USE
    default: break;
  }
}

// Elements [b, b + len) of the sample: every term, then x0, then the outputs (streaming stores when `nt`:
// put, streaming.h). z: the block's Philox noise (null: none, or given noise read from s.noise).
template <typename T, int NOUT>
FD_INLINE void step_block(const LinearTerms& s, const float* z, T* const* out, int64_t b, int len, bool nt) {
  alignas(64) float x0[kBlock], o[NOUT][kBlock], t[kBlock];
  if (s.x0)
    for (int j = 0; j < len; ++j) x0[j] = 0.0f;
  for (int k = 0; k < NOUT; ++k)
    for (int j = 0; j < len; ++j) o[k][j] = s.base[k];
  for (int q = 0; q < s.n; ++q)
    add_term<NOUT>(s.use[q], static_cast<const T*>(s.p[q]) + b, len, s.a[q], s.c[q], x0, o);
  if (s.delta) add_term<NOUT>(s.delta_use, s.delta + b, len, 0.0f, s.c_delta, x0, o);
  if (z) add_term<NOUT>(s.z_use, z, len, 0.0f, s.c_z, x0, o);
  if (s.z && s.noise) {
    const T* noise = static_cast<const T*>(s.noise) + b;
    if (s.var) {  // DDIM-GMM: given noise times the gathered component's std, sqrt(max(VAR - var, 0))
      for (int j = 0; j < len; ++j) t[j] = ld(noise + j) * sqrtf(component_var(s.var_total, s.var[b + j]));
      add_term<NOUT>(s.z_use, t, len, 0.0f, s.c_z, x0, o);
    } else {
      add_term<NOUT>(s.z_use, noise, len, 0.0f, s.c_z, x0, o);
    }
  }
  if (s.x0) {
    for (int j = 0; j < len; ++j) t[j] = clampf(s.as * x0[j], -s.r, s.r);
    add_term<NOUT>(s.x0_use, t, len, 0.0f, s.c_x0, x0, o);
  }
  for (int k = 0; k < NOUT; ++k) {
    if constexpr (std::is_same_v<T, float>) {
      put(out[k] + b, o[k], size_t(len) * sizeof(T), nt);
    } else {
      alignas(64) T u[kBlock];
      for (int j = 0; j < len; ++j) u[j] = from_float<T>(o[k][j]);
      put(out[k] + b, u, size_t(len) * sizeof(T), nt);
    }
  }
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
  const bool philox = s.z && !s.noise;
  for (int64_t b = i0; b < i1; b += kBlock) {
    const int len = int(std::min<int64_t>(kBlock, i1 - b));
    alignas(64) float z[kBlock];
    if (philox) {  // in-kernel noise first, a block at a time
      philox_lanes<kBlock>(s.seed, b, uint32_t(p.noise_step), uint32_t(p.noise_domain), z);
      scale_by_std<kBlock>(z, s.var ? s.var + b : nullptr, s.var_total, len);
    }
    step_block<T, NOUT>(s, philox ? z : nullptr, out, b, len, nt);
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
  parallel_runs(p.batch * ((p.numel + kChunk - 1) / kChunk), p.batch * p.numel, kParallelMin,
                [&](int64_t c0, int64_t c1) {
                  run(p, c0, c1);
                  return int64_t(0);
                });
}

}  // namespace cpu
}  // namespace fastdiff
