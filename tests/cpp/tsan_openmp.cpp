// Linked into the C++ tests when they are built with -DCIFARNET_SANITIZER=thread (tools/tsan.sh).
//
// ThreadSanitizer cannot see the fork and join of an OpenMP parallel region when libgomp is
// not instrumented (torch's is not): every read by a worker of what the master wrote before a
// region (or of the master's stack, through a lambda's captures), and every access of the
// master to that memory after the region, would be reported as a race. This interposes
// libgomp's entry point for `#pragma omp parallel`, called by the kernels (through
// at::parallel_for) and by libtorch, and tells TSan that the region's start happens before each
// thread's part, and each thread's part before the region's end: what the barriers guarantee.
// Races between the threads of one region are still reported.

#include <dlfcn.h>

extern "C" {

void __tsan_acquire(void* addr);
void __tsan_release(void* addr);

namespace {

struct Region {
  void (*fn)(void*);
  void* data;
};

void run_thread_part(void* region_ptr) {
  Region* region = static_cast<Region*>(region_ptr);
  __tsan_acquire(region);
  region->fn(region->data);
  __tsan_release(region);
}

}  // namespace

void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
  using Real = void (*)(void (*)(void*), void*, unsigned, unsigned);
  static const Real real = reinterpret_cast<Real>(dlsym(RTLD_NEXT, "GOMP_parallel"));
  Region region{fn, data};
  __tsan_release(&region);
  real(run_thread_part, &region, num_threads, flags);
  __tsan_acquire(&region);
}

}  // extern "C"
