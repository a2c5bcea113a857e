#pragma once
// Runtime ISA selection for the CPU kernels' hot loops.
//
// A kernel keeps its hot loops in a header of templates with no includes of its own, and
// includes it through isa_variants.inc, which compiles it three times: for baseline x86-64,
// AVX2 (x86-64-v3) and AVX-512 (x86-64-v4), in namespaces isa_baseline, isa_avx2 and
// isa_avx512. CIFARNET_ISA_DISPATCH calls the variant this CPU supports. The package thus runs
// on any x86-64 and still uses 16-float vectors where the CPU has them. (GCC's target_clones
// would be shorter, but it lowers vector-extension code of inlined templates for the baseline
// ISA before cloning, which scalarises it.)

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define CIFARNET_HAS_ISA_VARIANTS 1
#else
#define CIFARNET_HAS_ISA_VARIANTS 0
#endif

#include <cstring>

#include "env_setting.h"

namespace cifarnet {

enum class CpuIsa { baseline, avx2, avx512 };

// CIFARNET_CPU_ISA caps what this CPU runs, so that one machine can time and test the code an
// older CPU runs, with ONEDNN_MAX_CPU_ISA capping oneDNN's part to match:
//   avx512    AVX-512 loops, no AMX       (with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)
//   avx2      AVX2 loops                  (with ONEDNN_MAX_CPU_ISA=AVX2)
//   baseline  the compiler's x86-64 loops
inline const char* cpu_isa_cap() {
  return env_setting("CIFARNET_CPU_ISA", {"avx512", "avx2", "baseline"});
}

inline bool cpu_isa_capped_at(const char* level) {
  const char* cap = cpu_isa_cap();
  return cap != nullptr && std::strcmp(cap, level) == 0;
}

// The best variant this CPU runs, within the cap.
inline CpuIsa detect_cpu_isa() {
  const bool at_most_avx2 = cpu_isa_capped_at("avx2");
  const bool baseline_only = cpu_isa_capped_at("baseline");
#if CIFARNET_HAS_ISA_VARIANTS
  if (!baseline_only && !at_most_avx2 && __builtin_cpu_supports("x86-64-v4")) {
    return CpuIsa::avx512;
  }
  if (!baseline_only && __builtin_cpu_supports("x86-64-v3")) return CpuIsa::avx2;
#endif
  (void)at_most_avx2;
  (void)baseline_only;
  return CpuIsa::baseline;
}

// Whether the CPU has AMX tiles with bfloat16 multiplies (oneDNN then runs bfloat16
// convolutions on them), and no cap below AMX.
inline bool cpu_has_amx_bf16() {
  if (cpu_isa_cap() != nullptr) return false;  // every cap is below AMX
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
  return __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::avx512:
      return "avx512 (x86-64-v4)";
    case CpuIsa::avx2:
      return "avx2 (x86-64-v3)";
    default:
      return CIFARNET_HAS_ISA_VARIANTS ? "baseline x86-64" : "compiler default";
  }
}

}  // namespace cifarnet

// Calls isa_<variant>::function(args...) for this CPU's variant.
#if CIFARNET_HAS_ISA_VARIANTS
#define CIFARNET_ISA_DISPATCH(function, ...) \
  do {                                       \
    switch (::cifarnet::cpu_isa()) {         \
      case ::cifarnet::CpuIsa::avx512:       \
        isa_avx512::function(__VA_ARGS__);   \
        break;                               \
      case ::cifarnet::CpuIsa::avx2:         \
        isa_avx2::function(__VA_ARGS__);     \
        break;                               \
      default:                               \
        isa_baseline::function(__VA_ARGS__); \
    }                                        \
  } while (0)
#else
#define CIFARNET_ISA_DISPATCH(function, ...) isa_baseline::function(__VA_ARGS__)
#endif
