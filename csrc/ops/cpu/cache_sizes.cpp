// Cache sizes from Linux's sysfs (see cache_sizes.h).

#include "cache_sizes.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <fstream>
#include <mutex>

namespace cifarnet::ops {
namespace {

// One sysfs value: "48K", "2048K", "491520K", "1M"; 0 where absent or unreadable.
int64_t read_size(const std::string& path) {
  std::ifstream file(path);
  int64_t size = 0;
  char unit = 0;
  if (!(file >> size) || size < 0) return 0;
  file >> unit;
  return size * (unit == 'K' ? int64_t{1} << 10 : unit == 'M' ? int64_t{1} << 20
                 : unit == 'G' ? int64_t{1} << 30 : 1);
}

std::mutex override_mutex;
std::optional<CacheSizes> override_sizes;

}  // namespace

CacheSizes read_cache_sizes(const std::string& directory) {
  int64_t l1d = 0, l2 = 0, llc = 0;
  for (int index = 0;; ++index) {
    const std::string entry = directory + "/index" + std::to_string(index) + "/";
    std::ifstream level_file(entry + "level");
    int level = 0;
    if (!(level_file >> level)) break;
    std::string type;
    std::ifstream(entry + "type") >> type;
    if (type == "Instruction") continue;
    const int64_t size = read_size(entry + "size");
    if (level == 1) l1d = std::max(l1d, size);
    if (level == 2) l2 = std::max(l2, size);
    llc = std::max(llc, size);
  }
  const bool known = l1d > 0 || l2 > 0 || llc > 0;
  return {l1d > 0 ? l1d : kDefaultL1dBytes, l2 > 0 ? l2 : kDefaultL2Bytes, llc,
          known ? "sysfs" : "default"};
}

CacheSizes cache_sizes() {
  static const CacheSizes machine = read_cache_sizes("/sys/devices/system/cpu/cpu0/cache");
  std::lock_guard<std::mutex> lock(override_mutex);
  return override_sizes.value_or(machine);
}

void set_cache_sizes(std::optional<CacheSizes> sizes) {
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->l1d_bytes > 0 && sizes->l2_bytes > 0 && sizes->llc_bytes >= 0,
                "cache sizes must be positive (the last level may be 0: unknown), got L1d ",
                sizes->l1d_bytes, ", L2 ", sizes->l2_bytes, ", last level ", sizes->llc_bytes);
    sizes->source = "override";
  }
  std::lock_guard<std::mutex> lock(override_mutex);
  override_sizes = std::move(sizes);
}

}  // namespace cifarnet::ops
