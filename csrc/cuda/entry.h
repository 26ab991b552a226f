// The CUDA launchers' entry points (step.cu, gmm.cu) as bindings.cpp calls them; each returns a
// cudaError_t code (0 on success). Declarations only and no include guard: tests/cuda_emul/adapter.cpp
// includes it twice, the second time with the namespace renamed (the emulated kernels' copy).
#include <cstdint>

namespace fastdiff {
struct StepParams;
struct GmmNoiseParams;
struct GmmScoreParams;
namespace cuda {
int step(const StepParams& p, int device, uintptr_t stream);
int gmm_noise(const GmmNoiseParams& p, int device, uintptr_t stream);
int gmm_score(const GmmScoreParams& p, int device, uintptr_t stream);
const char* error_string(int code);
int device_count(int* count);
}  // namespace cuda
}  // namespace fastdiff
