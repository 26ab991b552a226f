// torch.randn from a CPU torch.Generator, reproduced in parallel (fastdiff/noise.py says when it is used).
//
// torch's CPU generator is MT19937; a float32 randn of n >= 16 elements (torch's normal_fill) takes n
// words, one 24-bit uniform each (u = (word & 0xffffff) * 2^-24), then Box-Muller over every 16 elements
// in place: for j < 8, r = sqrt(-2 log(1 - u[j])), theta = 2pi * u[j + 8], out[j] = r cos(theta),
// out[j + 8] = r sin(theta); where 16 does not divide n, 16 fresh words redo the last 16 elements. torch
// runs all of it on one thread; here one thread only copies and twists the state words (the serial part of
// MT19937), and all threads temper them and make the normals, 8 pairs a vector. The values agree with
// torch's to rounding (its log/sin/cos are its own), and the state comes back advanced exactly as torch
// advances it (the words consumed, `left` and `next`).
//
// `state`: the bytes of torch.Generator.get_state() (CPUGeneratorImplStateLegacy): uint64 seed at 0,
// int32 left at 8, int32 seeded at 12, uint64 next at 16, uint64 state[624] at 24 (one 32-bit word each).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fastdiff/philox.cuh"

#if defined(FASTDIFF_WITH_OPENMP)
#include <omp.h>
#endif

#include "target_clones.h"

namespace fastdiff {
namespace cpu {
namespace {

constexpr int kN = 624, kM = 397;                  // MT19937's state words and its middle word
constexpr int64_t kParallelMin = 8192;             // elements below which one thread makes the normals
constexpr int64_t kTask = 4096;                    // elements per task (a multiple of 16)
constexpr size_t kLeftAt = 8, kNextAt = 16, kWordsAt = 24, kStateBytes = kWordsAt + 8 * kN;

FD_INLINE uint32_t twist_word(uint32_t far, uint32_t a, uint32_t b) {
  const uint32_t y = (a & 0x80000000u) | (b & 0x7fffffffu);
  return far ^ (y >> 1) ^ ((0u - (b & 1u)) & 0x9908b0dfu);
}

// The state after one MT19937 twist of `s`, into `t` (t[i] for i >= kN - kM reads the new t[i - (kN - kM)]).
FD_CLONES void twist(const uint32_t* __restrict s, uint32_t* __restrict t) {
  for (int i = 0; i < kN - kM; ++i) t[i] = twist_word(s[i + kM], s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) t[i] = twist_word(t[i - (kN - kM)], s[i], s[i + 1]);
  t[kN - 1] = twist_word(t[kM - 1], s[kN - 1], t[0]);
}

FD_INLINE float uniform24(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return float(y & 0xffffffu) * 0x1p-24f;
}

// cos and sin of theta = 2pi * u as torch rounds it (a float product), reduced by Cephes' three-part pi/4.
FD_INLINE void sincos_pos(float x, float& c, float& s) {
  int j = int(x * 1.27323954473516f);  // x * 4/pi, x >= 0
  j = (j + 1) & ~1;                    // even octant: x = j * pi/4 + a, |a| <= pi/4
  const float y = float(j);
  const float a = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  sincos_quadrant(a, j >> 1, c, s);
}

// The 16 normals of 16 untempered words `w` into `out`, which may be `w`'s memory: the uniforms of all 16
// are made before any normal is written (and each normal depends on the words at its own place, so no
// store can move above the load of the word it overwrites).
FD_INLINE void normal16(const uint32_t* w, float* out) {
  float u1[8], u2[8];
  for (int j = 0; j < 8; ++j) {
    u1[j] = 1.0f - uniform24(w[j]);
    u2[j] = uniform24(w[j + 8]);
  }
  for (int j = 0; j < 8; ++j) {
    const float r = sqrtf(-2.0f * log_pos(u1[j]));
    float c, s;
    sincos_pos(6.28318530717958648f * u2[j], c, s);
    out[j] = r * c;
    out[j + 8] = r * s;
  }
}

FD_CLONES void normals(uint32_t* w, int64_t chunks) {
  for (int64_t i = 0; i < chunks; ++i) normal16(w + 16 * i, reinterpret_cast<float*>(w + 16 * i));
}

// The word stream of a CPU generator: `take` copies its next words out, twisting the state (two buffers,
// `s` the current one) when torch would: when a word is asked for with left == 1.
struct Stream {
  uint32_t buf[2][kN];
  uint32_t* s = buf[0];
  int64_t left = 1, next = 0;

