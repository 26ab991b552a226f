// Streaming (non-temporal) stores, shared by the CPU launchers: outputs too big to stay in cache skip the
// read-for-ownership of every output line (a fifth to a third of a step's traffic). SSE2 only, so every
// target clone has them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fastdiff/common.cuh"

namespace fastdiff {
namespace cpu {

// Copies nbytes from src to dst: with streaming stores when `nt` and dst and nbytes are 16-byte aligned,
// else plainly.
FD_INLINE void put(void* dst, const void* src, size_t nbytes, bool nt) {
#if defined(__x86_64__)
  if (nt && reinterpret_cast<uintptr_t>(dst) % 16 == 0 && nbytes % 16 == 0) {
    for (size_t b = 0; b < nbytes; b += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(dst) + b),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(src) + b)));
    return;
  }
#endif
  std::memcpy(dst, src, nbytes);
}

// Streaming stores are weakly ordered: this makes them visible before the op returns.
FD_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace fastdiff
