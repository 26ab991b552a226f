// Stand-in for the toolkit's cuda_bf16.h (tests/cuda_emul): float -> bfloat16 rounded to nearest even,
// found by comparing the two candidates' distances in double (exact) - another method than the host
// path's bit arithmetic (fastdiff/common.cuh), so the device path is checked against something else.
// NaN becomes the canonical 0x7fff, as CUDA's does.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  unsigned short x;
};

inline double fd_emul_bf16_value(uint32_t hi16) {
  if ((hi16 & 0x7f80u) == 0x7f80u) return std::ldexp(1.0, 128) * ((hi16 & 0x8000u) ? -1.0 : 1.0);  // past max
  const uint32_t u = hi16 << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (std::isnan(f)) return __nv_bfloat16{0x7fff};
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isinf(f)) return __nv_bfloat16{uint16_t(u >> 16)};
  const uint32_t lo = u >> 16, hi = lo + 1;  // toward zero, and one step away from zero
  const double d_lo = std::fabs(double(f) - fd_emul_bf16_value(lo));
  const double d_hi = std::fabs(fd_emul_bf16_value(hi) - double(f));
  const bool up = d_hi < d_lo || (d_hi == d_lo && (lo & 1u));
  return __nv_bfloat16{uint16_t(up ? hi : lo)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
