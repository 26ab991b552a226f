// A CUDA execution model on the host, for testing fastdiff's CUDA kernels on a machine without a GPU.
// tests/cuda_emul/build.py compiles csrc/cuda/*.cu as C++ against this header (it stands in for the
// toolkit's cuda_runtime.h) after rewriting each `kernel<<<grid, block, smem, stream>>>(args)` into
// `fd_emul::launch(...)`, `extern __shared__` arrays into the launch's dynamic shared memory and other
// `__shared__` variables into block_shared's storage.
//
// The model: blocks run one after another; the threads of a block are fibers (ucontext) on one OS
// thread, switched only at __syncthreads and warp shuffles, so a block's shared memory is one static copy,
// poisoned at each block's start, and threads run in a random order between barriers (run_block).
// __syncthreads waits for every thread of the block, and one that some thread exits without reaching
// is reported, as is a shuffle that not all 32 lanes of a warp reach (both undefined behaviour on a GPU).
// Launch configurations are checked against the limits of the hardware (grid.y <= 65535, 1024 threads a
// block, 48 KiB of dynamic shared memory without opt-in). The units are compiled with __CUDA_ARCH__ defined
// (build.py), so the shared headers' device paths run, on the stand-in intrinsics at the end of this file
// and in cuda_fp16.h / cuda_bf16.h. What it does not model: memory ordering between blocks, and
// warp-synchronous code without shuffles.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorLaunchFailure = 719 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace fd_emul {

enum State { kReady, kBlockWait, kWarpWait, kDone };
constexpr size_t kStack = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = kDone;
};

struct Device {
  std::vector<Fiber> fibers;
  ucontext_t main;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::vector<uint64_t> lanes;        // one value per thread: the warp shuffles' exchange
  std::vector<unsigned char> dynamic;  // the launch's dynamic shared memory
  std::vector<std::pair<void*, size_t>> shared;  // every static __shared__ variable: poisoned per block
  std::vector<int> order;                        // the order threads run in, shuffled every phase
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  cudaError_t last = cudaSuccess;
  std::string message;
  int current_device = 0;
};

inline Device& device() {
  static Device d;
  return d;
}

inline void set_thread(int t) {
  threadIdx = uint3(unsigned(t) % blockDim.x, unsigned(t) / blockDim.x % blockDim.y,
                    unsigned(t) / (blockDim.x * blockDim.y));
}

// Back to the scheduler, waiting in `s`.
inline void wait(State s) {
  Device& d = device();
  Fiber& f = d.fibers[d.current];
  f.state = s;
  swapcontext(&f.ctx, &d.main);  // the scheduler sets threadIdx before it resumes this thread
}

inline void entry() {
  Device& d = device();
  (*d.body)();
  d.fibers[d.current].state = kDone;  // returns to d.main through uc_link
}

inline bool fail(cudaError_t code, std::string what) {
  Device& d = device();
  d.last = code;
  d.message = std::move(what);
  return false;
}

