// The one step kernel family (DESIGN.md, "One step kernel, many methods"): per element, a data
// prediction followed by linear combinations, with every coefficient read from a plan row.
//   e_i   = model output i, or uncond_i + G*(cond_i - uncond_i) with guidance
//   x0    = clamp(AX*x + AE0*e_0 + AE1*e_1, -R, R)
//   out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + sum_j CMj*m_j + CLAST*x_last
//         + COFF*offset[n] + CROW*row_table[idx_n, i] + CZ*s*z,   s = sqrt(max(VAR - var_table[idx_n, i], 0)) or 1
// DDIM, DDPM, DPM-Solver++, UniPC, Euler/Heun, DDM, IADB, Mix-DDPM and DDIM-GMM differ only in the
// coefficients (fastdiff/samplers/*). This header holds the parameters and the arithmetic on a group of
// N consecutive elements of one sample; the CPU loop (N = a cache-sized chunk) and the CUDA kernel
// (N = one vector per thread) only load and store around it.
#pragma once
#include <cmath>

#include "fastdiff/common.cuh"
#include "fastdiff/layout.h"
#include "fastdiff/philox.cuh"

namespace fastdiff {

// Raw parameters of one step launch. Tensors are contiguous [B, D] in the storage dtype unless noted;
// a null pointer means the term is absent.
struct StepParams {
  int64_t batch = 0;   // B
  int64_t numel = 0;   // D, elements per sample
  int dtype = kFloat32;
  const void* x = nullptr;
  const void* e0 = nullptr;  // model outputs (conditional ones when guidance is on)
  const void* e1 = nullptr;
  const void* eu0 = nullptr;  // unconditional model outputs: guidance on
  const void* eu1 = nullptr;
  const void* m0 = nullptr;  // history slots (previous data predictions)
  const void* m1 = nullptr;
  const void* m2 = nullptr;
  const void* x_last = nullptr;   // UniPC's previous sample, Heun's step start
  const float* offset = nullptr;  // [B] float32 per-sample scalar offset (Mix-DDPM)
  const int64_t* idx = nullptr;   // [B] row of row_table/var_table per sample (component k_n)
  const float* row_table = nullptr;  // [K, D] float32 offset rows (DDIM-GMM delta_k)
  const float* var_table = nullptr;  // [K, D] float32 variance rows (DDIM-GMM diag Delta_k)
  int64_t table_rows = 0;            // K
  const void* noise = nullptr;       // [B, D] given standard-normal noise
  const int64_t* seeds = nullptr;    // [B] Philox keys: in-kernel noise
  int64_t noise_step = 0;            // Philox counter word 2
  int64_t noise_stream = 0;          // Philox counter word 3
  const float* coef = nullptr;       // [n_rows, kNumCoef] float32 plan table
  int64_t coef_rows = 0;
  int64_t row = 0;                   // row used by every sample, unless rows is given
  const int64_t* rows = nullptr;     // [rows_len] per-sample rows (rows_len == 1 broadcasts)
  int64_t rows_len = 0;
  bool clamp = false;
  int n_out = 1;
  void* out0 = nullptr;
  void* out1 = nullptr;
  void* out2 = nullptr;
};

// Which terms are present: checked once per group of N elements, so absent terms cost nothing.
struct StepTerms {
  bool x, guided, last, offset, row, var, noise, clamp;
  int n_e, n_m, n_out;
};

FD_HD FD_INLINE StepTerms step_terms(const StepParams& p) {
  StepTerms t;
  t.x = p.x != nullptr;
  t.n_e = p.e0 ? (p.e1 ? 2 : 1) : 0;
  t.guided = p.eu0 != nullptr;
  t.n_m = p.m0 ? (p.m1 ? (p.m2 ? 3 : 2) : 1) : 0;
  t.last = p.x_last != nullptr;
  t.offset = p.offset != nullptr;
  t.row = p.row_table != nullptr;
  t.var = p.var_table != nullptr;
  t.noise = p.noise != nullptr || p.seeds != nullptr;
  t.clamp = p.clamp;
  t.n_out = p.n_out;
  return t;
}

// The plan row of sample n. An index outside the table yields NaN coefficients: a device-side index
// cannot be checked on the host without a sync, and NaN output is loud where a clamp would be silent.
FD_HD FD_INLINE int64_t step_row(const StepParams& p, int64_t n) {
  if (!p.rows) return p.row;
  return p.rows[p.rows_len == 1 ? 0 : n];
}
FD_HD FD_INLINE float step_coef(const StepParams& p, int64_t r, int j) {
  return (r >= 0 && r < p.coef_rows) ? p.coef[r * kNumCoef + j] : NAN;
}

// The inputs of N consecutive elements of one sample, already in fp32.
template <int N>
struct StepLanes {
  float x[N];
  float e[2][N];
  float eu[2][N];
  float m[3][N];
  float last[N];
  float row[N];
  float var[N];
  float z[N];
  float offset;  // the sample's scalar offset
};

// The arithmetic of one step on N elements; c is the sample's coefficient row. Terms are tested once,
// outside the lane loops.
template <int N>
FD_HD FD_INLINE void step_lanes(const float* __restrict__ c, const StepTerms& t, StepLanes<N>& L,
                                float (&out)[kMaxOut][N]) {
  if (t.guided) {  // classifier-free guidance: e = uncond + g*(cond - uncond)
    const float g = c[kG];
    for (int i = 0; i < 2; ++i) {
      if (i < t.n_e) {
FD_UNROLL
        for (int j = 0; j < N; ++j) L.e[i][j] = L.eu[i][j] + g * (L.e[i][j] - L.eu[i][j]);
      }
    }
  }
  float x0[N];  // data prediction, linear in x and the model outputs for every prediction type
FD_UNROLL
  for (int j = 0; j < N; ++j) x0[j] = 0.0f;
  if (t.x) {
FD_UNROLL
    for (int j = 0; j < N; ++j) x0[j] = c[kAX] * L.x[j];
  }
  for (int i = 0; i < 2; ++i) {
    if (i < t.n_e) {
      const float a = c[kAE0 + i];
FD_UNROLL
      for (int j = 0; j < N; ++j) x0[j] += a * L.e[i][j];
    }
  }
  if (t.clamp) {
    const float r = c[kR];
FD_UNROLL
    for (int j = 0; j < N; ++j) x0[j] = fminf(fmaxf(x0[j], -r), r);
  }
  if (t.noise && t.var) {  // per-element std of the gathered component: clipped at 0 (Gabbur, App. A.5)
    const float v = c[kVar];
FD_UNROLL
    for (int j = 0; j < N; ++j) L.z[j] *= sqrtf(fmaxf(v - L.var[j], 0.0f));
  }
  for (int k = 0; k < kMaxOut; ++k) {
    if (k >= t.n_out) break;
    const float* ck = c + kOut + k * kPerOut;
    const float base = t.offset ? ck[kCOff] * L.offset : 0.0f;
    float* o = out[k];
FD_UNROLL
    for (int j = 0; j < N; ++j) o[j] = base + ck[kCX0] * x0[j];
    if (t.x) {
FD_UNROLL
      for (int j = 0; j < N; ++j) o[j] += ck[kCX] * L.x[j];
    }
    for (int i = 0; i < 2; ++i) {
      if (i < t.n_e) {
        const float a = ck[kCE0 + i];
FD_UNROLL
        for (int j = 0; j < N; ++j) o[j] += a * L.e[i][j];
      }
    }
    for (int i = 0; i < 3; ++i) {
      if (i < t.n_m) {
        const float a = ck[kCM0 + i];
FD_UNROLL
        for (int j = 0; j < N; ++j) o[j] += a * L.m[i][j];
      }
    }
    if (t.last) {
FD_UNROLL
      for (int j = 0; j < N; ++j) o[j] += ck[kCLast] * L.last[j];
    }
    if (t.row) {
FD_UNROLL
      for (int j = 0; j < N; ++j) o[j] += ck[kCRow] * L.row[j];
    }
    if (t.noise) {
FD_UNROLL
      for (int j = 0; j < N; ++j) o[j] += ck[kCZ] * L.z[j];
    }
  }
}

// In-kernel noise for elements [i0, i0 + N) of a sample, i0 a multiple of 4.
template <int N>
FD_HD FD_INLINE void philox_lanes(uint64_t seed, int64_t i0, uint32_t step, uint32_t stream, float (&z)[N]) {
  static_assert(N % 4 == 0, "noise lanes come in groups of 4");
FD_UNROLL
  for (int g = 0; g < N / 4; ++g) {
    float q[4];
    philox_normal4(seed, uint64_t(i0 / 4 + g), step, stream, q);
FD_UNROLL
    for (int j = 0; j < 4; ++j) z[4 * g + j] = q[j];
  }
}

}  // namespace fastdiff
