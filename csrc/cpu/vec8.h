// Eight floats as one GCC/Clang vector (`f8`: a native register in the AVX2 and AVX-512 clones, two SSE
// registers in the baseline one), loaded from and stored to each storage dtype by common.cuh's own
// conversions instantiated on vectors of lanes (the same code as one element's, so the same values).
// Every clone vectorises them (F16C's instructions would need per-clone sources, and a compiler's generic
// _Float16 vectors convert lane by lane).
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

// Square roots lane by lane (vsqrtps in the AVX2 and AVX-512 clones: no errno, -fno-math-errno).
FD_INLINE f8 sqrt8(f8 v) {
  for (int l = 0; l < 8; ++l) v[l] = __builtin_sqrtf(v[l]);
  return v;
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
    return (f8)half_to_float_bits<f8>(__builtin_convertvector(h, u32x8));
  }
}

// Stores v at dst (streaming stores when `nt`: dst 16-byte aligned).
template <typename T>
FD_INLINE void store8(T* dst, f8 v, bool nt) {
  if constexpr (std::is_same_v<T, float>) {
    if (!nt) {
      std::memcpy(dst, &v, sizeof(v));
      return;
    }
    u16x8 half[2];  // 16 bytes each
    std::memcpy(half, &v, sizeof(v));
    put16(dst, half[0], true);
    put16(dst + 4, half[1], true);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    put16(dst, __builtin_convertvector(float_to_bf16_bits((u32x8)v), u16x8), nt);
  } else {
    put16(dst, __builtin_convertvector(float_to_half_bits<f8, u32x8>(v), u16x8), nt);
  }
}

}  // namespace cpu
}  // namespace fastdiff