// Runs every thread of the current block to completion; false (with the error) on a barrier or shuffle
// that not every thread it waits for reaches.
inline bool run_block(int threads) {
  Device& d = device();
  if (int(d.fibers.size()) < threads) d.fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = d.fibers[t];
    if (f.stack.empty()) f.stack.resize(kStack);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &d.main;
    makecontext(&f.ctx, entry, 0);
    f.state = kReady;
  }
  // Shared memory starts as garbage on a GPU: all-ones bytes here (NaN floats, -1 ints, wild pointers).
  for (auto& [ptr, size] : d.shared) std::memset(ptr, 0xff, size);
  std::memset(d.dynamic.data(), 0xff, d.dynamic.size());
  d.order.resize(threads);
  for (int t = 0; t < threads; ++t) d.order[t] = t;
  const std::string where = "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
                            std::to_string(blockIdx.z) + ")";
  for (;;) {
    // Between two barriers threads run in a fresh random order (a fixed-seed generator: reproducible), so a
    // read of shared memory that another thread writes in the same phase - a missing __syncthreads - sees
    // the poison or a stale value in some blocks, whichever thread writes.
    for (int i = threads - 1; i > 0; --i) {
      d.rng = d.rng * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(d.order[i], d.order[int((d.rng >> 33) % uint64_t(i + 1))]);
    }
    for (int t : d.order) {
      if (d.fibers[t].state != kReady) continue;
      d.current = t;
      set_thread(t);
      swapcontext(&d.main, &d.fibers[t].ctx);
    }
    int done = 0, at_barrier = 0;
    for (int t = 0; t < threads; ++t) {
      done += d.fibers[t].state == kDone;
      at_barrier += d.fibers[t].state == kBlockWait;
    }
    if (done == threads) return true;
    bool released = false;
    if (at_barrier + done == threads) {
      if (done) return fail(cudaErrorLaunchFailure, where + ": __syncthreads() not reached by " +
                            std::to_string(done) + " exited threads");
      for (int t = 0; t < threads; ++t) d.fibers[t].state = kReady;
      released = true;
    }
    for (int w = 0; w * 32 < threads; ++w) {  // a warp whose lanes all wait at a shuffle goes on
      const int lo = w * 32, hi = std::min(threads, lo + 32);
      int waiting = 0;
      for (int t = lo; t < hi; ++t) waiting += d.fibers[t].state == kWarpWait;
      if (waiting == hi - lo) {
        for (int t = lo; t < hi; ++t) d.fibers[t].state = kReady;
        released = true;
      }
    }
    if (!released)
      return fail(cudaErrorLaunchFailure, where + ": deadlock (a warp shuffle not reached by all 32 lanes, or "
                  "threads waiting at different barriers)");
  }
}

inline bool check(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    return fail(cudaErrorInvalidConfiguration, "block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    return fail(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + ", " +
                std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  if (smem > 48 * 1024)
    return fail(cudaErrorInvalidConfiguration, std::to_string(smem) + " bytes of dynamic shared memory");
  return true;
}

// kernel<<<grid, block, smem, stream>>>(args), rewritten by build.py as launch([&] { kernel(args); }, ...).
template <typename Body>
void launch(Body body, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  Device& d = device();
  if (!check(grid, block, smem)) return;
  const std::function<void()> fn = body;
  d.body = &fn;
  gridDim = grid;
  blockDim = block;
  const int threads = int(block.x * block.y * block.z);
  d.lanes.assign(threads, 0);
  d.dynamic.resize(smem + 16);  // poisoned by run_block
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3(x, y, z);
        if (!run_block(threads)) return;
      }
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(device().dynamic.data());
}

// `__shared__ T name;` (T may be an array type), rewritten by build.py as `auto& name = block_shared<T, id>();`:
// one variable for the block (blocks run in turn), poisoned at every block's start.
template <typename T, int Id>
T& block_shared() {
  static T storage;
  static const bool registered = [] {
    device().shared.emplace_back(&storage, sizeof(T));
    std::memset(&storage, 0xff, sizeof(T));
    return true;
  }();
  (void)registered;
  return storage;
}

}  // namespace fd_emul

inline void __syncthreads() { fd_emul::wait(fd_emul::kBlockWait); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
  fd_emul::Device& d = fd_emul::device();
  const int t = d.current, lane = t & 31;
  if (mask != 0xffffffffu) fd_emul::fail(cudaErrorLaunchFailure, "partial-warp shuffle masks are not modelled");
  std::memcpy(&d.lanes[t], &v, sizeof(T));
  fd_emul::wait(fd_emul::kWarpWait);  // every lane has written
  T r = v;
  if (lane + delta < 32) std::memcpy(&r, &d.lanes[t + delta], sizeof(T));
  fd_emul::wait(fd_emul::kWarpWait);  // every lane has read
  return r;
}

// The bit casts and integer intrinsics of fastdiff's device paths (__CUDA_ARCH__ is defined for them).
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fd_emul::device().last;
  fd_emul::device().last = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  static std::string s;
  s = e == cudaSuccess ? std::string("no error") : "emulated CUDA: " + fd_emul::device().message;
  return s.c_str();
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = fd_emul::device().current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  fd_emul::device().current_device = dev;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
