// fastdiff._C: raw pointers, sizes and a stream handle in; no libtorch, so one binary serves every torch.
#include <pybind11/pybind11.h>

#include <iterator>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastdiff/gmm.cuh"
#include "fastdiff/step.cuh"

#if defined(FASTDIFF_WITH_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace fastdiff {
namespace cpu {
void step(const StepParams& p);
int64_t gmm_noise(const GmmNoiseParams& p);  // returns the number of bad given ids
void gmm_score(const GmmScoreParams& p);
void generator_randn(uint8_t* state, float* out, int64_t n);
size_t generator_state_bytes();
}  // namespace cpu
}  // namespace fastdiff
#if defined(FASTDIFF_WITH_CUDA)
#include "cuda/entry.h"
#endif

using fastdiff::StepParams;

// StepParams travels as one flat tuple of integers (pointers as tensor.data_ptr(), 0 = absent), in the
// order of this list, which the module exports as `step_fields`; Python builds the tuple by name in that
// order, and refuses a module whose names differ from fastdiff/layout.py's STEP_FIELDS. One tuple
// converts in ~1 us where setting 30 attributes took ~15 us per step.
#define FD_STEP_FIELDS(X)                                                                                   \
  X(batch) X(numel) X(dtype) X(x) X(e0) X(e1) X(eu0) X(eu1) X(m0) X(m1) X(m2) X(x_last) X(offset)            \
  X(component) X(delta_table) X(var_table) X(table_rows) X(noise) X(seeds) X(noise_step) X(noise_domain)      \
  X(coef) X(coef_rows) X(row) X(rows) X(rows_len) X(clamp) X(n_out) X(out0) X(out1) X(out2)

#define FD_NAME(field) #field,
static const char* kStepFields[] = {FD_STEP_FIELDS(FD_NAME)};
constexpr int kNumStepFields = sizeof(kStepFields) / sizeof(kStepFields[0]);

// One field from its integer: a pointer from an address, anything else by value.
template <typename T>
static void set_field(T& field, const py::handle& v) {
  if constexpr (std::is_pointer_v<T>) {
    field = reinterpret_cast<T>(v.cast<uintptr_t>());
  } else {
    field = v.cast<T>();
  }
}

static StepParams step_params(const py::tuple& a) {
  if (int(a.size()) != kNumStepFields)
    throw std::invalid_argument("step: expected " + std::to_string(kNumStepFields) + " parameters, got " +
                                std::to_string(a.size()));
  StepParams p;
  int i = 0;
#define FD_SET(field) set_field(p.field, a[i++]);
  FD_STEP_FIELDS(FD_SET)
  return p;
}

// The Gaussian-mixture kernels' parameters travel the same way; Python packs them by the names the module
// exports (gmm_noise_fields, gmm_score_fields).
#define FD_GMM_NOISE_FIELDS(X)                                                                              \
  X(batch) X(numel) X(n_draws) X(group) X(n_comp) X(dtype) X(cdf) X(means) X(means_d) X(stds) X(stds_d)      \
  X(noise) X(seeds) X(step) X(component_in) X(out) X(component_out)
#define FD_GMM_SCORE_FIELDS(X) \
  X(batch) X(numel) X(n_comp) X(dtype) X(x) X(means) X(inv_std) X(log_coef) X(score) X(log_prob)

static const char* kGmmNoiseFields[] = {FD_GMM_NOISE_FIELDS(FD_NAME)};
static const char* kGmmScoreFields[] = {FD_GMM_SCORE_FIELDS(FD_NAME)};

template <size_t N>
static void check_arity(const py::tuple& a, const char* (&)[N], const char* op) {
  if (a.size() != N)
    throw std::invalid_argument(std::string(op) + ": expected " + std::to_string(N) + " parameters, got " +
                                std::to_string(a.size()));
}

static fastdiff::GmmNoiseParams gmm_noise_params(const py::tuple& a) {
  check_arity(a, kGmmNoiseFields, "gmm_noise");
  fastdiff::GmmNoiseParams p;
  int i = 0;
  FD_GMM_NOISE_FIELDS(FD_SET)
  return p;
}

static fastdiff::GmmScoreParams gmm_score_params(const py::tuple& a) {
  check_arity(a, kGmmScoreFields, "gmm_score");
  fastdiff::GmmScoreParams p;
  int i = 0;
  FD_GMM_SCORE_FIELDS(FD_SET)
  return p;
}

