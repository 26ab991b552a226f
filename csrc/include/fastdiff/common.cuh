// Macros and dtype conversions shared by the CPU (C++/OpenMP) and CUDA builds. Torch-free.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define FD_HD __host__ __device__
#define FD_INLINE __forceinline__
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_HD
#define FD_INLINE inline __attribute__((always_inline))
#define FD_UNROLL
#endif

namespace fastdiff {

// Storage types. 16-bit floats are carried as their bits so that this header needs no CUDA headers;
// arithmetic is always in fp32 (docs/architecture.md, "Contracts").
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

FD_HD FD_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
FD_HD FD_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

FD_HD FD_INLINE float to_float(float v) { return v; }
FD_HD FD_INLINE float to_float(bf16_t v) { return bits_float(uint32_t(v.bits) << 16); }

#if defined(__CUDA_ARCH__)
// On the GPU the conversions are single instructions.
__device__ FD_INLINE float to_float(half_t v) { return __half2float(__ushort_as_half(v.bits)); }
template <typename T> __device__ FD_INLINE T from_float(float f);
template <> __device__ FD_INLINE float from_float<float>(float f) { return f; }
template <> __device__ FD_INLINE half_t from_float<half_t>(float f) {
  return half_t{__half_as_ushort(__float2half_rn(f))};
}
template <> __device__ FD_INLINE bf16_t from_float<bf16_t>(float f) {
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
}
#else

// IEEE binary16 -> binary32, exact, branch-light (subnormals via a magic subtraction).
FD_HD FD_INLINE float to_float(half_t v) {
  const uint32_t h = v.bits;
  uint32_t o = (h & 0x7fffu) << 13;        // exponent and mantissa in place
  const uint32_t exp = o & (0x7c00u << 13);
  o += (127u - 15u) << 23;                 // rebias
  if (exp == (0x7c00u << 13)) {            // Inf / NaN
    o += (128u - 16u) << 23;
  } else if (exp == 0) {                   // zero / subnormal
    o += 1u << 23;
    o = float_bits(bits_float(o) - bits_float(113u << 23));
  }
  return bits_float(o | ((h & 0x8000u) << 16));
}

template <typename T> FD_HD FD_INLINE T from_float(float f);
template <> FD_HD FD_INLINE float from_float<float>(float f) { return f; }

// binary32 -> bfloat16, round to nearest even; NaN stays NaN.
template <> FD_HD FD_INLINE bf16_t from_float<bf16_t>(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};
  return bf16_t{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// binary32 -> binary16, round to nearest even, overflow to Inf, NaN stays NaN.
template <> FD_HD FD_INLINE half_t from_float<half_t>(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= (143u << 23)) {                       // >= 65536: Inf, or NaN
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {                 // result is subnormal or zero
    const float g = bits_float(u) + bits_float(126u << 23);   // 0.5: aligns the mantissa, rounds
    o = uint16_t(float_bits(g) - (126u << 23));
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu + odd;
    o = uint16_t(u >> 13);
  }
  return half_t{uint16_t(o | (sign >> 16))};
}
#endif  // __CUDA_ARCH__

}  // namespace fastdiff
