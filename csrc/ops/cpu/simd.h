#pragma once
// 64-byte SIMD vectors through the GCC/Clang vector extension: one AVX-512 register, two AVX2
// or four SSE ones, lowered for whatever ISA the enclosing function is compiled for (see
// multiversion.h). Used where the auto-vectoriser will not turn compare-and-select loops with
// NaN rules into vector code on its own.

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace cifarnet::simd {

template <typename T>
struct Vec64;

template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t lane_int;                                // an integer as wide as a lane
  typedef lane_int mask __attribute__((vector_size(64)));  // -1 (true) or 0 per lane
  typedef uint8_t bytes __attribute__((vector_size(16)));
  static constexpr int lanes = 16;
};

template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t lane_int;
  typedef lane_int mask __attribute__((vector_size(64)));
  typedef uint8_t bytes __attribute__((vector_size(8)));
  static constexpr int lanes = 8;
};

// Unaligned load into `v`. (An out-parameter, not a return value: a 64-byte vector returned by
// value from a baseline-ISA function would change the calling convention.)
template <typename V>
inline __attribute__((always_inline)) void load(V& v, const void* p) {
  std::memcpy(&v, p, sizeof(V));
}

template <typename V>
inline __attribute__((always_inline)) void store(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// A store, or with `stream` a non-temporal one (p then 16-byte aligned), which goes to memory
// without first reading the line into the caches: for outputs too large to stay in cache, a
// quarter less memory traffic in a read-two-write-one pass. Weakly ordered: the writing
// thread calls stream_fence() before others read.
template <typename V>
inline __attribute__((always_inline)) void store_or_stream(void* p, const V& v, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    static_assert(sizeof(V) % 16 == 0);
    for (size_t i = 0; i < sizeof(V); i += 16) {
      __m128i part;
      std::memcpy(&part, reinterpret_cast<const char*>(&v) + i, 16);
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + i), part);
    }
    return;
  }
#endif
  store(p, v);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Eight values of scalar_t (float or double) widened to one vector of eight doubles: sums
// of float data accumulate in double at the cost of a conversion per load.
using doubles = Vec64<double>::type;

template <typename scalar_t>
inline __attribute__((always_inline)) void load_doubles(doubles& v, const scalar_t* p) {
  if constexpr (sizeof(scalar_t) == sizeof(double)) {
    load(v, p);
  } else {
    typedef scalar_t eight __attribute__((vector_size(8 * sizeof(scalar_t))));
    eight narrow;
    load(narrow, p);
    v = __builtin_convertvector(narrow, doubles);
  }
}

}  // namespace cifarnet::simd
