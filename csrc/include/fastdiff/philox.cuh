// Counter-based normal noise: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as
// easy as 1, 2, 3", SC'11) and the Box-Muller transform. The same numbers on every backend (the torch
// reference is fastdiff/philox.py, the Triton one triton_kernels/philox.py):
//   key     = the 64-bit seed of sample n            (so the noise never depends on the batch)
//   counter = (g mod 2^32, g >> 32, step, domain)     g = i / 4, i = element index inside the sample;
//                                                     domain = what the noise is for (fastdiff/philox.py)
//   normals = Box-Muller of the 4 words: (w0, w1) -> z[4g], z[4g+1];  (w2, w3) -> z[4g+2], z[4g+3]
// The transcendental functions are our own small polynomials on reduced ranges, so CPU loops vectorise
// and every backend computes the same thing (Cephes single-precision coefficients).
#pragma once
#include <cmath>

#include "fastdiff/common.cuh"

namespace fastdiff {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

FD_HD FD_INLINE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t& hi) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  return uint32_t(p);
#endif
}

// One Philox4x32 round on the counter words (c0, c1, c2, c3) with round key (k0, k1), in place. Written on
// scalars so that a loop of it over structure-of-arrays counters vectorises (philox_lanes).
FD_HD FD_INLINE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, hi1;
  const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, hi0);
  const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, hi1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Ten rounds of Philox4x32 on counter c with key (k0, k1), in place.
FD_HD FD_INLINE void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
FD_UNROLL
  for (int r = 0; r < 10; ++r) {
    philox_round(c[0], c[1], c[2], c[3], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Top 23 bits -> (k + 0.5) * 2^-23, exactly representable: u in [2^-24, 1 - 2^-24], never 0 or 1.
FD_HD FD_INLINE float uniform_open(uint32_t w) { return float(w >> 9) * 0x1p-23f + 0x1p-24f; }

// Natural log for positive normal floats (Cephes logf: m in [sqrt(1/2), sqrt(2)), degree-9 polynomial).
FD_HD FD_INLINE float log_pos(float v) {
  const uint32_t b = float_bits(v);
  float e = float(int(b >> 23) - 126);                 // v = m * 2^e, m in [0.5, 1)
  float m = bits_float((b & 0x007fffffu) | 0x3f000000u);
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1.0f : e;
  const float f = (small ? m + m : m) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y - 2.12194440e-4f * e;                          // ln 2 = 0.693359375 - 2.12194440e-4
  y = y - 0.5f * z;
  return (f + y) + 0.693359375f * e;
}

// cos and sin of k * pi/2 + a for |a| <= pi/4: Cephes sinf/cosf polynomials, then the quadrant k
// ((c, s) -> (c, s), (-s, c), (-c, -s), (s, -c)) by two-way selects: branch-free, they vectorise.
FD_HD FD_INLINE void sincos_quadrant(float a, int k, float& c_out, float& s_out) {
  const float z = a * a;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
                  - 0.5f * z + 1.0f;
  k &= 3;
  const float cq = (k & 1) ? s : c, sq = (k & 1) ? c : s;
  c_out = ((k + 1) & 2) ? -cq : cq;
  s_out = (k & 2) ? -sq : sq;
}

// cos(2*pi*u), sin(2*pi*u) for u in [0, 1]. The quadrant comes exactly from 4u (no rounding of 2*pi*u).
FD_HD FD_INLINE void sincos_2pi(float u, float& c_out, float& s_out) {
  const float t = 4.0f * u;
  const float q = float(int(t + 0.5f));                // nearest quadrant, 0..4
  sincos_quadrant((t - q) * 1.57079632679489662f, int(q), c_out, s_out);  // |a| <= pi/4
}

// Box-Muller: two words -> two standard normals r*cos(2 pi u2), r*sin(2 pi u2), r = sqrt(-2 log u1).
FD_HD FD_INLINE void box_muller(uint32_t w1, uint32_t w2, float& z0, float& z1) {
  const float r = sqrtf(-2.0f * log_pos(uniform_open(w1)));
  float cs, sn;
  sincos_2pi(uniform_open(w2), cs, sn);
  z0 = r * cs;
  z1 = r * sn;
}

// The four standard normals of group g (elements 4g..4g+3) for this seed, step and domain.
FD_HD FD_INLINE void philox_normal4(uint64_t seed, uint64_t g, uint32_t step, uint32_t domain, float (&z)[4]) {
  uint32_t c[4] = {uint32_t(g), uint32_t(g >> 32), step, domain};
  philox4x32_10(c, uint32_t(seed), uint32_t(seed >> 32));
  box_muller(c[0], c[1], z[0], z[1]);
  box_muller(c[2], c[3], z[2], z[3]);
}

}  // namespace fastdiff
