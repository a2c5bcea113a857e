// The `cifarnet._C` Python module. Importing it loads the shared library, whose static
// initialisers register the ops with the dispatcher; the ops themselves are reached through
// torch.ops.cifarnet, never through pybind11. The module only reports how it was built.

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/version.h>

#include "ops/conv_pool_geometry.h"
#include "ops/cpu/batch_norm_cpu.h"
#include "ops/cpu/cache_sizes.h"
#include "ops/cpu/multiversion.h"
#include "ops/cpu/winograd_convolution.h"

namespace py = pybind11;

namespace {

py::dict cache_sizes_dict(const cifarnet::ops::CacheSizes& sizes) {
  py::dict d;
  d["l1d_bytes"] = sizes.l1d_bytes;
  d["l2_bytes"] = sizes.l2_bytes;
  d["llc_bytes"] = sizes.llc_bytes;
  d["source"] = sizes.source;
  return d;
}

}  // namespace

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
        "Bytes above which the CPU batch-norm passes write with non-temporal stores (0: never):\n"
        "the last-level cache size, which _set_cache_sizes overrides.");
  m.def(
      "_cache_sizes", [] { return cache_sizes_dict(cifarnet::ops::cache_sizes()); },
      "The cache sizes the CPU kernels size their tiles by: {'l1d_bytes', 'l2_bytes',\n"
      "'llc_bytes' (0: unknown), 'source': 'sysfs', 'default' or 'override'}.");
  m.def(
      "_winograd_applies",
      [](int64_t in_channels, int64_t out_channels, int64_t height, int64_t width,
         std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding) {
        return cifarnet::ops::winograd_applies_to_sizes(in_channels, out_channels, height, width,
                                                        kernel, stride, padding);
      },
      py::arg("in_channels"), py::arg("out_channels"), py::arg("height"), py::arg("width"),
      py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      "Whether a float32 CPU convolution of these sizes in the batch-norm chain runs as\n"
      "Winograd F(2x2, 5x5) on this CPU (kernel, stride, padding: [h, w]); for tests and\n"
      "benchmarks. CIFARNET_CONV_ALGORITHM=native turns it off.");
  m.def(
      "_read_cache_sizes",
      [](const std::string& directory) {
        return cache_sizes_dict(cifarnet::ops::read_cache_sizes(directory));
      },
      py::arg("directory"),
      "The cache sizes a sysfs-like directory (index*/level, type, size) gives, defaults for\n"
      "the levels it lacks; for tests.");
  m.def(
      "_set_cache_sizes",
      [](std::optional<int64_t> l1d_bytes, std::optional<int64_t> l2_bytes,
         std::optional<int64_t> llc_bytes) {
        if (!l1d_bytes && !l2_bytes && !llc_bytes) {
          cifarnet::ops::set_cache_sizes(std::nullopt);
          return;
        }
        TORCH_CHECK(l1d_bytes && l2_bytes && llc_bytes,
                    "give all three cache sizes, or none to restore the machine's");
        cifarnet::ops::set_cache_sizes(
            cifarnet::ops::CacheSizes{*l1d_bytes, *l2_bytes, *llc_bytes, "override"});
      },
      py::arg("l1d_bytes") = py::none(), py::arg("l2_bytes") = py::none(),
      py::arg("llc_bytes") = py::none(),
      "Makes the CPU kernels size their tiles for these caches (no arguments: this machine's);\n"
      "for tests and measurements.");
}
