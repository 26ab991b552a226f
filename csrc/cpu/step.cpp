// CPU (OpenMP) launcher of the step kernel family: each task loads one chunk of a sample into fp32 lanes
// that stay in L1, runs the shared arithmetic (fastdiff/step.cuh) on them and stores the outputs, so
// every tensor crosses memory once. Portable build: the chunk loop is compiled for baseline x86-64,
// x86-64-v3 (AVX2/FMA) and x86-64-v4 (AVX-512) and picked at run time (GCC target_clones), as numpy does.
#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "fastdiff/step.cuh"

#if defined(FASTDIFF_WITH_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define FD_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FD_CLONES
#endif

namespace fastdiff {
namespace cpu {
namespace {

constexpr int kChunk = 256;  // elements per task: six fp32 lane arrays of 1 KiB, all in L1

// Full chunks take fixed-length loops (inlined, vectorised); only a sample's last chunk is partial.
template <typename T>
FD_INLINE void load(const void* base, int64_t off, int n, float (&dst)[kChunk]) {
  const T* __restrict__ p = static_cast<const T*>(base) + off;
  if (n == kChunk) {
    for (int j = 0; j < kChunk; ++j) dst[j] = to_float(p[j]);
  } else {
    for (int j = 0; j < n; ++j) dst[j] = to_float(p[j]);
    for (int j = n; j < kChunk; ++j) dst[j] = 0.0f;
  }
}

template <typename T>
FD_INLINE void store(void* base, int64_t off, int n, const float (&src)[kChunk]) {
  T* __restrict__ p = static_cast<T*>(base) + off;
  if (n == kChunk) {
    for (int j = 0; j < kChunk; ++j) p[j] = from_float<T>(src[j]);
  } else {
    for (int j = 0; j < n; ++j) p[j] = from_float<T>(src[j]);
  }
}

// One table row (row_table or var_table) of component k = idx[n]; NaN for an index outside the table.
FD_INLINE void load_table(const float* table, int64_t k, const StepParams& p, int64_t i0, int n,
                          float (&dst)[kChunk]) {
  if (k < 0 || k >= p.table_rows) {
    for (int j = 0; j < kChunk; ++j) dst[j] = NAN;
    return;
  }
  load<float>(table, k * p.numel + i0, n, dst);
}

// The loads step_lanes asks for, for chunk [i0, i0 + len) of sample n. A struct, not a lambda, so that
// it inlines into each target clone and vectorises for that ISA. A full fp32 chunk is read in place.
template <typename T>
struct ChunkLoader {
  const StepParams& p;
  int64_t n, i0;
  int len;

  FD_INLINE const float* operator()(int in, float (&buf)[kChunk]) const {
    const void* src = nullptr;
    switch (in) {
      case kInX: src = p.x; break;
      case kInE0: src = p.e0; break;
      case kInE1: src = p.e1; break;
      case kInEU0: src = p.eu0; break;
      case kInEU1: src = p.eu1; break;
      case kInM0: src = p.m0; break;
      case kInM1: src = p.m1; break;
      case kInM2: src = p.m2; break;
      case kInLast: src = p.x_last; break;
      case kInRow:
      case kInVar:
        load_table(in == kInRow ? p.row_table : p.var_table, p.idx[n], p, i0, len, buf);
        return buf;
      default:
        if (p.noise) {
          src = p.noise;
          break;
        }
        philox_lanes<kChunk>(uint64_t(p.seeds[n]), i0, uint32_t(p.noise_step), uint32_t(p.noise_stream), buf);
        return buf;
    }
    const int64_t off = n * p.numel + i0;
    if (std::is_same<T, float>::value && len == kChunk) return static_cast<const float*>(src) + off;
    load<T>(src, off, len, buf);
    return buf;
  }
};

template <typename T, int NOUT>
FD_INLINE void step_chunk(const StepParams& p, const StepTerms& t, const float* c, int64_t n, int64_t i0, int len) {
  ChunkLoader<T> loader{p, n, i0, len};
  float out[kMaxOut][kChunk];
  step_lanes<kChunk, NOUT>(c, t, t.offset ? p.offset[n] : 0.0f, loader, out);
  void* dst[kMaxOut] = {p.out0, p.out1, p.out2};
  for (int k = 0; k < NOUT; ++k) store<T>(dst[k], n * p.numel + i0, len, out[k]);
}

template <typename T, int NOUT>
FD_INLINE void run_chunks(const StepParams& p, int64_t c0, int64_t c1) {
  const StepTerms t = step_terms(p);
  const int64_t per_sample = (p.numel + kChunk - 1) / kChunk;
  float coef[kNumCoef];
  int64_t coef_n = -1;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n = c / per_sample, i0 = (c % per_sample) * kChunk;
    if (n != coef_n) {  // the sample's plan row, read once per sample
      const int64_t r = step_row(p, n);
      for (int j = 0; j < kNumCoef; ++j) coef[j] = step_coef(p, r, j);
      coef_n = n;
    }
    step_chunk<T, NOUT>(p, t, coef, n, i0, int(std::min<int64_t>(kChunk, p.numel - i0)));
  }
}

template <typename T>
FD_INLINE void run_chunks_any(const StepParams& p, int64_t c0, int64_t c1) {
  switch (p.n_out) {
    case 1: return run_chunks<T, 1>(p, c0, c1);
    case 2: return run_chunks<T, 2>(p, c0, c1);
    default: return run_chunks<T, 3>(p, c0, c1);
  }
}

FD_CLONES void run_chunks_f32(const StepParams& p, int64_t c0, int64_t c1) { run_chunks_any<float>(p, c0, c1); }
FD_CLONES void run_chunks_f16(const StepParams& p, int64_t c0, int64_t c1) { run_chunks_any<half_t>(p, c0, c1); }
FD_CLONES void run_chunks_bf16(const StepParams& p, int64_t c0, int64_t c1) { run_chunks_any<bf16_t>(p, c0, c1); }

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
  // Threads only pay off past a few hundred KiB; below that one thread is faster than waking a team.
  const int threads = total < 64 ? 1 : std::min<int64_t>(omp_get_max_threads(), total);
#pragma omp parallel num_threads(threads)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    run(p, total * tid / nt, total * (tid + 1) / nt);
  }
#else
  run(p, 0, total);
#endif
}

}  // namespace cpu
}  // namespace fastdiff
