// fastdiff._C: raw pointers, sizes and a stream handle in; no libtorch, so one binary serves every torch.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "fastdiff/step.cuh"

#if defined(FASTDIFF_WITH_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace fastdiff {
namespace cpu {
void step(const StepParams& p);
}
#if defined(FASTDIFF_WITH_CUDA)
namespace cuda {
int step(const StepParams& p, int device, uintptr_t stream);
const char* error_string(int code);
int device_count(int* count);
}  // namespace cuda
#endif
}  // namespace fastdiff

using fastdiff::StepParams;

// StepParams travels as one flat tuple of integers (pointers as tensor.data_ptr(), 0 = absent), in the
// order of kStepFields; fastdiff/ops/step.py builds it in the same order (a test compares the lists).
// One tuple costs ~1 us to convert where setting 30 attributes cost ~15 us per step.
static const char* kStepFields[] = {
    "batch", "numel", "dtype", "x", "e0", "e1", "eu0", "eu1", "m0", "m1", "m2", "x_last", "offset", "idx",
    "row_table", "var_table", "table_rows", "noise", "seeds", "noise_step", "noise_stream", "coef",
    "coef_rows", "row", "rows", "rows_len", "clamp", "n_out", "out0", "out1", "out2"};
constexpr int kNumStepFields = sizeof(kStepFields) / sizeof(kStepFields[0]);

template <typename T>
static T ptr(const py::tuple& a, int i) {
  return reinterpret_cast<T>(a[i].cast<uintptr_t>());
}

static StepParams step_params(const py::tuple& a) {
  if (int(a.size()) != kNumStepFields)
    throw std::invalid_argument("step: expected " + std::to_string(kNumStepFields) + " parameters, got " +
                                std::to_string(a.size()));
  StepParams p;
  p.batch = a[0].cast<int64_t>();
  p.numel = a[1].cast<int64_t>();
  p.dtype = a[2].cast<int>();
  p.x = ptr<const void*>(a, 3);
  p.e0 = ptr<const void*>(a, 4);
  p.e1 = ptr<const void*>(a, 5);
  p.eu0 = ptr<const void*>(a, 6);
  p.eu1 = ptr<const void*>(a, 7);
  p.m0 = ptr<const void*>(a, 8);
  p.m1 = ptr<const void*>(a, 9);
  p.m2 = ptr<const void*>(a, 10);
  p.x_last = ptr<const void*>(a, 11);
  p.offset = ptr<const float*>(a, 12);
  p.idx = ptr<const int64_t*>(a, 13);
  p.row_table = ptr<const float*>(a, 14);
  p.var_table = ptr<const float*>(a, 15);
  p.table_rows = a[16].cast<int64_t>();
  p.noise = ptr<const void*>(a, 17);
  p.seeds = ptr<const int64_t*>(a, 18);
  p.noise_step = a[19].cast<int64_t>();
  p.noise_stream = a[20].cast<int64_t>();
  p.coef = ptr<const float*>(a, 21);
  p.coef_rows = a[22].cast<int64_t>();
  p.row = a[23].cast<int64_t>();
  p.rows = ptr<const int64_t*>(a, 24);
  p.rows_len = a[25].cast<int64_t>();
  p.clamp = a[26].cast<bool>();
  p.n_out = a[27].cast<int>();
  p.out0 = ptr<void*>(a, 28);
  p.out1 = ptr<void*>(a, 29);
  p.out2 = ptr<void*>(a, 30);
  return p;
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

  py::dict layout;
  layout["G"] = int(fastdiff::kG);
  layout["AS"] = int(fastdiff::kAS);
  layout["AX"] = int(fastdiff::kAX);
  layout["AE0"] = int(fastdiff::kAE0);
  layout["AE1"] = int(fastdiff::kAE1);
  layout["R"] = int(fastdiff::kR);
  layout["VAR"] = int(fastdiff::kVar);
  layout["OUT"] = int(fastdiff::kOut);
  layout["CX"] = int(fastdiff::kCX);
  layout["CE0"] = int(fastdiff::kCE0);
  layout["CE1"] = int(fastdiff::kCE1);
  layout["CX0"] = int(fastdiff::kCX0);
  layout["CM0"] = int(fastdiff::kCM0);
  layout["CM1"] = int(fastdiff::kCM1);
  layout["CM2"] = int(fastdiff::kCM2);
  layout["CLAST"] = int(fastdiff::kCLast);
  layout["COFF"] = int(fastdiff::kCOff);
  layout["CROW"] = int(fastdiff::kCRow);
  layout["CZ"] = int(fastdiff::kCZ);
  layout["PER_OUT"] = int(fastdiff::kPerOut);
  layout["MAX_OUT"] = fastdiff::kMaxOut;
  layout["NUM_COEF"] = fastdiff::kNumCoef;
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
  m.def("cuda_device_count", []() -> py::tuple {
    int n = 0;
    const int err = fastdiff::cuda::device_count(&n);
    return py::make_tuple(err == 0 ? n : 0, err == 0 ? std::string() : std::string(fastdiff::cuda::error_string(err)));
  });
#else
  m.attr("with_cuda") = false;
#endif
}
