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

// The host's conversions, written once for one lane (U = uint32_t, F = float) and for a CPU vector of lanes
// (csrc/cpu/vec8.h: GCC/Clang vector types): every branch is a select, which both forms compile.
template <typename To, typename From>
FD_HD FD_INLINE To bit_cast_lanes(From v) {
  To t;
  std::memcpy(&t, &v, sizeof(t));
  return t;
}

// IEEE binary16 bits -> binary32 bits, exact (subnormals via a magic subtraction).
template <typename F, typename U>
FD_HD FD_INLINE U half_to_float_bits(U h) {
  U o = (h & 0x7fffu) << 13;  // exponent and mantissa in place
  const U exp = o & (U{} + (0x7c00u << 13));
  o += (127u - 15u) << 23;  // rebias
  o += exp == (0x7c00u << 13) ? U{} + ((128u - 16u) << 23) : U{};  // inf / NaN
  const U sub = bit_cast_lanes<U>(bit_cast_lanes<F>(o + (1u << 23)) - bit_cast_lanes<F>(U{} + (113u << 23)));
  o = exp == 0u ? sub : o;  // zero / subnormal
  return o | ((h & 0x8000u) << 16);
}

// binary32 -> binary16 bits (the low 16 of each lane): round to nearest even, overflow to inf, NaN stays NaN.
template <typename F, typename U>
FD_HD FD_INLINE U float_to_half_bits(F f) {
  U u = bit_cast_lanes<U>(f);
  const U sign = u & 0x80000000u;
  u ^= sign;
  const U big = u > 0x7f800000u ? U{} + 0x7e00u : U{} + 0x7c00u;            // >= 65536: inf, or NaN
  const U sub = bit_cast_lanes<U>(bit_cast_lanes<F>(u) + 0.5f) - (126u << 23);  // subnormal or zero: adding
                                                                                // 0.5 aligns and rounds
  const U normal = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const U o = u >= (143u << 23) ? big : u < (113u << 23) ? sub : normal;
  return (o & 0xffffu) | (sign >> 16);
}

// binary32 bits -> bfloat16 bits (the low 16 of each lane): round to nearest even; NaN stays NaN.
template <typename U>
FD_HD FD_INLINE U float_to_bf16_bits(U u) {
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
}

FD_HD FD_INLINE float to_float(half_t v) { return bits_float(half_to_float_bits<float>(uint32_t(v.bits))); }

template <typename T> FD_HD FD_INLINE T from_float(float f);
template <> FD_HD FD_INLINE float from_float<float>(float f) { return f; }
template <> FD_HD FD_INLINE bf16_t from_float<bf16_t>(float f) {
  return bf16_t{uint16_t(float_to_bf16_bits(float_bits(f)))};
}
template <> FD_HD FD_INLINE half_t from_float<half_t>(float f) {
  return half_t{uint16_t(float_to_half_bits<float, uint32_t>(f))};
}
#endif  // __CUDA_ARCH__

}  // namespace fastdiff
