#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator of cuRAND and of torch's CUDA dropout, and which element of a
// dropout mask takes which of its outputs. Host and device code share it, so a seed gives the
// same mask on the CPU and on a GPU, and a backward pass recomputes its forward's mask instead
// of keeping it.
//
// Element e of a tensor (its index in row-major order) takes word (e % 32) / 8 of the block
// at counter 8 * (e / 32) + e % 8: eight consecutive blocks fill 32 consecutive elements, a
// word per run of eight, so a vector of eight counters yields four runs of eight elements
// without a transpose. Those are the low 64 bits of the 128-bit counter; the high 64 bits are
// the mask's stream (MaskKey).

#include <cstdint>

#if defined(__CUDACC__)
#define CIFARNET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CIFARNET_HOST_DEVICE inline
#endif

namespace cifarnet::philox {

constexpr uint32_t kMultiplier0 = 0xD2511F53u, kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int kElementsPerGroup = 32;  // 8 blocks of 4 words
constexpr int kBlocksPerGroup = 8;

struct Words {
  uint32_t w[4];
};

// What selects a mask: the Philox key and the high 64 bits of every block's counter (its
// stream). An explicit seed is the key of stream 0. A mask drawn from torch's CUDA generator
// takes the generator's seed as its key and stream kGeneratorStreams + offset / 4 of its Philox
// offset, which it advances by kGeneratorIncrement.
// NB: torch's other Philox consumers (curand_init(seed, thread, offset) and its kin) read the
// counters whose high half is a thread index, far below 2^63, and whose low half starts at
// offset / 4 of the offset they reserved; a whole stream per offset at and above 2^63 meets
// none of them, and moves the offset by one block per call, as a one-number draw does, so the
// offset a CUDA graph accumulates during capture stays small whatever the tensors' sizes.
struct MaskKey {
  uint64_t key;
  uint64_t stream;
};

constexpr uint64_t kGeneratorStreams = uint64_t{1} << 63;
constexpr uint64_t kGeneratorIncrement = 4;  // the offset is counted in 32-bit words

// The mask of a generator's (seed, offset).
CIFARNET_HOST_DEVICE MaskKey generator_mask_key(uint64_t seed, uint64_t offset) {
  return {seed, kGeneratorStreams + offset / 4};
}

// The block at counter (`counter`, `mask.stream`) under `mask.key`: the 64-bit halves of the
// 128-bit counter, low first.
CIFARNET_HOST_DEVICE Words block(uint64_t counter, MaskKey mask) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(mask.stream), c3 = static_cast<uint32_t>(mask.stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(mask.key), k1 = static_cast<uint32_t>(mask.key >> 32);
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMultiplier0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMultiplier1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

// The 32-bit random word of element `e` (see the layout above).
CIFARNET_HOST_DEVICE uint32_t element_word(uint64_t e, MaskKey mask) {
  const uint64_t counter = kBlocksPerGroup * (e / kElementsPerGroup) + e % kBlocksPerGroup;
  return block(counter, mask).w[(e % kElementsPerGroup) / kBlocksPerGroup];
}

// Dropout keeps an element whose word is at least this: round(p * 2^32), so that the keep
// probability is 1 - p to within 2^-33. Callers handle p == 1 (nothing kept) themselves.
CIFARNET_HOST_DEVICE uint64_t keep_threshold(double p) {
  return static_cast<uint64_t>(p * 4294967296.0 + 0.5);
}

}  // namespace cifarnet::philox
