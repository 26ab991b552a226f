// CPU (OpenMP) launchers of the Gaussian-mixture kernels (the math: fastdiff/gmm.cuh).
//
// gmm_noise: tasks of 4096 elements of one sample (per element in chunk-major order, so that the [K, D]
// tables' columns of a chunk are read from memory once for all samples), worked 256 at a time: the
// block's components (given, or drawn: per element from the Philox words of the block's 64 groups,
// philox_block.h; per channel / sample once per draw), its normals (philox_block_normals), then
// x = mu_k + s_k * z and the ids in one pass, which also reads the given draws (ids, normals).
// gmm_score: one sample row per task: K reductions over D in 16 lanes, the stable log-sum-exp, then the
// weighted score accumulated over components in a row buffer; every row is independent of the batch.
// Portable build: the loops are compiled for baseline x86-64, x86-64-v3 and x86-64-v4 (GCC target_clones).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastdiff/gmm.cuh"
#include "fastdiff/step.cuh"

#include "parallel.h"
#include "philox_block.h"
#include "streaming.h"
#include "target_clones.h"

namespace fastdiff {
namespace cpu {
namespace {

constexpr int kBlock = kNoiseBlock;      // elements drawn at a time
constexpr int64_t kChunk = 4096;         // elements per gmm_noise task
constexpr int64_t kParallelMin = 32768;  // work (elements x components) below which one thread runs
constexpr int kLanes = 16;               // reduction lanes of gmm_score
constexpr int64_t kStreamMin = int64_t(16) << 20;  // output bytes from which stores bypass the caches

// The component uniforms of elements [b, b + kBlock) of a sample (b a multiple of 4): the Philox words of
// their groups in DOMAIN_CATEGORICAL (philox_block_words).
FD_INLINE void uniform_lanes(uint64_t seed, int64_t b, uint32_t step, float (&u)[kBlock]) {
  PhiloxBlock w;
  philox_block_words(seed, b, step, kDomainCategorical, w);
  for (int g = 0; g < kNoiseGroups; ++g) {
    u[4 * g] = uniform_open(w.c0[g]);
    u[4 * g + 1] = uniform_open(w.c1[g]);
    u[4 * g + 2] = uniform_open(w.c2[g]);
    u[4 * g + 3] = uniform_open(w.c3[g]);
  }
}

// out[j] = mu[k_j, b + j] + s[k_j, b + j] * z[j] for a block: the gathers specialised on whether the tables
// hold rows (ROW: [K, D], `means` and `stds` then point at column b) or one value per component ([K, 1]);
// 32-bit offsets (K * D < 2^31, checked), so that a vector gather takes 8 or 16 of them at once. ONE: the
// block has one component, whose rows `means` and `stds` point at: straight loads, no gathers.
// Given draws are read here, in the same loop as the tables, so that every stream is in flight together:
// z in the storage dtype (Z = T; Philox normals: Z = float), and per-element ids as int64 (KI = int64_t:
// each checked, one outside [0, K) read as 0 and counted in `bad`, for the caller to raise; drawn ones:
// KI = int32_t).
template <typename T, bool ONE, bool MROW, bool SROW, typename KI, typename Z>
FD_INLINE void affine_block(const float* __restrict means, int32_t md, const float* __restrict stds, int32_t sd,
                            const KI* __restrict k, int32_t K, const Z* __restrict z, int len, T* __restrict out,
                            int64_t& bad) {
  int64_t outside = 0;
  for (int j = 0; j < len; ++j) {
    int32_t kj = 0;
    if constexpr (!ONE && sizeof(KI) == 8) {
      const uint64_t v = uint64_t(k[j]);
      const int32_t in = v < uint64_t(K);
      outside += 1 - in;
      kj = int32_t(v) & -in;  // branch-free, so that the loop vectorises
    } else if constexpr (!ONE) {
      kj = k[j];
    }
    const float mu = means[kj * md + (MROW ? j : 0)];
    const float s = stds[kj * sd + (SROW ? j : 0)];
    out[j] = from_float<T>(gmm_affine(mu, s, to_float(z[j])));
  }
  bad += outside;
}

template <typename T, bool ONE, typename KI, typename Z>
FD_INLINE void affine_any(bool mrow, bool srow, const float* means, int32_t md, const float* stds, int32_t sd,
                          const KI* k, int32_t K, const Z* z, int len, T* out, int64_t& bad) {
  if (mrow && srow) {
    affine_block<T, ONE, true, true>(means, md, stds, sd, k, K, z, len, out, bad);
  } else if (mrow) {
    affine_block<T, ONE, true, false>(means, md, stds, sd, k, K, z, len, out, bad);
  } else if (srow) {
    affine_block<T, ONE, false, true>(means, md, stds, sd, k, K, z, len, out, bad);
  } else {
    affine_block<T, ONE, false, false>(means, md, stds, sd, k, K, z, len, out, bad);
  }
}

// The block's values with its normals z (given, in the storage dtype, or drawn): one component (`one`,
// k_one), per-element ids given (`ids`), or the drawn / filled ids k.
template <typename T, typename Z>
FD_INLINE void affine_with(bool one, int32_t k_one, const int64_t* ids, const int32_t* k, bool mrow, bool srow,
                           const float* mu, int32_t md, const float* sd, int32_t sdd, int32_t K, const Z* z, int len,
                           T* x, int64_t& bad) {
  if (one) {
    affine_any<T, true>(mrow, srow, mu + k_one * md, md, sd + k_one * sdd, sdd, k, K, z, len, x, bad);
  } else if (ids) {
    affine_any<T, false>(mrow, srow, mu, md, sd, sdd, ids, K, z, len, x, bad);
  } else {
    affine_any<T, false>(mrow, srow, mu, md, sd, sdd, k, K, z, len, x, bad);
  }
}

// Elements [i0, i1) of sample n. Returns the number of given ids outside [0, K) (read as 0 here: the caller
// raises, so the check costs no pass of its own over the ids). nt: streaming stores.
template <typename T>
FD_INLINE int64_t noise_chunk(const GmmNoiseParams& p, int64_t n, int64_t i0, int64_t i1, bool nt) {
  const uint64_t seed = p.seeds ? uint64_t(p.seeds[n]) : 0;
  const uint32_t step = uint32_t(p.step);
  const int64_t group = p.group, K = p.n_comp;
  const int64_t* ids_in = p.component_in ? p.component_in + n * p.n_draws : nullptr;
  int64_t* ids_out = p.component_out ? p.component_out + n * p.n_draws : nullptr;
  T* out = static_cast<T*>(p.out) + n * p.numel;
  int64_t bad = 0;
  const auto given = [&](int64_t v) -> int32_t {  // a given id, checked
    const bool outside = uint64_t(v) >= uint64_t(K);
    bad += outside;
    return outside ? 0 : int32_t(v);
  };
  int64_t draw = i0 / group, at = i0 % group;  // the draw of the current element, and its place in the draw
  int32_t k_draw = ids_in ? given(ids_in[draw]) : int32_t(draw_component(seed, draw, step, p.cdf, K));
  for (int64_t b = i0; b < i1; b += kBlock) {
    const int len = int(std::min<int64_t>(kBlock, i1 - b));
    int32_t k[kBlock];
    bool uniform = false;  // the whole block is one draw's: its table rows are read straight
    const int64_t* ids = nullptr;  // per-element ids given: checked as the values are made
    if (group == 1 && ids_in) {
      ids = ids_in + b;
    } else if (group == 1) {  // per element: inverse CDF of the block's uniforms, threshold by threshold
      float u[kBlock];
      uniform_lanes(seed, b, step, u);
      for (int j = 0; j < kBlock; ++j) k[j] = 0;
      for (int64_t c = 0; c + 1 < K; ++c) {
        const float t = p.cdf[c];
        for (int j = 0; j < kBlock; ++j) k[j] += u[j] >= t ? 1 : 0;
      }
      int64_t drawn[kBlock];
      for (int j = 0; j < kBlock; ++j) drawn[j] = k[j];
      put(ids_out + b, drawn, len * sizeof(int64_t), nt);
    } else {  // per channel / sample: a new draw every `group` elements, filled run by run
      int runs = 0;
      for (int j = 0; j < len; ++runs) {
        if (at == group) {
          at = 0;
          ++draw;
          k_draw = ids_in ? given(ids_in[draw]) : int32_t(draw_component(seed, draw, step, p.cdf, K));
        }
        if (at == 0 && !ids_in) ids_out[draw] = k_draw;
        const int run = int(std::min<int64_t>(len - j, group - at));
        if (run < len)  // a block of one draw reads no ids (`uniform`)
          for (int r = 0; r < run; ++r) k[j + r] = k_draw;
        j += run;
        at += run;
      }
      uniform = runs == 1;
    }
    const bool mrow = p.means_d != 1, srow = p.stds_d != 1;
    const float* mu = p.means + (mrow ? b : 0);
    const float* sd = p.stds + (srow ? b : 0);
    const int32_t md = int32_t(p.means_d), sdd = int32_t(p.stds_d), kk = int32_t(K);
    T x[kBlock];
    if (p.noise) {
      const T* z = static_cast<const T*>(p.noise) + n * p.numel + b;
      affine_with(uniform, k_draw, ids, k, mrow, srow, mu, md, sd, sdd, kk, z, len, x, bad);
    } else {
      float z[kBlock];
      philox_block_normals(seed, b, step, kDomainTrain, z);
      affine_with(uniform, k_draw, ids, k, mrow, srow, mu, md, sd, sdd, kk, z, len, x, bad);
    }
    put(out + b, x, len * sizeof(T), nt);
  }
  return bad;
}

template <typename T>
FD_INLINE int64_t noise_tasks(const GmmNoiseParams& p, int64_t t0, int64_t t1) {
  const bool nt = p.batch * p.numel * int64_t(sizeof(T) + (p.component_out ? 8 : 0)) >= kStreamMin;
  int64_t bad = 0;
  // Per element, chunk-major: a chunk's columns of the [K, D] tables, gathered element by element, serve every
  // sample from cache. Per channel / sample (one table row a block) sample-major: long sequential streams
  // (per channel at 16x4x256x256, K = 8, given draws: 0.9x torch.compile chunk-major, 1.0-1.3x sample-major).
  const bool by_chunk = p.group == 1;
  const int64_t per_sample = (p.numel + kChunk - 1) / kChunk;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = by_chunk ? t % p.batch : t / per_sample;
    const int64_t i0 = (by_chunk ? t / p.batch : t % per_sample) * kChunk;
    bad += noise_chunk<T>(p, n, i0, std::min(i0 + kChunk, p.numel), nt);
  }
  if (nt) stream_fence();
  return bad;
}

FD_CLONES int64_t noise_f32(const GmmNoiseParams& p, int64_t t0, int64_t t1) { return noise_tasks<float>(p, t0, t1); }
FD_CLONES int64_t noise_f16(const GmmNoiseParams& p, int64_t t0, int64_t t1) { return noise_tasks<half_t>(p, t0, t1); }
FD_CLONES int64_t noise_bf16(const GmmNoiseParams& p, int64_t t0, int64_t t1) {
  return noise_tasks<bf16_t>(p, t0, t1);
}

// sum_i ((x_i - mu_i) * inv_s_i)^2 over one row, in kLanes partial sums (vector registers).
FD_INLINE float sq_dist_row(const float* x, const float* mu, const float* inv_s, int64_t D) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += gmm_sq_dist(x[i + j], mu[i + j], inv_s[i + j]);
  for (int j = 0; i + j < D; ++j) acc[j] += gmm_sq_dist(x[i + j], mu[i + j], inv_s[i + j]);
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// Row n: log-densities, responsibilities (in l), log p and the score.
template <typename T>
FD_INLINE void score_row(const GmmScoreParams& p, int64_t n, float* xf, float* sf, float* l) {
  const int64_t D = p.numel, K = p.n_comp;
  const T* x = static_cast<const T*>(p.x) + n * D;
  for (int64_t i = 0; i < D; ++i) xf[i] = to_float(x[i]);
  for (int64_t k = 0; k < K; ++k) l[k] = sq_dist_row(xf, p.means + k * D, p.inv_std + k * D, D);
  p.log_prob[n] = gmm_responsibilities(l, l, p.log_coef, K);
  std::fill(sf, sf + D, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float r = l[k];
    if (r == 0.0f) continue;  // an underflowed responsibility adds exactly 0
    const float* mu = p.means + k * D;
    const float* iv = p.inv_std + k * D;
    for (int64_t i = 0; i < D; ++i) sf[i] += gmm_score_term(r, xf[i], mu[i], iv[i]);
  }
  T* s = static_cast<T*>(p.score) + n * D;
  for (int64_t i = 0; i < D; ++i) s[i] = from_float<T>(sf[i]);
}

template <typename T>
FD_INLINE int64_t score_rows(const GmmScoreParams& p, int64_t n0, int64_t n1) {
  std::vector<float> buf(size_t(2 * p.numel + p.n_comp));
  for (int64_t n = n0; n < n1; ++n) score_row<T>(p, n, buf.data(), buf.data() + p.numel, buf.data() + 2 * p.numel);
  return 0;
}

FD_CLONES int64_t score_f32(const GmmScoreParams& p, int64_t n0, int64_t n1) { return score_rows<float>(p, n0, n1); }
FD_CLONES int64_t score_f16(const GmmScoreParams& p, int64_t n0, int64_t n1) { return score_rows<half_t>(p, n0, n1); }
FD_CLONES int64_t score_bf16(const GmmScoreParams& p, int64_t n0, int64_t n1) {
  return score_rows<bf16_t>(p, n0, n1);
}

template <typename F>
F pick(int dtype, F f32, F f16, F bf16, const char* op) {
  switch (dtype) {
    case kFloat32: return f32;
    case kFloat16: return f16;
    case kBFloat16: return bf16;
    default: throw std::invalid_argument(std::string(op) + ": dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
}

}  // namespace

int64_t gmm_noise(const GmmNoiseParams& p) {
  if (!p.out || !p.means || !p.stds || p.n_comp < 1 || p.group < 1 || p.n_draws * p.group != p.numel)
    throw std::invalid_argument("gmm_noise: out, means, stds, n_comp >= 1 and n_draws * group == numel required");
  if ((!p.noise || !p.component_in) && !p.seeds) throw std::invalid_argument("gmm_noise: seeds required");
  if (!p.component_in && !p.component_out) throw std::invalid_argument("gmm_noise: component_out required");
  if (p.n_comp * std::max(p.means_d, p.stds_d) >= (int64_t(1) << 31))
    throw std::invalid_argument("gmm_noise: tables of 2^31 or more elements are not supported");
  const auto run = pick(p.dtype, noise_f32, noise_f16, noise_bf16, "gmm_noise");
  return parallel_runs(p.batch * ((p.numel + kChunk - 1) / kChunk), p.batch * p.numel, kParallelMin,
                       [&](int64_t t0, int64_t t1) { return run(p, t0, t1); });
}

void gmm_score(const GmmScoreParams& p) {
  if (!p.x || !p.means || !p.inv_std || !p.log_coef || !p.score || !p.log_prob || p.n_comp < 1)
    throw std::invalid_argument("gmm_score: x, means, inv_std, log_coef, score, log_prob and n_comp >= 1 required");
  const auto run = pick(p.dtype, score_f32, score_f16, score_bf16, "gmm_score");
  parallel_runs(p.batch, p.batch * p.numel * p.n_comp, kParallelMin,
                [&](int64_t n0, int64_t n1) { return run(p, n0, n1); });
}

}  // namespace cpu
}  // namespace fastdiff
