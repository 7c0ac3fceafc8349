// Two 4-bit weights of a packed word to fp16 without a conversion instruction:
// OR-ing a nibble into the mantissa of fp16 1024 (0x6400, whose last mantissa
// bit is worth 1) gives the exact fp16 1024 + q at the low nibble position, or
// 1024 + 16 q at the next one. One lop3 computes (word & mask) | 0x6400 for both
// halves; the subtraction (and for the high position, the /16 folded into an
// fma) that leaves q - z is exact in fp16, so only the scale rounds.
#pragma once

#include <cuda_fp16.h>
#include <cstdint>

namespace qattn::cuda {

// (word & MASK) | 0x64006400 as fp16x2; MASK selects one nibble a half.
template <uint32_t MASK>
__device__ __forceinline__ __half2 nibbles_over_1024(uint32_t word) {
    static_assert(MASK == 0x000F000Fu || MASK == 0x00F000F0u, "one nibble a half, below bit 8 of each");
    uint32_t bits;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(bits) : "r"(word), "n"(MASK), "n"(0x64006400u));
    return *reinterpret_cast<const __half2*>(&bits);
}

// q - z of the nibbles at bits [0,4) and [16,20): minus_low = -(1024 + z).
__device__ __forceinline__ __half2 low_nibbles_minus_zero(uint32_t word, __half2 minus_low) {
    return __hadd2(nibbles_over_1024<0x000F000Fu>(word), minus_low);
}

// q - z of the nibbles at bits [4,8) and [20,24): (1024 + 16 q) / 16 - (64 + z)
// by one fma; minus_high = -(64 + z).
__device__ __forceinline__ __half2 high_nibbles_minus_zero(uint32_t word, __half2 minus_high) {
    return __hfma2(nibbles_over_1024<0x00F000F0u>(word), __float2half2_rn(0.0625f), minus_high);
}

// The two offsets above from the zero as the packing stores it, 1024 + z
// (exact: both stay integers below 2048).
__device__ __forceinline__ __half2 minus_low_offset(__half2 zero_1024) { return __hneg2(zero_1024); }
__device__ __forceinline__ __half2 minus_high_offset(__half2 zero_1024) {
    return __hsub2(__float2half2_rn(960.0f), zero_1024);
}

}  // namespace qattn::cuda
