// The Gaussian-mixture kernels' per-element math, shared by the CPU and CUDA builds (torch-free). A
// diagonal mixture p(x) = sum_k w_k N(x; mu_k, diag s_k^2) over a sample of D elements; the torch statement
// of the same is fastdiff/reference/gmm.py.
//
//   gmm_noise: x[n, i] = mu[k, i] + s[k, i] * z[n, i], k the component of draw j = i / group (one draw per
//              sample, channel or element), drawn by inverse CDF on a Philox uniform: the uniform of draw j
//              is word j % 4 of Philox group j / 4 in DOMAIN_CATEGORICAL (fastdiff.philox.uniform), and
//              k = #{j < K-1 : u >= cdf[j]} against the float32 cumulative weights (philox.categorical);
//              z = the Philox normals in DOMAIN_TRAIN (philox_normal4).
//   gmm_score: l_k = c_k - 1/2 sum_i ((x_i - mu_ki) / s_ki)^2,  c_k = log w_k - sum_i log s_ki - D/2 log 2pi
//              log p = m + log sum_k exp(l_k - m), m = max_k l_k;  r_k = exp(l_k - m) / sum
//              score_i = sum_k r_k (mu_ki - x_i) / s_ki^2
#pragma once
#include <cmath>

#include "fastdiff/common.cuh"
#include "fastdiff/layout.h"
#include "fastdiff/philox.cuh"

namespace fastdiff {

constexpr uint32_t kDomainCategorical = 2, kDomainTrain = 3;  // fastdiff/philox.py DOMAIN_*

// Raw parameters of one gmm_noise launch (field names: the module's gmm_noise_fields). Tables are float32;
// means_d / stds_d is D (per-element rows) or 1 (one value per component).
struct GmmNoiseParams {
  int64_t batch = 0, numel = 0;  // B, D
  int64_t n_draws = 0;           // component draws per sample: 1, C or D
  int64_t group = 1;             // elements per draw: D / n_draws
  int64_t n_comp = 0;            // K
  int dtype = kFloat32;
  const float* cdf = nullptr;    // [K-1] float32 cumulative weights
  const float* means = nullptr;  // [K, means_d]
  int64_t means_d = 0;
  const float* stds = nullptr;   // [K, stds_d]
  int64_t stds_d = 0;
  const void* noise = nullptr;            // [B, D] given normals, or null: drawn from seeds
  const int64_t* seeds = nullptr;         // [B] Philox keys
  int64_t step = 0;                       // Philox counter word 2
  const int64_t* component_in = nullptr;  // [B, n_draws] given ids, or null: drawn (and written)
  void* out = nullptr;                    // [B, D] storage dtype
  int64_t* component_out = nullptr;       // [B, n_draws] drawn ids
};

// Raw parameters of one gmm_score launch (field names: gmm_score_fields). The host prepares dense
// [K, D] means and 1/s and the per-component constants c_k (in float64, rounded).
struct GmmScoreParams {
  int64_t batch = 0, numel = 0, n_comp = 0;  // B, D, K
  int dtype = kFloat32;
  const void* x = nullptr;            // [B, D] storage dtype
  const float* means = nullptr;       // [K, D]
  const float* inv_std = nullptr;     // [K, D]
  const float* log_coef = nullptr;    // [K] c_k
  void* score = nullptr;              // [B, D] storage dtype
  float* log_prob = nullptr;          // [B]
};

// The four Philox words of group g (no Box-Muller): the uniforms of draws 4g..4g+3.
FD_HD FD_INLINE void philox_words(uint64_t seed, uint64_t g, uint32_t step, uint32_t domain, uint32_t (&w)[4]) {
  w[0] = uint32_t(g);
  w[1] = uint32_t(g >> 32);
  w[2] = step;
  w[3] = domain;
  philox4x32_10(w, uint32_t(seed), uint32_t(seed >> 32));
}

// Inverse CDF: the number of float32 thresholds cdf[0..K-2] at or below u (philox.categorical).
FD_HD FD_INLINE int64_t categorical_index(float u, const float* cdf, int64_t n_comp) {
  int64_t k = 0;
  for (int64_t j = 0; j + 1 < n_comp; ++j) k += u >= cdf[j] ? 1 : 0;
  return k;
}

// The component of draw j of a sample keyed by seed: word j % 4 of Philox group j / 4.
FD_HD FD_INLINE int64_t draw_component(uint64_t seed, int64_t j, uint32_t step, const float* cdf, int64_t n_comp) {
  uint32_t w[4];
  philox_words(seed, uint64_t(j) / 4, step, kDomainCategorical, w);
  return categorical_index(uniform_open(w[j & 3]), cdf, n_comp);
}

// x = mu + s * z: a component's normal from a standard one.
FD_HD FD_INLINE float gmm_affine(float mu, float s, float z) { return mu + s * z; }

// x = mu[k, i] + s[k, i] * z for element i of component k (rows of length means_d / stds_d: D or 1).
FD_HD FD_INLINE float gmm_value(const GmmNoiseParams& p, int64_t k, int64_t i, float z) {
  return gmm_affine(p.means[k * p.means_d + (p.means_d == 1 ? 0 : i)], p.stds[k * p.stds_d + (p.stds_d == 1 ? 0 : i)],
                    z);
}

// The squared standardised distance ((x - mu)/s)^2 of one element, and its score term r (mu - x)/s^2.
FD_HD FD_INLINE float gmm_sq_dist(float x, float mu, float inv_s) {
  const float d = (x - mu) * inv_s;
  return d * d;
}
FD_HD FD_INLINE float gmm_score_term(float r, float x, float mu, float inv_s) { return r * (mu - x) * inv_s * inv_s; }

// l[k] = c_k - sq[k]/2 in place -> responsibilities r[k]; returns log p = m + log sum exp(l - m) (stable).
FD_HD FD_INLINE float gmm_responsibilities(float* l, const float* sq, const float* log_coef, int64_t n_comp) {
  float m = -INFINITY;
  for (int64_t k = 0; k < n_comp; ++k) {
    l[k] = log_coef[k] - 0.5f * sq[k];
    m = l[k] > m ? l[k] : m;
  }
  float total = 0.0f;
  for (int64_t k = 0; k < n_comp; ++k) {
    l[k] = expf(l[k] - m);
    total += l[k];
  }
  const float inv = 1.0f / total;
  for (int64_t k = 0; k < n_comp; ++k) l[k] *= inv;
  return m + logf(total);
}

}  // namespace fastdiff
