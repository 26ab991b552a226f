// The one step kernel family (DESIGN.md, "One step kernel, many methods"): per element, a data
// prediction followed by linear combinations, with every coefficient read from a plan row.
//   e_i   = model output i, or uncond_i + G*(cond_i - uncond_i) with guidance
//   x0    = clamp(AS*(AX*x + AE0*e_0 + AE1*e_1), -R, R)
//   out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + sum_j CMj*m_j + CLAST*x_last
//         + COFF*offset[n] + CROW*row_table[idx_n, i] + CZ*s*z,   s = sqrt(max(VAR - var_table[idx_n, i], 0)) or 1
// DDIM, DDPM, DPM-Solver++, UniPC, Euler/Heun, DDM, IADB, Mix-DDPM and DDIM-GMM differ only in the
// coefficients (fastdiff/samplers/*). This header holds the parameters and the arithmetic on a group of
// N consecutive elements of one sample; the CPU loop (N = a cache-sized chunk) and the CUDA kernel
// (N = one 16-byte vector per thread) supply the loads and store the results.
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

// The inputs a step reads, in the order step_lanes asks for them.
enum StepInput : int { kInX, kInE0, kInE1, kInEU0, kInEU1, kInM0, kInM1, kInM2, kInLast, kInRow, kInVar, kInNoise };

// out_k += c_k[col]*v for the NOUT outputs, and x0 += a_x0*v (X0 = 1) or x0 = a_x0*v (X0 = 2): one pass
// folds an input in. (Assigning the first x0 term spares a memset, which compiles to a slow `rep stos`.)
enum X0Fold : int { kX0None = 0, kX0Add = 1, kX0Set = 2 };
template <int N, int NOUT, int X0>
FD_HD FD_INLINE void fold(const float* __restrict__ c, float a_x0, int col, const float* __restrict__ v,
                          float (&x0)[N], float (&out)[kMaxOut][N]) {
  const float c0 = c[kOut + col], c1 = c[kOut + kPerOut + col], c2 = c[kOut + 2 * kPerOut + col];
  FD_UNROLL
  for (int j = 0; j < N; ++j) {
    if (X0 == kX0Add) x0[j] += a_x0 * v[j];
    if (X0 == kX0Set) x0[j] = a_x0 * v[j];
    out[0][j] += c0 * v[j];
    if (NOUT > 1) out[1][j] += c1 * v[j];
    if (NOUT > 2) out[2][j] += c2 * v[j];
  }
}

// min(max(v, lo), hi) written with comparisons: vectorises on the CPU (fminf would not), keeps NaN.
FD_HD FD_INLINE float clampf(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// The arithmetic of one step on N consecutive elements of one sample, for NOUT outputs; c is the
// sample's coefficient row. `load(input, buf)` returns N fp32 values of an input: buf filled by the
// backend (dtype conversion, in-kernel noise), or a pointer straight into fp32 memory. Each input is
// folded into the outputs as soon as it arrives, so at most six lane arrays are live (registers on the
// GPU, L1 on the CPU) whatever the terms; terms are tested once, outside the lane loops.
template <int N, int NOUT, class Load>
FD_HD FD_INLINE void step_lanes(const float* __restrict__ c, const StepTerms& t, float offset, Load& load,
                                float (&out)[kMaxOut][N]) {
  float x0[N], buf[N];
  for (int k = 0; k < NOUT; ++k) {
    const float base = t.offset ? c[kOut + k * kPerOut + kCOff] * offset : 0.0f;
    FD_UNROLL
    for (int j = 0; j < N; ++j) out[k][j] = base;
  }
  if (t.x) {
    fold<N, NOUT, kX0Set>(c, c[kAX], kCX, load(kInX, buf), x0, out);
  } else {
    FD_UNROLL
    for (int j = 0; j < N; ++j) x0[j] = 0.0f;
  }
  for (int i = 0; i < 2; ++i) {
    if (i >= t.n_e) break;
    const float* v = load(i == 0 ? kInE0 : kInE1, buf);
    if (t.guided) {  // classifier-free guidance: e = uncond + g*(cond - uncond)
      float ubuf[N];
      const float* u = load(i == 0 ? kInEU0 : kInEU1, ubuf);
      const float g = c[kG];
      FD_UNROLL
      for (int j = 0; j < N; ++j) buf[j] = u[j] + g * (v[j] - u[j]);
      v = buf;
    }
    fold<N, NOUT, kX0Add>(c, c[kAE0 + i], kCE0 + i, v, x0, out);
  }
  const float as = c[kAS];  // data prediction x0 = clamp(AS*(AX*x + AE0*e0 + AE1*e1), -R, R)
  if (t.clamp) {
    const float r = c[kR];
    FD_UNROLL
    for (int j = 0; j < N; ++j) x0[j] = clampf(as * x0[j], -r, r);
  } else {
    FD_UNROLL
    for (int j = 0; j < N; ++j) x0[j] *= as;
  }
  fold<N, NOUT, kX0None>(c, 0.0f, kCX0, x0, x0, out);
  for (int i = 0; i < 3; ++i) {
    if (i >= t.n_m) break;
    fold<N, NOUT, kX0None>(c, 0.0f, kCM0 + i, load(kInM0 + i, buf), x0, out);
  }
  if (t.last) fold<N, NOUT, kX0None>(c, 0.0f, kCLast, load(kInLast, buf), x0, out);
  if (t.row) fold<N, NOUT, kX0None>(c, 0.0f, kCRow, load(kInRow, buf), x0, out);
  if (t.noise) {
    const float* z = load(kInNoise, buf);
    if (t.var) {  // per-element std of the gathered component, clipped at 0 (Gabbur, App. A.5)
      float vbuf[N];
      const float* var = load(kInVar, vbuf);
      const float s2 = c[kVar];
      FD_UNROLL
      for (int j = 0; j < N; ++j) buf[j] = z[j] * sqrtf(clampf(s2 - var[j], 0.0f, INFINITY));
      z = buf;
    }
    fold<N, NOUT, kX0None>(c, 0.0f, kCZ, z, x0, out);
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
