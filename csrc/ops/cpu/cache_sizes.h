#pragma once
// The data cache sizes the CPU kernels size their tiles and blocks by, read at run time (Linux
// sysfs), with defaults where the machine does not say.

#include <cstdint>
#include <optional>
#include <string>

namespace cifarnet::ops {

struct CacheSizes {
  int64_t l1d_bytes;  // one core's level-1 data cache
  int64_t l2_bytes;   // one core's level-2 cache (the instance that core sees)
  int64_t llc_bytes;  // the last level (largest; shared), 0 where unknown
  std::string source;  // "sysfs", "default" (sysfs said nothing) or "override"
};

// Defaults where sysfs has no size for a level: the smallest of the x86-64 CPUs the kernels
// are tuned on (Zen 3: 32 KiB L1d, 512 KiB L2; older Xeons have 1-2 MiB), so a block sized
// from them still fits. No last-level default: its users treat 0 as "unknown".
inline constexpr int64_t kDefaultL1dBytes = 32 * 1024;
inline constexpr int64_t kDefaultL2Bytes = 512 * 1024;

// The sizes under `directory` (index*/level, index*/type, index*/size as Linux's
// /sys/devices/system/cpu/cpu0/cache has them); levels it lacks take the defaults.
CacheSizes read_cache_sizes(const std::string& directory);

// This machine's sizes (cpu0's, read once), or the override. Lock-free: the kernels call it on
// every forward.
const CacheSizes& cache_sizes();
// Replaces what cache_sizes() returns (nullopt restores the machine's), so that tests and
// measurements can run the kernels as on a CPU with other caches.
void set_cache_sizes(std::optional<CacheSizes> sizes);

}  // namespace cifarnet::ops
