// The one step kernel family: per element, a data prediction followed by linear combinations, every
// coefficient read from a plan row. The terms and their columns are defined in the glossary of
// docs/architecture.md ("The step's terms"); fastdiff/reference/step.py states the same in torch.
//
// Everything but the clamp and the noise's std is linear, so a sample's step is a list of *linear
// terms*: each input tensor v with a weight a in x0 and weights c_k in the outputs (guidance folds in:
// e = (1-G)*uncond + G*cond). linear_terms() maps a plan row onto them once per sample; the CPU loop and
// the CUDA kernel then only accumulate: x0 += a*v, out_k += c_k*v, finish. A weight of 0 means "not
// read": each term carries the bit set of the sums it enters (`use`), the product is skipped elsewhere,
// so an inf or NaN in an unused input never leaks (0*inf would be NaN), and an input with no non-zero
// weight is not loaded at all.
#pragma once
#include <cmath>

#include "fastdiff/common.cuh"
#include "fastdiff/layout.h"
#include "fastdiff/philox.cuh"

namespace fastdiff {

// Raw parameters of one step launch; the field list is fastdiff/layout.py's STEP_FIELDS. Tensors are
// contiguous [B, D] in the storage dtype unless noted; a null pointer means the term is absent.
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
  const void* x_last = nullptr;      // an earlier sample (UniPC's corrected sample, Heun's step start)
  const float* offset = nullptr;     // [B] float32 per-sample scalar offset (Mix-DDPM)
  const int64_t* component = nullptr;  // [B] row k_n of delta_table/var_table per sample
  const float* delta_table = nullptr;  // [K, D] float32 per-element offsets (DDIM-GMM delta_k)
  const float* var_table = nullptr;    // [K, D] float32 per-element variances (DDIM-GMM diag Delta_k)
  int64_t table_rows = 0;              // K
  const void* noise = nullptr;         // [B, D] given standard-normal noise
  const int64_t* seeds = nullptr;      // [B] Philox keys: in-kernel noise
  int64_t noise_step = 0;              // Philox counter word 2
  int64_t noise_domain = 0;            // Philox counter word 3
  const float* coef = nullptr;         // [coef_rows, kNumCoef] float32 plan table
  int64_t coef_rows = 0;
  int64_t row = 0;                     // plan row used by every sample, unless rows is given
  const int64_t* rows = nullptr;       // [rows_len] per-sample plan rows (rows_len == 1 broadcasts)
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

constexpr int kMaxTerms = 10;  // x, e0, e1, eu0, eu1, m0, m1, m2, x_last, noise
constexpr int kUseX0 = 1 << kMaxOut;  // `use` bits: 1 << k for output k, kUseX0 for the x0 sum

// One sample's step as linear terms (see the top of this file). Pointers are at the sample's first element.
struct LinearTerms {
  int n;                            // terms in the storage dtype
  const void* p[kMaxTerms];
  int use[kMaxTerms];               // the sums each term enters: bit k output k, kUseX0 x0 (weight != 0)
  float a[kMaxTerms];               // weight in x0
  float c[kMaxTerms][kMaxOut];      // weight in each output
  const float* delta;               // fp32 term: delta_table[k_n] (null: not read)
  float c_delta[kMaxOut];
  int delta_use, z_use, x0_use;     // the outputs that delta, z and x0 enter (bit k: weight != 0)
  bool z;                           // noise that needs work: in-kernel Philox, or a std row
  const void* noise;                //   given noise (storage dtype), else Philox with `seed`
  uint64_t seed;
  const float* var;                 //   var_table[k_n] (null: std 1)
  float var_total;                  //   VAR: std = sqrt(max(VAR - var, 0))
  float c_z[kMaxOut];
  bool x0;                          // some output reads x0
  float as, r;                      // x0 = clamp(as * sum a*v, -r, r)  (r = inf: no clamp)
  float c_x0[kMaxOut];
  float base[kMaxOut];              // COFF*offset[n]; NaN when k_n is outside the tables
};

// Bit k set where c[k] != 0.
FD_HD FD_INLINE int nonzero_bits(const float (&c)[kMaxOut]) {
  int bits = 0;
  for (int k = 0; k < kMaxOut; ++k) bits |= c[k] != 0.0f ? 1 << k : 0;
  return bits;
}

// Adds input `base` (at byte offset off) with weight a in x0 and w*ck[k*kPerOut] in output k, unless
// every weight is 0 (then the input is not read at all).
FD_HD FD_INLINE void push_term(LinearTerms& s, const void* base, int64_t off, float a, const float* ck, float w) {
  float c[kMaxOut];
  for (int k = 0; k < kMaxOut; ++k) c[k] = w * ck[k * kPerOut];
  const int use = nonzero_bits(c) | (s.x0 && a != 0.0f ? kUseX0 : 0);
  if (!use) return;
  s.p[s.n] = static_cast<const char*>(base) + off;
  s.use[s.n] = use;
  s.a[s.n] = a;
  for (int k = 0; k < kMaxOut; ++k) s.c[s.n][k] = c[k];
  ++s.n;
}

// Sample n's linear terms from its coefficient row c (kNumCoef floats).
FD_HD FD_INLINE void linear_terms(const StepParams& p, const float* c, int64_t n, LinearTerms& s) {
  const int64_t off = n * p.numel * dtype_size(p.dtype);  // bytes to sample n
  const float* out = c + kOut;                            // out[k*kPerOut + term]
  for (int k = 0; k < kMaxOut; ++k) {
    const bool on = k < p.n_out;  // outputs past n_out are not written: their weights do not count
    s.c_x0[k] = on ? out[k * kPerOut + kCX0] : 0.0f;
    s.c_delta[k] = on && p.delta_table ? out[k * kPerOut + kCDelta] : 0.0f;
    s.c_z[k] = on && (p.noise || p.seeds) ? out[k * kPerOut + kCZ] : 0.0f;
    const float c_off = on && p.offset ? out[k * kPerOut + kCOff] : 0.0f;
    s.base[k] = c_off != 0.0f ? c_off * p.offset[n] : 0.0f;
  }
  s.x0_use = nonzero_bits(s.c_x0);
  s.delta_use = nonzero_bits(s.c_delta);
  s.z_use = nonzero_bits(s.c_z);
  s.x0 = s.x0_use != 0;
  s.n = 0;
  float ck[kMaxOut * kPerOut];  // this sample's output weights, zero past n_out
  for (int j = 0; j < kMaxOut * kPerOut; ++j) ck[j] = j < p.n_out * kPerOut ? out[j] : 0.0f;
  if (p.x) push_term(s, p.x, off, c[kAX], ck + kCX, 1.0f);
  const void* e[2] = {p.e0, p.e1};
  const void* eu[2] = {p.eu0, p.eu1};
  const float g = c[kG];
  for (int i = 0; i < 2; ++i) {
    if (!e[i]) break;
    if (eu[i]) {  // e = (1 - g)*uncond + g*cond
      push_term(s, e[i], off, g * c[kAE0 + i], ck + kCE0 + i, g);
      push_term(s, eu[i], off, (1.0f - g) * c[kAE0 + i], ck + kCE0 + i, 1.0f - g);
    } else {
      push_term(s, e[i], off, c[kAE0 + i], ck + kCE0 + i, 1.0f);
    }
  }
  const void* m[3] = {p.m0, p.m1, p.m2};
  for (int i = 0; i < 3; ++i)
    if (m[i]) push_term(s, m[i], off, 0.0f, ck + kCM0 + i, 1.0f);
  if (p.x_last) push_term(s, p.x_last, off, 0.0f, ck + kCLast, 1.0f);

  const int64_t k = p.component ? p.component[n] : 0;
  const bool k_ok = !p.component || (k >= 0 && k < p.table_rows);
  s.delta = p.delta_table && k_ok && s.delta_use ? p.delta_table + k * p.numel : nullptr;
  const bool noisy = s.z_use != 0;
  s.var = noisy && p.var_table && k_ok ? p.var_table + k * p.numel : nullptr;
  s.var_total = c[kVar];
  s.noise = noisy && p.noise ? static_cast<const char*>(p.noise) + off : nullptr;
  s.seed = p.seeds ? uint64_t(p.seeds[n]) : 0;
  s.z = noisy && (p.seeds || (p.noise && p.var_table));
  if (noisy && p.noise && !s.z) push_term(s, p.noise, off, 0.0f, ck + kCZ, 1.0f);
  if (!k_ok)
    for (int j = 0; j < kMaxOut; ++j) s.base[j] = NAN;
  s.as = c[kAS];
  s.r = p.clamp ? c[kR] : INFINITY;
}

// min(max(v, lo), hi) with comparisons: keeps NaN, and works on GCC vector types as on floats.
template <typename V>
FD_HD FD_INLINE V clampf(V v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// The Philox words of groups g0 .. g0 + G - 1 (elements 4 g0 .. 4 (g0 + G) - 1 of a sample) for this seed,
// step and domain: the counters, then the ten rounds stage by stage over structure-of-arrays counters, so
// that a CPU compiler vectorises each stage across groups (the CPU kernels take an AVX2 version of the
// rounds where the CPU has it: csrc/cpu/philox_block.cpp; integer arithmetic, so the same words).
template <int G>
FD_HD FD_INLINE void philox_words(uint64_t seed, uint64_t g0, uint32_t step, uint32_t domain, uint32_t (&c0)[G],
                                  uint32_t (&c1)[G], uint32_t (&c2)[G], uint32_t (&c3)[G]) {
  FD_UNROLL
  for (int g = 0; g < G; ++g) {
    c0[g] = uint32_t(g0 + g);
    c1[g] = uint32_t((g0 + g) >> 32);
    c2[g] = step;
    c3[g] = domain;
  }
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  FD_UNROLL
  for (int r = 0; r < 10; ++r) {
    FD_UNROLL
    for (int g = 0; g < G; ++g) philox_round(c0[g], c1[g], c2[g], c3[g], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Box-Muller of G groups' words, stage by stage (vectorised across groups on a CPU): element 4g + j of z
// from group g, as philox_normal4 makes it.
template <int G>
FD_HD FD_INLINE void normals_of_words(const uint32_t (&c0)[G], const uint32_t (&c1)[G], const uint32_t (&c2)[G],
                                      const uint32_t (&c3)[G], float (&z)[4 * G]) {
  float z0[G], z1[G], z2[G], z3[G];
  FD_UNROLL
  for (int g = 0; g < G; ++g) box_muller(c0[g], c1[g], z0[g], z1[g]);
  FD_UNROLL
  for (int g = 0; g < G; ++g) box_muller(c2[g], c3[g], z2[g], z3[g]);
  FD_UNROLL
  for (int g = 0; g < G; ++g) {
    z[4 * g] = z0[g];
    z[4 * g + 1] = z1[g];
    z[4 * g + 2] = z2[g];
    z[4 * g + 3] = z3[g];
  }
}

// In-kernel noise for elements [i0, i0 + N) of a sample, i0 a multiple of 4: philox_normal4 of each group,
// computed stage by stage (philox_words, normals_of_words); the same operations in the same order, so the
// same numbers.
template <int N>
FD_HD FD_INLINE void philox_lanes(uint64_t seed, int64_t i0, uint32_t step, uint32_t domain, float (&z)[N]) {
  static_assert(N % 4 == 0, "noise lanes come in groups of 4");
  constexpr int G = N / 4;
  uint32_t c0[G], c1[G], c2[G], c3[G];
  philox_words<G>(seed, uint64_t(i0 / 4), step, domain, c0, c1, c2, c3);
  normals_of_words<G>(c0, c1, c2, c3, z);
}

// z *= sqrt(max(VAR - var, 0)): the gathered component's std, clipped at 0 (Gabbur, App. A.5).
// A whole block takes a straight loop, which a CPU compiler vectorises (no guarded load); the tail guards.
// The argument of that square root, max(VAR - var, 0), of one float or a CPU vector of them.
template <typename V>
FD_HD FD_INLINE V component_var(float var_total, V var) {
  return clampf(var_total - var, 0.0f, INFINITY);
}

template <int N>
FD_HD FD_INLINE void scale_by_std(float (&z)[N], const float* var, float var_total, int n) {
  if (!var) return;
  if (n == N) {
    FD_UNROLL
    for (int j = 0; j < N; ++j) z[j] *= sqrtf(component_var(var_total, var[j]));
    return;
  }
  FD_UNROLL
  for (int j = 0; j < N; ++j)
    if (j < n) z[j] *= sqrtf(component_var(var_total, var[j]));
}

}  // namespace fastdiff
