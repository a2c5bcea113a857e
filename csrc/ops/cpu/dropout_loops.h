// Hot loop of the CPU dropout kernel: Philox4x32-10 for eight blocks at once in 64-bit vector
// lanes (each 32-bit product needs its high half), then the mask applied to the 32 elements
// those blocks cover (philox.h's layout: word w of block 8g + l goes to element 32g + 8w + l).
// Included once per ISA through isa_variants.inc (so: no include guard, no includes).

typedef uint64_t philox_lanes __attribute__((vector_size(64)));
typedef uint32_t philox_words __attribute__((vector_size(32)));

// The 32 words of group g (blocks 8g .. 8g + 7 of the mask's stream), in element order.
inline __attribute__((always_inline)) void philox_group(uint64_t group, philox::MaskKey mask,
                                                        uint32_t* words) {
  const philox_lanes low32 = philox_lanes{} + 0xffffffffu;
  const philox_lanes counter =
      philox_lanes{0, 1, 2, 3, 4, 5, 6, 7} + group * philox::kBlocksPerGroup;
  philox_lanes c0 = counter & low32, c1 = counter >> 32;
  philox_lanes c2 = philox_lanes{} + (mask.stream & 0xffffffffu),
               c3 = philox_lanes{} + (mask.stream >> 32);
  uint64_t k0 = static_cast<uint32_t>(mask.key), k1 = mask.key >> 32;
  for (int round = 0; round < philox::kRounds; ++round) {
    // Both factors are below 2^32: full 64-bit products, high halves by a shift.
    const philox_lanes p0 = c0 * philox::kMultiplier0;
    const philox_lanes p1 = c2 * philox::kMultiplier1;
    c0 = (p1 >> 32) ^ c1 ^ k0;
    c2 = (p0 >> 32) ^ c3 ^ k1;
    c1 = p1 & low32;
    c3 = p0 & low32;
    k0 = (k0 + philox::kWeyl0) & 0xffffffffu;
    k1 = (k1 + philox::kWeyl1) & 0xffffffffu;
  }
  const philox_words w0 = __builtin_convertvector(c0, philox_words);
  const philox_words w1 = __builtin_convertvector(c1, philox_words);
  const philox_words w2 = __builtin_convertvector(c2, philox_words);
  const philox_words w3 = __builtin_convertvector(c3, philox_words);
  std::memcpy(words, &w0, sizeof(w0));
  std::memcpy(words + 8, &w1, sizeof(w1));
  std::memcpy(words + 16, &w2, sizeof(w2));
  std::memcpy(words + 24, &w3, sizeof(w3));
}

// out = keep ? x * scale : x * 0 over groups [group_begin, group_end) of 32 elements, keep
// meaning a word of at least `threshold`. x * 0 rather than 0, as native dropout multiplies:
// NaN and infinity stay NaN, negative values give -0.
template <typename scalar_t>
void dropout_groups(const scalar_t* x, scalar_t* out, int64_t group_begin, int64_t group_end,
                    philox::MaskKey mask, uint32_t threshold, simd::opmath_t<scalar_t> scale) {
  using opmath = simd::opmath_t<scalar_t>;
  using V = typename simd::Vec64<opmath>::type;
  using Mask = typename simd::Vec64<opmath>::mask;
  using Lane = typename simd::Vec64<opmath>::lane_int;
  constexpr int lanes = simd::Vec64<opmath>::lanes;
  typedef uint32_t lane_words __attribute__((vector_size(4 * lanes)));
  typedef std::make_unsigned_t<Lane> unsigned_lanes __attribute__((vector_size(64)));
  const V scales = V{} + scale, zeros = V{};
  alignas(64) uint32_t words[philox::kElementsPerGroup];
  for (int64_t group = group_begin; group < group_end; ++group) {
    philox_group(static_cast<uint64_t>(group), mask, words);
    const int64_t first = group * philox::kElementsPerGroup;
    for (int i = 0; i < philox::kElementsPerGroup; i += lanes) {
      lane_words w;
      std::memcpy(&w, words + i, sizeof(w));
      const Mask keep = __builtin_convertvector(w, unsigned_lanes) >= threshold;
      V v;
      simd::load(v, x + first + i);
      simd::store(out + first + i, keep ? v * scales : v * zeros);
    }
  }
}
