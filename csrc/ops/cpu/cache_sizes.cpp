// Cache sizes from Linux's sysfs (see cache_sizes.h).

#include "cache_sizes.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <deque>
#include <mutex>

namespace cifarnet::ops {
namespace {

// NB: C stdio, not iostreams: an <fstream> read of these files segfaulted inside libstdc++'s
// locale code on a machine whose libstdc++ differed from the headers' (an H200 machine with
// torch 2.11 and GCC 13).

// The first whitespace-separated word of a small sysfs file; empty where absent or unreadable.
std::string read_word(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "r");
  if (file == nullptr) return {};
  char word[64] = {};
  const int read = std::fscanf(file, "%63s", word);
  std::fclose(file);
  return read == 1 ? std::string(word) : std::string();
}

// One sysfs size: "48K", "2048K", "491520K", "1M"; 0 where absent or unreadable.
int64_t read_size(const std::string& path) {
  const std::string word = read_word(path);
  long long size = 0;
  char unit = 0;
  if (std::sscanf(word.c_str(), "%lld%c", &size, &unit) < 1 || size < 0) return 0;
  return size * (unit == 'K' ? int64_t{1} << 10 : unit == 'M' ? int64_t{1} << 20
                 : unit == 'G' ? int64_t{1} << 30 : 1);
}

// The override, published through an atomic pointer. Every override set stays alive (a deque
// never moves its elements), since a kernel may still be reading the one it got; overrides
// come from tests and measurements, a handful per process.
std::atomic<const CacheSizes*> current_override{nullptr};
std::mutex override_mutex;
std::deque<CacheSizes> override_history;

}  // namespace

CacheSizes read_cache_sizes(const std::string& directory) {
  int64_t l1d = 0, l2 = 0, llc = 0;
  for (int index = 0;; ++index) {
    const std::string entry = directory + "/index" + std::to_string(index) + "/";
    int level = 0;
    if (std::sscanf(read_word(entry + "level").c_str(), "%d", &level) != 1) break;
    const std::string type = read_word(entry + "type");
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

const CacheSizes& cache_sizes() {
  static const CacheSizes machine = read_cache_sizes("/sys/devices/system/cpu/cpu0/cache");
  const CacheSizes* sizes = current_override.load(std::memory_order_acquire);
  return sizes != nullptr ? *sizes : machine;
}

void set_cache_sizes(std::optional<CacheSizes> sizes) {
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->l1d_bytes > 0 && sizes->l2_bytes > 0 && sizes->llc_bytes >= 0,
                "cache sizes must be positive (the last level may be 0: unknown), got L1d ",
                sizes->l1d_bytes, ", L2 ", sizes->l2_bytes, ", last level ", sizes->llc_bytes);
    sizes->source = "override";
  }
  std::lock_guard<std::mutex> lock(override_mutex);
  if (!sizes.has_value()) {
    current_override.store(nullptr, std::memory_order_release);
    return;
  }
  override_history.push_back(std::move(*sizes));
  current_override.store(&override_history.back(), std::memory_order_release);
}

}  // namespace cifarnet::ops
