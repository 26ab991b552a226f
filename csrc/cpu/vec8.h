// Eight floats as one GCC/Clang vector (`f8`: a native register in the AVX2 and AVX-512 clones, two SSE
// registers in the baseline one), loaded from and stored to each storage dtype with integer vector code:
// to_float / from_float of fastdiff/common.cuh lane by lane, each branch a select, so the same values
// (exact widening; round to nearest even, overflow to inf, NaN kept NaN). Every clone vectorises it (F16C's
// conversions would need per-clone source, and a compiler's generic _Float16 vectors go lane by lane).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fastdiff/common.cuh"

namespace fastdiff {
namespace cpu {

typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

FD_INLINE u32x8 splat(uint32_t v) { return u32x8{} + v; }

// binary16 bits (zero-extended) -> binary32, as to_float(half_t).
FD_INLINE f8 half_to_float(u32x8 h) {
  u32x8 o = (h & 0x7fffu) << 13;  // exponent and mantissa in place
  const u32x8 exp = o & splat(0x7c00u << 13);
  o += (127u - 15u) << 23;  // rebias
  const u32x8 special = (u32x8)(exp == (0x7c00u << 13));
  o += special & splat((128u - 16u) << 23);  // inf / NaN
  const u32x8 sub = (u32x8)((f8)(o + (1u << 23)) - (f8)splat(113u << 23));  // zero / subnormal
  o = exp == 0 ? sub : o;
  return (f8)(o | ((h & 0x8000u) << 16));
}

// binary32 -> binary16 bits (in the low half of each lane), as from_float<half_t>.
FD_INLINE u32x8 float_to_half(f8 v) {
  u32x8 u = (u32x8)v;
  const u32x8 sign = u & 0x80000000u;
  u ^= sign;
  const u32x8 big = u > 0x7f800000u ? splat(0x7e00u) : splat(0x7c00u);             // >= 65536: inf, or NaN
  const u32x8 sub = (u32x8)((f8)u + 0.5f) - (126u << 23);                         // subnormal or zero
  const u32x8 normal = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const u32x8 o = u >= (143u << 23) ? big : u < (113u << 23) ? sub : normal;
  return (o & 0xffffu) | (sign >> 16);
}

// Stores 16 bytes at dst: a streaming store when `nt` (dst then 16-byte aligned).
template <typename B>
FD_INLINE void put16(void* dst, B b, bool nt) {
  static_assert(sizeof(B) == 16, "16 bytes");
#if defined(__x86_64__)
  if (nt) {
    __m128i x;
    std::memcpy(&x, &b, 16);
    _mm_stream_si128(static_cast<__m128i*>(dst), x);
    return;
  }
#endif
  std::memcpy(dst, &b, 16);
}

template <typename T>
FD_INLINE f8 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    f8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    return (f8)(__builtin_convertvector(h, u32x8) << 16);
  } else {
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    return half_to_float(__builtin_convertvector(h, u32x8));
  }
}

// Stores v at dst (streaming stores when `nt`: dst 16-byte aligned).
template <typename T>
FD_INLINE void store8(T* dst, f8 v, bool nt) {
  if constexpr (std::is_same_v<T, float>) {
    uint8_t b[32];
    std::memcpy(b, &v, 32);
    u16x8 lo, hi;  // 16 bytes each
    std::memcpy(&lo, b, 16);
    std::memcpy(&hi, b + 16, 16);
    put16(dst, lo, nt);
    put16(dst + 4, hi, nt);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    const u32x8 u = (u32x8)v;
    const u32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const u32x8 quiet = (u >> 16) | 0x40u;  // NaN: kept NaN, as from_float<bf16_t>
    const u32x8 r = (u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
    put16(dst, __builtin_convertvector(r, u16x8), nt);
  } else {
    put16(dst, __builtin_convertvector(float_to_half(v), u16x8), nt);
  }
}

}  // namespace cpu
}  // namespace fastdiff
