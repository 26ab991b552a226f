// In-kernel Philox noise of the CPU kernels, a block of kNoiseBlock elements of a sample at a time: the
// words of the block's 64 counters (the ten rounds in AVX2 where the CPU has it, else as philox_words
// writes them), then the normals (normals_of_words, vectorised by each target clone). The same words and
// normals as philox_lanes (fastdiff/step.cuh): the rounds are integer arithmetic.
#pragma once

#include <cstdint>

namespace fastdiff {
namespace cpu {

constexpr int kNoiseBlock = 256;               // elements a block
constexpr int kNoiseGroups = kNoiseBlock / 4;  // Philox counters a block

struct PhiloxBlock {
  alignas(32) uint32_t c0[kNoiseGroups];
  alignas(32) uint32_t c1[kNoiseGroups];
  alignas(32) uint32_t c2[kNoiseGroups];
  alignas(32) uint32_t c3[kNoiseGroups];
};

// The words of elements [i0, i0 + kNoiseBlock) of a sample (i0 a multiple of 4).
void philox_block_words(uint64_t seed, int64_t i0, uint32_t step, uint32_t domain, PhiloxBlock& w);

// The standard normals of elements [i0, i0 + kNoiseBlock) of a sample (i0 a multiple of 4).
void philox_block_normals(uint64_t seed, int64_t i0, uint32_t step, uint32_t domain, float (&z)[kNoiseBlock]);

}  // namespace cpu
}  // namespace fastdiff
