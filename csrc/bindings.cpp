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

// A pointer field travels as an integer address (tensor.data_ptr()); 0 means absent.
#define FD_PTR(field)                                                                          \
  def_property(                                                                                \
      #field, [](const StepParams& p) { return reinterpret_cast<uintptr_t>(p.field); },        \
      [](StepParams& p, uintptr_t v) { p.field = reinterpret_cast<decltype(p.field)>(v); })

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff native kernels (C++/OpenMP, and CUDA when built with nvcc)";

  py::class_<StepParams>(m, "StepParams")
      .def(py::init<>())
      .def_readwrite("batch", &StepParams::batch)
      .def_readwrite("numel", &StepParams::numel)
      .def_readwrite("dtype", &StepParams::dtype)
      .FD_PTR(x).FD_PTR(e0).FD_PTR(e1).FD_PTR(eu0).FD_PTR(eu1)
      .FD_PTR(m0).FD_PTR(m1).FD_PTR(m2).FD_PTR(x_last)
      .FD_PTR(offset).FD_PTR(idx).FD_PTR(row_table).FD_PTR(var_table)
      .def_readwrite("table_rows", &StepParams::table_rows)
      .FD_PTR(noise).FD_PTR(seeds)
      .def_readwrite("noise_step", &StepParams::noise_step)
      .def_readwrite("noise_stream", &StepParams::noise_stream)
      .FD_PTR(coef)
      .def_readwrite("coef_rows", &StepParams::coef_rows)
      .def_readwrite("row", &StepParams::row)
      .FD_PTR(rows)
      .def_readwrite("rows_len", &StepParams::rows_len)
      .def_readwrite("clamp", &StepParams::clamp)
      .def_readwrite("n_out", &StepParams::n_out)
      .FD_PTR(out0).FD_PTR(out1).FD_PTR(out2);

  m.def(
      "step_cpu",
      [](const StepParams& p) {
        py::gil_scoped_release nogil;
        fastdiff::cpu::step(p);
      },
      "Run one step on host memory (OpenMP).");

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
      [](const StepParams& p, int device, uintptr_t stream) {
        const int err = fastdiff::cuda::step(p, device, stream);
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