  void take(int64_t count, uint32_t* dst) {
    while (count > 0) {
      if (left == 1) {
        uint32_t* t = s == buf[0] ? buf[1] : buf[0];
        twist(s, t);
        s = t;
        left = kN + 1;
        next = 0;
      }
      const int64_t m = std::min(count, left - 1);
      std::memcpy(dst, s + next, size_t(m) * sizeof(uint32_t));
      dst += m;
      count -= m;
      next += m;
      left -= m;
    }
  }
};

FD_INLINE void pause() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

void generator_randn(uint8_t* state, float* out, int64_t n) {
  if (n < 16) throw std::invalid_argument("generator_randn: n must be >= 16 (torch draws fewer otherwise), got " +
                                          std::to_string(n));
  Stream g;
  int32_t left32;
  uint64_t next64;
  std::memcpy(&left32, state + kLeftAt, 4);
  std::memcpy(&next64, state + kNextAt, 8);
  if (left32 < 1 || left32 > kN || (left32 > 1 && int64_t(next64) + left32 != kN + 1))
    throw std::invalid_argument("generator_randn: not a CPU generator state (left " + std::to_string(left32) +
                                ", next " + std::to_string(next64) + ")");
  g.left = left32;
  g.next = int64_t(next64);
  for (int i = 0; i < kN; ++i) {
    uint64_t v;
    std::memcpy(&v, state + kWordsAt + 8 * size_t(i), 8);
    g.s[i] = uint32_t(v);
  }

  // Thread 0 copies the words in order into `out` (where their normals will be), publishing how many are
  // there after each task's worth; every thread, thread 0 once it is done, takes tasks in order and makes
  // their normals once their words are in. One thread: all the words, then all the normals.
  uint32_t* w = reinterpret_cast<uint32_t*>(out);
  uint32_t tail[16];
  const int64_t chunks = n / 16, tasks = (chunks * 16 + kTask - 1) / kTask;
  std::atomic<int64_t> ready{0}, claimed{0};
#if defined(FASTDIFF_WITH_OPENMP)
#pragma omp parallel if (n >= kParallelMin)
#endif
  {
#if defined(FASTDIFF_WITH_OPENMP)
    const bool producer = omp_get_thread_num() == 0;
#else
    const bool producer = true;
#endif
    if (producer) {
      for (int64_t o = 0; o < n; o += kTask) {
        g.take(std::min(kTask, n - o), w + o);
        ready.store(o + kTask, std::memory_order_release);
      }
      if (n % 16 != 0) g.take(16, tail);
    }
    for (int64_t k; (k = claimed.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      while (ready.load(std::memory_order_acquire) < (k + 1) * kTask) pause();
      normals(w + k * kTask, std::min(kTask / 16, chunks - k * (kTask / 16)));
    }
  }
  if (n % 16 != 0) normal16(tail, out + n - 16);

  left32 = int32_t(g.left);
  next64 = uint64_t(g.next);
  std::memcpy(state + kLeftAt, &left32, 4);
  std::memcpy(state + kNextAt, &next64, 8);
  for (int i = 0; i < kN; ++i) {
    const uint64_t v = g.s[i];
    std::memcpy(state + kWordsAt + 8 * size_t(i), &v, 8);
  }
}

size_t generator_state_bytes() { return kStateBytes; }

}  // namespace cpu
}  // namespace fastdiff
