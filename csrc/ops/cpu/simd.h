#pragma once
// 64-byte SIMD vectors through the GCC/Clang vector extension: one AVX-512 register, two AVX2
// or four SSE ones, lowered for whatever ISA the enclosing function is compiled for (see
// multiversion.h). Used where the auto-vectoriser will not turn compare-and-select loops with
// NaN rules into vector code on its own.

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>  // all ISAs' intrinsics: each variant of a loop header uses its own
#endif

namespace cifarnet::simd {

// The type the loops compute in for data stored as scalar_t: float for float32 and for the
// 16-bit c10::BFloat16 and c10::Half (widened on load, rounded on store), double for float64.
template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

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

// Half as wide, for ISAs whose vector registers hold 32 bytes (AVX2): there GCC splits a
// 64-byte vector's arithmetic over two registers but compiles its comparisons and `?:` selects
// lane by lane (scalar compares and branches; the pooling epilogue ran 8x slower than native's
// pooling on an AVX2-only Zen 3). Loops that compare and select use the width their ISA's
// registers hold.
template <typename T>
struct Vec32;

template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t lane_int;
  typedef lane_int mask __attribute__((vector_size(32)));
  typedef uint8_t bytes __attribute__((vector_size(8)));
  static constexpr int lanes = 8;
};

template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t lane_int;
  typedef lane_int mask __attribute__((vector_size(32)));
  typedef uint8_t bytes __attribute__((vector_size(4)));
  static constexpr int lanes = 4;
};

// The vector a loop computes scalar_t data in: one register of an ISA whose registers hold
// `register_bytes` (Vec32 with AVX2, Vec64 with AVX-512). 16-bit data keep 64 bytes, the width
// their loads widen at (their kernels on AVX2-only CPUs are not the fast path: no bfloat16
// hardware).
template <int register_bytes, typename scalar_t>
using RegisterVec =
    std::conditional_t<(register_bytes < 64 && std::is_same_v<scalar_t, opmath_t<scalar_t>>),
                       Vec32<opmath_t<scalar_t>>, Vec64<opmath_t<scalar_t>>>;

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

// 16-bit storage. A vector of float (16 lanes) loads from and stores to 16 bfloat16 or float16
// values: overloads of load/store taking those pointer types convert on the way, so a loop
// templated on the storage type reads `simd::load(v, p)` whatever p points at.
// bfloat16 is the top half of a float: widening is a shift; narrowing rounds to nearest even
// (NaN stays a quiet NaN with its sign), as c10::BFloat16 does. float16 goes through
// _Float16, which the F16C instructions of x86-64-v3/v4 convert and the baseline ISA converts
// in software.
using floats = Vec64<float>::type;
typedef uint16_t halfwords __attribute__((vector_size(32)));
typedef uint32_t words __attribute__((vector_size(64)));
typedef _Float16 float16s __attribute__((vector_size(32)));

inline __attribute__((always_inline)) floats widen(const halfwords& bits, c10::BFloat16*) {
  const words wide = __builtin_convertvector(bits, words) << 16;
  floats v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) floats widen(const halfwords& bits, c10::Half*) {
  float16s h;
  std::memcpy(&h, &bits, sizeof(h));
  return __builtin_convertvector(h, floats);
}

inline __attribute__((always_inline)) halfwords narrow(const floats& v, c10::BFloat16*) {
  words bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const words rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const auto nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return __builtin_convertvector(nan ? ((bits >> 16) | 0x40u) : rounded, halfwords);
}

inline __attribute__((always_inline)) halfwords narrow(const floats& v, c10::Half*) {
  const float16s h = __builtin_convertvector(v, float16s);
  halfwords bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}

inline __attribute__((always_inline)) void load(floats& v, const c10::BFloat16* p) {
  halfwords bits;
  std::memcpy(&bits, p, sizeof(bits));
  v = widen(bits, static_cast<c10::BFloat16*>(nullptr));
}

inline __attribute__((always_inline)) void load(floats& v, const c10::Half* p) {
  halfwords bits;
  std::memcpy(&bits, p, sizeof(bits));
  v = widen(bits, static_cast<c10::Half*>(nullptr));
}

