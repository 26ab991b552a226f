// CPU (OpenMP) launcher of the step kernel family. Each task takes a chunk of one sample, maps the
// sample's plan row onto linear terms (linear_terms, fastdiff/step.cuh) and makes one pass over its
// elements, 32 at a time (16 where the outputs stream to memory): their sums (x0, the outputs) stay in
// registers while every term is loaded and added (x0 += a*v, out_k += c_k*v, a product only where the
// weight is not 0), then the clamped x0 term and the stores (streaming stores for outputs too big for
// the cache). Every tensor crosses memory once and nothing is staged in between, given noise scaled by a
// gathered std (DDIM-GMM) included. In-kernel Philox noise is made a block of 256 at a time first
// (philox_block.h: the rounds in AVX2, the normals in vectorised stages), and read as one more term.
// Portable build: the loops are compiled for baseline x86-64, x86-64-v3 (AVX2/FMA) and x86-64-v4
// (AVX-512), picked at run time (GCC target_clones), as numpy does.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "fastdiff/step.cuh"

#include "parallel.h"
#include "philox_block.h"
#include "streaming.h"
#include "target_clones.h"
#include "vec8.h"

namespace fastdiff {
namespace cpu {
namespace {

constexpr int kBlock = kNoiseBlock;  // elements whose Philox noise is made at a time
constexpr int kChunk = 4096;   // elements per task
constexpr int64_t kParallelMin = 32768;  // work below which one thread does the step: elements, ...
constexpr int64_t kNoiseWork = 8;       // ... an element whose Philox noise the step makes counting 8 (~2 ns)

// One pass per element: the sums (x0 and the outputs) of a few elements stay in registers while every
// term is read and added, so each tensor crosses memory once and nothing is staged in between. `V` is
// one float (the tail of a sample) or `f8`, eight floats (vec8.h). Each term's use bits pick its products
// at run time, the same branch for every element of a block (predicted), so a zero weight costs no product.
template <typename V> constexpr int kLanes = sizeof(V) / sizeof(float);

template <typename V, typename T>
FD_INLINE V load(const T* p) {
  if constexpr (std::is_same_v<V, float>) {
    return to_float(*p);
  } else {
    return load8(p);
  }
}

template <typename V>
FD_INLINE V sqrt_lanes(V v) {
  if constexpr (std::is_same_v<V, float>) {
    return sqrtf(v);
  } else {
    return sqrt8(v);
  }
}

template <typename V, typename T>
FD_INLINE void store(T* dst, V v, bool nt) {
  if constexpr (std::is_same_v<V, float>) {
    *dst = from_float<T>(v);
  } else {
    store8(dst, v, nt);
  }
}

// Adds term v (weight a in x0, c[k] in output k) to the sums its use bits name, for U vectors of elements.
template <int U, int NOUT, typename V>
FD_INLINE void add(int use, const V (&v)[U], float a, const float* c, V (&x0)[U], V (&o)[NOUT][U]) {
  if (use & kUseX0)
    for (int u = 0; u < U; ++u) x0[u] += a * v[u];
  for (int k = 0; k < NOUT; ++k)
    if (use & (1 << k))
      for (int u = 0; u < U; ++u) o[k][u] += c[k] * v[u];
}

template <int U, typename V, typename T>
FD_INLINE void load_u(V (&v)[U], const T* p) {
  for (int u = 0; u < U; ++u) v[u] = load<V>(p + u * kLanes<V>);
}

// The U vectors (or floats) of elements from j on, of the block starting at element b of the sample. z: the
// block's in-kernel Philox noise (null: none). Given noise that is not a plain term is scaled here by the
// gathered component's std, sqrt(max(VAR - var, 0)) (DDIM-GMM), so that all its streams are read in the
// one pass.
template <typename V, int U, int NOUT, typename T>
FD_INLINE void step_at(const LinearTerms& s, const float* z, T* const* out, int64_t b, int j, bool nt) {
  const int64_t i = b + j;
  V x0[U], o[NOUT][U], v[U];
  for (int u = 0; u < U; ++u) {
    x0[u] = V{};
    for (int k = 0; k < NOUT; ++k) o[k][u] = x0[u] + s.base[k];
  }
  for (int q = 0; q < s.n; ++q) {
    load_u(v, static_cast<const T*>(s.p[q]) + i);
    add<U, NOUT>(s.use[q], v, s.a[q], s.c[q], x0, o);
  }
  if (s.delta) {
    load_u(v, s.delta + i);
    add<U, NOUT>(s.delta_use, v, 0.0f, s.c_delta, x0, o);
  }
  if (z) {
    load_u(v, z + j);
    add<U, NOUT>(s.z_use, v, 0.0f, s.c_z, x0, o);
  } else if (s.z) {
    load_u(v, static_cast<const T*>(s.noise) + i);
    if (s.var) {  // no std row (a component outside the tables, NaN outputs): the noise as given
      V var[U];
      load_u(var, s.var + i);
      for (int u = 0; u < U; ++u) v[u] *= sqrt_lanes(component_var(s.var_total, var[u]));
    }
    add<U, NOUT>(s.z_use, v, 0.0f, s.c_z, x0, o);
  }
  if (s.x0) {
    for (int u = 0; u < U; ++u) v[u] = clampf(s.as * x0[u], -s.r, s.r);
    add<U, NOUT>(s.x0_use, v, 0.0f, s.c_x0, x0, o);
  }
  for (int k = 0; k < NOUT; ++k)
    for (int u = 0; u < U; ++u) store(out[k] + i + u * kLanes<V>, o[k][u], nt);
}

// Vectors per pass over the terms: U sets of sums in registers. Four where the outputs stay in cache (the
// pass is bound by instructions there: each term's weights, address and use bits are read once per 4 x 8
// elements; 25-35% faster at the SD-latent shape), two where they stream to memory (the wider pass was
// ~10% slower there) or three outputs' sums fill the registers.
constexpr int kUnrollCached = 4, kUnrollStreaming = 2;

// The plain case of one output: no x0, no table row, no noise to make, so every term enters output 0 and
// only there. NT terms known at compile time, no use bits to test, weights and addresses in registers:
// the same sums in the same order as step_at, with ~20% fewer cycles where memory bounds them (Mix-DDPM
// noising, IADB, a flow or Euler step). Returns the elements done (whole vectors of U x 8).
template <int NT, int U, typename T>
FD_INLINE int plain_block(const LinearTerms& s, T* out, int64_t b, int len, bool nt) {
  constexpr int W = U * kLanes<f8>;
  const T* p[NT];
  float c[NT];
  for (int q = 0; q < NT; ++q) {
    p[q] = static_cast<const T*>(s.p[q]) + b;
    c[q] = s.c[q][0];
  }
  const float base = s.base[0];
  int j = 0;
  for (; j + W <= len; j += W) {
    f8 o[U];
    for (int u = 0; u < U; ++u) o[u] = f8{} + base;
    for (int q = 0; q < NT; ++q)
      for (int u = 0; u < U; ++u) o[u] += c[q] * load8(p[q] + j + u * kLanes<f8>);
    for (int u = 0; u < U; ++u) store8(out + b + j + u * kLanes<f8>, o[u], nt);
  }
  return j;
}

// Elements [b, b + len) of the sample: U vectors of eight at a time, then one at a time.
template <typename T, int NOUT, int U>
FD_INLINE void step_block(const LinearTerms& s, const float* z, T* const* out, int64_t b, int len, bool nt) {
  constexpr int W = U * kLanes<f8>;
  int j = 0;
  if (NOUT == 1 && !s.x0 && !s.delta && !s.z && !z) {
    switch (s.n) {
      case 1: j = plain_block<1, U>(s, out[0], b, len, nt); break;
      case 2: j = plain_block<2, U>(s, out[0], b, len, nt); break;
      case 3: j = plain_block<3, U>(s, out[0], b, len, nt); break;
      case 4: j = plain_block<4, U>(s, out[0], b, len, nt); break;
      default: break;
    }
  }
  for (; j + W <= len; j += W) step_at<f8, U, NOUT>(s, z, out, b, j, nt);
  for (; j < len; ++j) step_at<float, 1, NOUT>(s, z, out, b, j, false);
}

// Sample n's linear terms, from its plan row.
FD_INLINE void sample_terms(const StepParams& p, int64_t n, LinearTerms& s) {
  float c[kNumCoef];
  const int64_t r = step_row(p, n);
  for (int j = 0; j < kNumCoef; ++j) c[j] = step_coef(p, r, j);
  linear_terms(p, c, n, s);
}

// Whether a sample's step makes its Philox noise in the kernel (its row draws noise, no tensor is given).
FD_INLINE bool makes_noise(const LinearTerms& s) { return s.z && !s.noise; }

// Elements [i0, i1) of sample n, U vectors a pass.
template <typename T, int NOUT, int U>
FD_INLINE void step_chunk(const StepParams& p, int64_t n, int64_t i0, int64_t i1, bool nt) {
  LinearTerms s;
  sample_terms(p, n, s);
  T* out[kMaxOut] = {static_cast<T*>(p.out0) + n * p.numel, static_cast<T*>(p.out1) + n * p.numel,
                     static_cast<T*>(p.out2) + n * p.numel};
  if (!makes_noise(s)) return step_block<T, NOUT, U>(s, nullptr, out, i0, int(i1 - i0), nt);
  for (int64_t b = i0; b < i1; b += kBlock) {  // in-kernel noise first, a block at a time (vectorised stages)
    const int len = int(std::min<int64_t>(kBlock, i1 - b));
    alignas(64) float z[kBlock];
    philox_block_normals(s.seed, b, uint32_t(p.noise_step), uint32_t(p.noise_domain), z);
    scale_by_std<kBlock>(z, s.var ? s.var + b : nullptr, s.var_total, len);
    step_block<T, NOUT, U>(s, z, out, b, len, nt);
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

// Chunks [c0, c1), U vectors a pass (two for three outputs: their sums fill the registers).
template <typename T, int U>
FD_INLINE void run_chunks(const StepParams& p, int64_t c0, int64_t c1, bool nt) {
  const int64_t per_sample = (p.numel + kChunk - 1) / kChunk;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n = c / per_sample, i0 = (c % per_sample) * kChunk, i1 = std::min(i0 + kChunk, p.numel);
    switch (p.n_out) {
      case 1: step_chunk<T, 1, U>(p, n, i0, i1, nt); break;
      case 2: step_chunk<T, 2, U>(p, n, i0, i1, nt); break;
      default: step_chunk<T, 3, kUnrollStreaming>(p, n, i0, i1, nt); break;
    }
  }
  if (nt) stream_fence();  // streaming stores are weakly ordered: visible before the step returns
}

// Whether the step makes Philox noise, as its first sample's does.
bool makes_noise(const StepParams& p) {
  if (!p.seeds || p.batch == 0) return false;
  LinearTerms s;
  sample_terms(p, 0, s);
  return makes_noise(s);
}

// One function per storage dtype and per where the outputs go (streamed to memory, or kept in cache): each
// pass width is laid out on its own (the streaming pass shared with the wider one ran ~8% slower).
using RunChunks = void (*)(const StepParams&, int64_t, int64_t);
#define FD_RUN_CHUNKS(name, T)                                                                               \
  FD_CLONES void name##_streaming(const StepParams& p, int64_t c0, int64_t c1) {                            \
    run_chunks<T, kUnrollStreaming>(p, c0, c1, true);                                                       \
  }                                                                                                         \
  FD_CLONES void name##_cached(const StepParams& p, int64_t c0, int64_t c1) {                               \
    run_chunks<T, kUnrollCached>(p, c0, c1, false);                                                         \
  }
FD_RUN_CHUNKS(run_chunks_f32, float)
FD_RUN_CHUNKS(run_chunks_f16, half_t)
FD_RUN_CHUNKS(run_chunks_bf16, bf16_t)
#undef FD_RUN_CHUNKS

template <typename T>
RunChunks pick(const StepParams& p, RunChunks streaming, RunChunks cached) {
  return use_streaming_stores<T>(p) ? streaming : cached;
}

}  // namespace

void step(const StepParams& p) {
  if (p.coef == nullptr || p.out0 == nullptr) throw std::invalid_argument("step: coef and out0 are required");
  if (p.n_out < 1 || p.n_out > kMaxOut) throw std::invalid_argument("step: n_out must be 1, 2 or 3");
  RunChunks run = nullptr;
  switch (p.dtype) {
    case kFloat32: run = pick<float>(p, run_chunks_f32_streaming, run_chunks_f32_cached); break;
    case kFloat16: run = pick<half_t>(p, run_chunks_f16_streaming, run_chunks_f16_cached); break;
    case kBFloat16: run = pick<bf16_t>(p, run_chunks_bf16_streaming, run_chunks_bf16_cached); break;
    default: throw std::invalid_argument("step: dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
  const int64_t work = p.batch * p.numel * (makes_noise(p) ? kNoiseWork : 1);
  parallel_runs(p.batch * ((p.numel + kChunk - 1) / kChunk), work, kParallelMin, [&](int64_t c0, int64_t c1) {
    run(p, c0, c1);
    return int64_t(0);
  });
}

}  // namespace cpu
}  // namespace fastdiff