static py::list name_list(const char* const* names, size_t n) {
  py::list out;
  for (size_t i = 0; i < n; ++i) out.append(names[i]);
  return out;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff native kernels (C++/OpenMP, and CUDA when built with nvcc)";

  py::list fields;
  for (const char* f : kStepFields) fields.append(f);
  m.attr("step_fields") = fields;

  m.def(
      "step_cpu",
      [](const py::tuple& args) {
        const StepParams p = step_params(args);
        py::gil_scoped_release nogil;
        fastdiff::cpu::step(p);
      },
      "Run one step on host memory (OpenMP). `args`: the values of step_fields, in order.");

  m.attr("gmm_noise_fields") = name_list(kGmmNoiseFields, std::size(kGmmNoiseFields));
  m.attr("gmm_score_fields") = name_list(kGmmScoreFields, std::size(kGmmScoreFields));
  m.def(
      "gmm_noise_cpu",
      [](const py::tuple& args) {
        const fastdiff::GmmNoiseParams p = gmm_noise_params(args);
        py::gil_scoped_release nogil;
        return fastdiff::cpu::gmm_noise(p);
      },
      "Draw Gaussian-mixture samples on host memory. `args`: the values of gmm_noise_fields, in order. Returns "
      "the number of given component ids outside [0, n_comp) (read as 0).");
  m.def(
      "gmm_score_cpu",
      [](const py::tuple& args) {
        const fastdiff::GmmScoreParams p = gmm_score_params(args);
        py::gil_scoped_release nogil;
        fastdiff::cpu::gmm_score(p);
      },
      "Gaussian-mixture score and log-density on host memory. `args`: the values of gmm_score_fields.");

  m.attr("generator_state_bytes") = fastdiff::cpu::generator_state_bytes();
  m.def(
      "generator_randn_cpu",
      [](uintptr_t state, uintptr_t out, int64_t n) {
        py::gil_scoped_release nogil;
        fastdiff::cpu::generator_randn(reinterpret_cast<uint8_t*>(state), reinterpret_cast<float*>(out), n);
      },
      "torch.randn's n >= 16 float32 normals from a CPU generator's state (the bytes of get_state(), at "
      "`state`, advanced in place) into `out` (csrc/cpu/generator_randn.cpp).");

  // The coefficient layout (fastdiff/layout.h) by name, compared with fastdiff/layout.py at load time.
  py::dict layout;
#define FD_COL(name, value) layout[name] = int(value);
  FD_COL("G", fastdiff::kG) FD_COL("AS", fastdiff::kAS) FD_COL("AX", fastdiff::kAX) FD_COL("AE0", fastdiff::kAE0)
  FD_COL("AE1", fastdiff::kAE1) FD_COL("R", fastdiff::kR) FD_COL("VAR", fastdiff::kVar) FD_COL("OUT", fastdiff::kOut)
  FD_COL("CX", fastdiff::kCX) FD_COL("CE0", fastdiff::kCE0) FD_COL("CE1", fastdiff::kCE1)
  FD_COL("CX0", fastdiff::kCX0) FD_COL("CM0", fastdiff::kCM0) FD_COL("CM1", fastdiff::kCM1)
  FD_COL("CM2", fastdiff::kCM2) FD_COL("CLAST", fastdiff::kCLast) FD_COL("COFF", fastdiff::kCOff)
  FD_COL("CDELTA", fastdiff::kCDelta) FD_COL("CZ", fastdiff::kCZ) FD_COL("PER_OUT", fastdiff::kPerOut)
  FD_COL("MAX_OUT", fastdiff::kMaxOut) FD_COL("NUM_COEF", fastdiff::kNumCoef)
#undef FD_COL
  m.attr("layout") = layout;

#if defined(FASTDIFF_WITH_OPENMP)
  m.attr("openmp") = true;
  m.def("num_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("openmp") = false;
  m.def("num_threads", []() { return 1; });
#endif

#if defined(__x86_64__) && defined(__GNUC__)
  m.def("cpu_isa", []() -> std::string {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "x86-64-v3 (AVX2)";
    return "x86-64 baseline";
  });
#else
  m.def("cpu_isa", []() -> std::string { return "portable"; });
#endif

  m.attr("cuda_archs") = std::string(FASTDIFF_CUDA_ARCHS);
#if defined(FASTDIFF_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.def(
      "step_cuda",
      [](const py::tuple& args, int device, uintptr_t stream) {
        const int err = fastdiff::cuda::step(step_params(args), device, stream);
        if (err != 0) throw std::runtime_error(std::string("fastdiff step (cuda): ") + fastdiff::cuda::error_string(err));
      },
      "Launch one step on `stream` (a cudaStream_t as an integer) of `device`.");
  m.def(
      "gmm_noise_cuda",
      [](const py::tuple& args, int device, uintptr_t stream) {
        const int err = fastdiff::cuda::gmm_noise(gmm_noise_params(args), device, stream);
        if (err != 0) throw std::runtime_error(std::string("fastdiff gmm_noise (cuda): ") + fastdiff::cuda::error_string(err));
      },
      "Launch gmm_noise on `stream` of `device`.");
  m.def(
      "gmm_score_cuda",
      [](const py::tuple& args, int device, uintptr_t stream) {
        const int err = fastdiff::cuda::gmm_score(gmm_score_params(args), device, stream);
        if (err != 0) throw std::runtime_error(std::string("fastdiff gmm_score (cuda): ") + fastdiff::cuda::error_string(err));
      },
      "Launch gmm_score on `stream` of `device`.");
  m.def("cuda_device_count", []() -> py::tuple {
    int n = 0;
    const int err = fastdiff::cuda::device_count(&n);
    return py::make_tuple(err == 0 ? n : 0, err == 0 ? std::string() : std::string(fastdiff::cuda::error_string(err)));
  });
#else
  m.attr("with_cuda") = false;
#endif
}