inline __attribute__((always_inline)) void store(c10::BFloat16* p, const floats& v) {
  const halfwords bits = narrow(v, p);
  std::memcpy(p, &bits, sizeof(bits));
}

inline __attribute__((always_inline)) void store(c10::Half* p, const floats& v) {
  const halfwords bits = narrow(v, p);
  std::memcpy(p, &bits, sizeof(bits));
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

inline __attribute__((always_inline)) void store_or_stream(c10::BFloat16* p, const floats& v,
                                                            bool stream) {
  store_or_stream(p, narrow(v, p), stream);
}

inline __attribute__((always_inline)) void store_or_stream(c10::Half* p, const floats& v,
                                                            bool stream) {
  store_or_stream(p, narrow(v, p), stream);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Eight values of scalar_t (float, double, bfloat16 or float16) as their raw bits, one
// integer lane each: moved and selected without arithmetic, with comparisons on lanes as wide
// as the data (for 16- and 32-bit data one AVX2 register, where GCC compiles comparisons of
// wider vectors lane by lane).
template <typename scalar_t>
struct EightBits {
  using lane_int = std::conditional_t<sizeof(scalar_t) == 2, int16_t,
                                      std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>>;
  typedef lane_int type __attribute__((vector_size(8 * sizeof(scalar_t))));
};

// Eight values of scalar_t widened to one vector of eight doubles: sums of float data
// accumulate in double at the cost of a conversion per load.
using doubles = Vec64<double>::type;

// Eight values of a 16- or 32-bit scalar_t, from their bits, as floats.
typedef float eight_floats __attribute__((vector_size(32)));

template <typename scalar_t>
inline __attribute__((always_inline)) eight_floats to_floats(
    const typename EightBits<scalar_t>::type& bits) {
  static_assert(sizeof(scalar_t) <= 4);
  eight_floats v;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    typedef uint16_t eight_halfwords __attribute__((vector_size(16)));
    typedef uint32_t eight_words __attribute__((vector_size(32)));
    const eight_words wide =
        __builtin_convertvector(__builtin_convertvector(bits, eight_halfwords), eight_words)
        << 16;
    std::memcpy(&v, &wide, sizeof(v));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    typedef _Float16 eight_halves __attribute__((vector_size(16)));
    eight_halves halves;
    std::memcpy(&halves, &bits, sizeof(halves));
    v = __builtin_convertvector(halves, eight_floats);
  } else {
    std::memcpy(&v, &bits, sizeof(v));
  }
  return v;
}

template <typename scalar_t>
inline __attribute__((always_inline)) doubles to_doubles(
    const typename EightBits<scalar_t>::type& bits) {
  if constexpr (sizeof(scalar_t) == sizeof(double)) {
    doubles v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    return __builtin_convertvector(to_floats<scalar_t>(bits), doubles);
  }
}

// The same eight values as two halves of four doubles, each one AVX2 register: with AVX2, GCC
// moves the halves of a 64-byte vector of doubles through the stack and general registers
// between operations.
using four_doubles = Vec32<double>::type;

template <typename scalar_t>
inline __attribute__((always_inline)) void to_double_halves(
    const typename EightBits<scalar_t>::type& bits, four_doubles& low, four_doubles& high) {
  if constexpr (sizeof(scalar_t) == sizeof(double)) {
    std::memcpy(&low, &bits, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&bits) + sizeof(low), sizeof(high));
  } else {
    const eight_floats v = to_floats<scalar_t>(bits);
    low = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), four_doubles);
    high = __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), four_doubles);
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void load_double_halves(const scalar_t* p,
                                                              four_doubles& low,
                                                              four_doubles& high) {
  typename EightBits<scalar_t>::type bits;
  load(bits, p);
  to_double_halves<scalar_t>(bits, low, high);
}

// Loaded at eight lanes straight from memory: going through a zero-padded 16-lane vector on the
// stack made every load wait on a failed store-to-load forward (4x slower sums).
template <typename scalar_t>
inline __attribute__((always_inline)) void load_doubles(doubles& v, const scalar_t* p) {
  typename EightBits<scalar_t>::type bits;
  load(bits, p);
  v = to_doubles<scalar_t>(bits);
}

}  // namespace cifarnet::simd
