// Grid sizes the CUDA launchers cap at, shared by them. Samples beyond the cap are walked by the blocks
// (blockIdx + gridDim, ...). FASTDIFF_CUDA_GRID_CAP lowers both caps: the host emulation of the kernels
// (tests/cuda_emul) builds with a cap of 2, so that every batch above 2 takes the walking path, which a GPU
// takes only past 65535 samples.
#pragma once
#include <cstdint>

namespace fastdiff {
namespace cuda {

#if defined(FASTDIFF_CUDA_GRID_CAP)
constexpr int64_t kMaxGridY = FASTDIFF_CUDA_GRID_CAP;        // step, gmm_noise: one grid row per sample
constexpr int64_t kMaxRowBlocks = FASTDIFF_CUDA_GRID_CAP;    // gmm_score: one block per sample row
#else
constexpr int64_t kMaxGridY = 65535;                         // the hardware's gridDim.y limit
constexpr int64_t kMaxRowBlocks = int64_t(1) << 20;
#endif

}  // namespace cuda
}  // namespace fastdiff
