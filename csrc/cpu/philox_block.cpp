// The CPU kernels' in-kernel Philox noise (philox_block.h). The rounds were two thirds of its cost: a compiler
// vectorising philox_round's 32 x 32 -> 64-bit products over structure-of-arrays counters shuffles every
// product between 32- and 64-bit lanes (~2 ns a word with AVX2), so where the CPU has AVX2 they run here
// on eight counters a register: vpmuludq on the even and the odd lanes, the high and low halves put back
// by blends (~0.8-1.0 ns a word). The normals are made by normals_of_words in each target clone.
#include "philox_block.h"

#include "fastdiff/step.cuh"
#include "target_clones.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FD_PHILOX_AVX2 1
#endif

namespace fastdiff {
namespace cpu {
namespace {

#if defined(FD_PHILOX_AVX2)
constexpr int kVectors = kNoiseGroups / 8;

// lo and hi halves of the products m * c of eight lanes.
__attribute__((target("avx2"))) FD_INLINE void mulhilo8(__m256i c, __m256i m, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(c, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_words of the block, the rounds eight counters a register (philox_round on each lane). The block's
// counters g0 + g share the high word g0 >> 32 (the caller checked that the low word does not wrap).
__attribute__((target("avx2"))) void words_avx2(uint64_t seed, uint64_t g0, uint32_t step, uint32_t domain,
                                                PhiloxBlock& w) {
  __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  const __m256i lanes =
      _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(g0))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * v));
    c1[v] = _mm256_set1_epi32(int(uint32_t(g0 >> 32)));
    c2[v] = _mm256_set1_epi32(int(step));
    c3[v] = _mm256_set1_epi32(int(domain));
  }
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxM0)), m1 = _mm256_set1_epi32(int(kPhiloxM1));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const __m256i key0 = _mm256_set1_epi32(int(k0)), key1 = _mm256_set1_epi32(int(k1));
    for (int v = 0; v < kVectors; ++v) {  // philox_round
      __m256i lo0, hi0, lo1, hi1;
      mulhilo8(c0[v], m0, lo0, hi0);
      mulhilo8(c2[v], m1, lo1, hi1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
      c1[v] = lo1;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
      c3[v] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int v = 0; v < kVectors; ++v) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.c0 + 8 * v), c0[v]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.c1 + 8 * v), c1[v]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.c2 + 8 * v), c2[v]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.c3 + 8 * v), c3[v]);
  }
}

bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes;
}
#endif

FD_CLONES void normals(const PhiloxBlock& w, float (&z)[kNoiseBlock]) {
  normals_of_words<kNoiseGroups>(w.c0, w.c1, w.c2, w.c3, z);
}

}  // namespace

void philox_block_words(uint64_t seed, int64_t i0, uint32_t step, uint32_t domain, PhiloxBlock& w) {
  const uint64_t g0 = uint64_t(i0 / 4);
#if defined(FD_PHILOX_AVX2)
  if (has_avx2() && uint32_t(g0) <= 0xFFFFFFFFu - (kNoiseGroups - 1)) return words_avx2(seed, g0, step, domain, w);
#endif
  philox_words<kNoiseGroups>(seed, g0, step, domain, w.c0, w.c1, w.c2, w.c3);
}

void philox_block_normals(uint64_t seed, int64_t i0, uint32_t step, uint32_t domain, float (&z)[kNoiseBlock]) {
  PhiloxBlock w;
  philox_block_words(seed, i0, step, domain, w);
  normals(w, z);
}

}  // namespace cpu
}  // namespace fastdiff
