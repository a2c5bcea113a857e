// The `cifarnet._C` Python module. Importing it loads the shared library, whose static
// initialisers register the ops with the dispatcher; the ops themselves are reached through
// torch.ops.cifarnet, never through pybind11. The module only reports how it was built.

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/version.h>

#include "ops/conv_pool_geometry.h"
#include "ops/cpu/batch_norm_cpu.h"
#include "ops/cpu/multiversion.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "cifarnet's compiled ops (registered under torch.ops.cifarnet) and build facts";
  m.attr("MAX_POOL_WINDOW_ELEMENTS") = cifarnet::kMaxPoolWindowElements;
  m.attr("ARGMAX_RELU_ZERO") = static_cast<int>(cifarnet::kArgmaxReluZero);
  m.def(
      "build_info",
      [] {
        py::dict info;
#ifdef CIFARNET_WITH_CUDA
        info["cuda"] = true;
        info["cuda_version"] = CIFARNET_CUDA_VERSION;
#else
        info["cuda"] = false;
        info["cuda_version"] = py::none();
#endif
        info["torch_version"] = TORCH_VERSION;
        info["cpu_isa"] = cifarnet::cpu_isa_name();
        info["parallel"] = at::get_parallel_info();
        return info;
      },
      "How the extension was built: CUDA kernels compiled in, torch version, the ISA of the\n"
      "CPU kernels' vector loops on this machine, threading.");
  m.def("_streaming_store_threshold_bytes", &cifarnet::ops::streaming_store_threshold_bytes,
        "Bytes above which the CPU batch-norm passes write with non-temporal stores (0: never).");
  m.def("_set_streaming_store_threshold_bytes", &cifarnet::ops::set_streaming_store_threshold_bytes,
        py::arg("bytes"),
        "Overrides that threshold (None restores the last-level cache size); for tests.");
}
