// The one step kernel family (DESIGN.md, "One step kernel, many methods"): per element, a data
// prediction followed by linear combinations, with every coefficient read from a plan row.
//   e_i   = model output i, or uncond_i + G*(cond_i - uncond_i) with guidance
//   x0    = clamp(AS*(AX*x + AE0*e_0 + AE1*e_1), -R, R)
//   out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + sum_j CMj*m_j + CLAST*x_last
//         + COFF*offset[n] + CROW*row_table[idx_n, i] + CZ*s*z,   s = sqrt(max(VAR - var_table[idx_n, i], 0)) or 1
// DDIM, DDPM, DPM-Solver++, UniPC, Euler/Heun, DDM, IADB, Mix-DDPM and DDIM-GMM differ only in the
// coefficients (fastdiff/samplers/*).
//
// Everything but the clamp and the noise's std is linear, so a sample's step is a set of *streams*:
// each input tensor v_s with a weight a_s in x0 and weights c_sk in the outputs (guidance folds into
// them: e = (1-G)*uncond + G*cond). step_streams() maps a plan row onto streams, once per sample;
// the CPU loop and the CUDA kernel then only stream: x0 += a_s*v_s, out_k += c_sk*v_s, finish.
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

// The plan row of sample n; negative rows count from the end, as Python indexes. An index outside the
// table yields NaN coefficients: a device-side index cannot be checked on the host without a sync, and
// NaN output is loud where a clamp would be silent.
FD_HD FD_INLINE int64_t step_row(const StepParams& p, int64_t n) {
  const int64_t r = p.rows ? p.rows[p.rows_len == 1 ? 0 : n] : p.row;
  return r < 0 ? r + p.coef_rows : r;
}

FD_HD FD_INLINE float step_coef(const StepParams& p, int64_t r, int j) {
  return (r >= 0 && r < p.coef_rows) ? p.coef[r * kNumCoef + j] : NAN;
}

FD_HD FD_INLINE int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

constexpr int kMaxStreams = 10;  // x, e0, e1, eu0, eu1, m0, m1, m2, x_last, noise

// One sample's step as streams (see the top of this file). Pointers are at the sample's first element.
struct StepStreams {
  int ns;                           // streams in the storage dtype
  const void* p[kMaxStreams];
  float a[kMaxStreams];             // weight in x0 (0 for the terms after the clamp)
  float c[kMaxStreams][kMaxOut];    // weight in each output
  const float* row;                 // fp32 stream: row_table[idx_n] (null: none)
  float c_row[kMaxOut];
  bool z;                           // noise that needs work first: in-kernel Philox, or a std row
  const void* noise;                //   given noise (storage dtype), else Philox with `seed`
  uint64_t seed;
  const float* var;                 //   var_table[idx_n] (null: std 1)
  float var_total;                  //   VAR: std = sqrt(max(VAR - var, 0))
  float c_z[kMaxOut];
  float as, r;                      // x0 = clamp(as * sum_s a_s v_s, -r, r)  (r = inf: no clamp)
  float c_x0[kMaxOut];
  float base[kMaxOut];              // COFF*offset[n]; NaN when idx[n] is outside the tables
};

FD_HD FD_INLINE void push_stream(StepStreams& s, const void* base, int64_t off, float a, const float* ck,
                                 float w) {
  s.p[s.ns] = static_cast<const char*>(base) + off;
  s.a[s.ns] = a;
  for (int k = 0; k < kMaxOut; ++k) s.c[s.ns][k] = w * ck[k * kPerOut];
  ++s.ns;
}

// Sample n's streams from its coefficient row c (kNumCoef floats).
FD_HD FD_INLINE void step_streams(const StepParams& p, const float* c, int64_t n, StepStreams& s) {
  const int64_t off = n * p.numel * dtype_size(p.dtype);  // bytes to sample n
  const float* out = c + kOut;                            // out[k*kPerOut + term]
  s.ns = 0;
  if (p.x) push_stream(s, p.x, off, c[kAX], out + kCX, 1.0f);
  const void* e[2] = {p.e0, p.e1};
  const void* eu[2] = {p.eu0, p.eu1};
  const float g = c[kG];
  for (int i = 0; i < 2; ++i) {
    if (!e[i]) break;
    if (eu[i]) {  // e = uncond + g*(cond - uncond) = g*cond + (1 - g)*uncond
      push_stream(s, e[i], off, g * c[kAE0 + i], out + kCE0 + i, g);
      push_stream(s, eu[i], off, (1.0f - g) * c[kAE0 + i], out + kCE0 + i, 1.0f - g);
    } else {
      push_stream(s, e[i], off, c[kAE0 + i], out + kCE0 + i, 1.0f);
    }
  }
  const void* m[3] = {p.m0, p.m1, p.m2};
  for (int i = 0; i < 3; ++i)
    if (m[i]) push_stream(s, m[i], off, 0.0f, out + kCM0 + i, 1.0f);
  if (p.x_last) push_stream(s, p.x_last, off, 0.0f, out + kCLast, 1.0f);

  const int64_t k = p.idx ? p.idx[n] : 0;
  const bool k_ok = !p.idx || (k >= 0 && k < p.table_rows);
  s.row = p.row_table && k_ok ? p.row_table + k * p.numel : nullptr;
  s.var = p.var_table && k_ok ? p.var_table + k * p.numel : nullptr;
  s.var_total = c[kVar];
  s.noise = p.noise ? static_cast<const char*>(p.noise) + off : nullptr;
  s.seed = p.seeds ? uint64_t(p.seeds[n]) : 0;
  s.z = p.seeds || (p.noise && p.var_table);
  if (p.noise && !s.z) push_stream(s, p.noise, off, 0.0f, out + kCZ, 1.0f);
  const float offset = p.offset ? p.offset[n] : 0.0f;
  for (int j = 0; j < kMaxOut; ++j) {
    s.c_row[j] = out[j * kPerOut + kCRow];
    s.c_z[j] = out[j * kPerOut + kCZ];
    s.c_x0[j] = out[j * kPerOut + kCX0];
    s.base[j] = (p.offset ? out[j * kPerOut + kCOff] * offset : 0.0f) + (k_ok ? 0.0f : NAN);
  }
  s.as = c[kAS];
  s.r = p.clamp ? c[kR] : INFINITY;
}

// min(max(v, lo), hi) with comparisons: keeps NaN, and works on GCC vector types as on floats.
template <typename V>
FD_HD FD_INLINE V clampf(V v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
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

// z *= sqrt(max(VAR - var, 0)): the gathered component's std, clipped at 0 (Gabbur, App. A.5).
template <int N>
FD_HD FD_INLINE void scale_by_std(float (&z)[N], const float* var, float var_total, int n) {
  if (!var) return;
  FD_UNROLL
  for (int j = 0; j < N; ++j) z[j] *= sqrtf(clampf(var_total - (j < n ? var[j] : 0.0f), 0.0f, INFINITY));
}

}  // namespace fastdiff
