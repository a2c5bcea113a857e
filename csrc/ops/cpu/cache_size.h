#pragma once
// Cache sizes of this CPU, read at run time, for the kernels' tile sizes.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

namespace cifarnet {

// The size of the largest data cache (the last level), from Linux's sysfs; 0 where unknown.
// NB: C stdio, not iostreams: an <fstream> read of these files segfaulted inside libstdc++'s
// locale code on a machine whose libstdc++ differed from the headers' (torch 2.11 wheel,
// GCC 13).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t largest = 0;
    for (int index = 0;; ++index) {
      const std::string path =
          "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
      std::FILE* file = std::fopen(path.c_str(), "r");
      if (file == nullptr) break;
      long long size = 0;
      char unit = 0;
      const int read = std::fscanf(file, "%lld%c", &size, &unit);  // e.g. "32768K"
      std::fclose(file);
      if (read < 1) break;
      const int64_t scale = unit == 'K' ? 1 << 10 : unit == 'M' ? 1 << 20 : 1;
      largest = std::max<int64_t>(largest, size * scale);
    }
    return largest;
  }();
  return bytes;
}

}  // namespace cifarnet
