// CPU (OpenMP) launcher of the step kernel family: each task loads one chunk of a sample into fp32 lanes
// that stay in L1, runs the shared arithmetic (fastdiff/step.cuh) on them and stores the outputs, so
// every tensor crosses memory once. Portable build: the chunk loop is compiled for baseline x86-64,
// x86-64-v3 (AVX2/FMA) and x86-64-v4 (AVX-512) and picked at run time (GCC target_clones), as numpy does.
#include <algorithm>
#include <stdexcept>

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

constexpr int kChunk = 256;  // elements per task: 16 fp32 lanes of 1 KiB, all in L1

template <typename T>
FD_INLINE void load(const void* base, int64_t off, int n, float (&dst)[kChunk]) {
  const T* p = static_cast<const T*>(base) + off;
  for (int j = 0; j < n; ++j) dst[j] = to_float(p[j]);
  for (int j = n; j < kChunk; ++j) dst[j] = 0.0f;
}

template <typename T>
FD_INLINE void store(void* base, int64_t off, int n, const float (&src)[kChunk]) {
  T* p = static_cast<T*>(base) + off;
  for (int j = 0; j < n; ++j) p[j] = from_float<T>(src[j]);
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

template <typename T>
FD_INLINE void step_chunk(const StepParams& p, const StepTerms& t, int64_t n, int64_t i0, int len) {
  float c[kNumCoef];
  const int64_t r = step_row(p, n);
  for (int j = 0; j < kNumCoef; ++j) c[j] = step_coef(p, r, j);

  StepLanes<kChunk> L;
  const int64_t off = n * p.numel + i0;
  if (t.x) load<T>(p.x, off, len, L.x);
  const void* e[2] = {p.e0, p.e1};
  const void* eu[2] = {p.eu0, p.eu1};
  for (int i = 0; i < t.n_e; ++i) {
    load<T>(e[i], off, len, L.e[i]);
    if (t.guided) load<T>(eu[i], off, len, L.eu[i]);
  }
  const void* m[3] = {p.m0, p.m1, p.m2};
  for (int i = 0; i < t.n_m; ++i) load<T>(m[i], off, len, L.m[i]);
  if (t.last) load<T>(p.x_last, off, len, L.last);
  L.offset = t.offset ? p.offset[n] : 0.0f;
  if (t.row) load_table(p.row_table, p.idx[n], p, i0, len, L.row);
  if (t.var) load_table(p.var_table, p.idx[n], p, i0, len, L.var);
  if (p.noise) {
    load<T>(p.noise, off, len, L.z);
  } else if (p.seeds) {
    philox_lanes<kChunk>(uint64_t(p.seeds[n]), i0, uint32_t(p.noise_step), uint32_t(p.noise_stream), L.z);
  }

  float out[kMaxOut][kChunk];
  step_lanes<kChunk>(c, t, L, out);
  void* dst[kMaxOut] = {p.out0, p.out1, p.out2};
  for (int k = 0; k < t.n_out; ++k) store<T>(dst[k], off, len, out[k]);
}

template <typename T>
FD_INLINE void run_chunks(const StepParams& p, int64_t c0, int64_t c1) {
  const StepTerms t = step_terms(p);
  const int64_t per_sample = (p.numel + kChunk - 1) / kChunk;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n = c / per_sample, i0 = (c % per_sample) * kChunk;
    step_chunk<T>(p, t, n, i0, int(std::min<int64_t>(kChunk, p.numel - i0)));
  }
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
