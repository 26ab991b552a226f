// bindings.cpp calls fastdiff::cuda::*. The emulated kernels are compiled with __CUDA_ARCH__ defined (so the
// shared headers take their device paths) inside namespace fastdiff_device (-Dfastdiff=fastdiff_device),
// which keeps those device definitions of the shared inline functions apart from the host ones of the CPU
// kernels in this module. These forwarders connect the two; the parameter structs are the same source, so
// the same layout.
#define fastdiff fastdiff_device
#include "entry.h"
#undef fastdiff

#include "entry.h"
#include "fastdiff/gmm.cuh"
#include "fastdiff/step.cuh"

namespace fastdiff {
namespace cuda {
namespace dev = fastdiff_device;

int step(const StepParams& p, int device, uintptr_t stream) {
  return dev::cuda::step(reinterpret_cast<const dev::StepParams&>(p), device, stream);
}
int gmm_noise(const GmmNoiseParams& p, int device, uintptr_t stream) {
  return dev::cuda::gmm_noise(reinterpret_cast<const dev::GmmNoiseParams&>(p), device, stream);
}
int gmm_score(const GmmScoreParams& p, int device, uintptr_t stream) {
  return dev::cuda::gmm_score(reinterpret_cast<const dev::GmmScoreParams&>(p), device, stream);
}
const char* error_string(int code) { return dev::cuda::error_string(code); }
int device_count(int* count) { return dev::cuda::device_count(count); }
}  // namespace cuda
}  // namespace fastdiff
