// Packed GPTQ 4-bit -> fp16 [n, packed rows], for the large-row path (dequantize
// a slice of columns, then one cuBLAS GEMM against x gathered into packed row
// order). Staying in packed order keeps the stores contiguous: a warp dequantizes
// its 8 columns a chunk of 128 rows at a time into shared memory (in the MMA
// fragment order it loads), then writes each column's 256 bytes with 16-byte stores.
// The arithmetic is the small-row kernel's, so both paths use the same weights.
#include "cuda/gptq4_nibbles.cuh"
#include "cuda/kernels.h"

#include <algorithm>

namespace qattn::cuda {
namespace {

constexpr int kWarps = 8;

// Shared-memory column stride in halves: +8 puts the 8 columns of one fragment
// store in distinct banks, and keeps each column 16-byte aligned.
constexpr int kColumnStride = kPackRows + 8;

struct DequantizeBatch {
    DequantizeSlice slice[kMaxDequantizeSlices];
    int block_begin[kMaxDequantizeSlices];  // first blockIdx.x of each slice
    int count;
};

// A warp owns CH chunks of its 8 columns: their weights and chunk scales are
// all loaded before the first is used (one round trip a warp, CH times the
// bytes in flight of a chunk a warp); 4, or 2 where 4 would leave fewer than
// kMinBlocksPerSm blocks an SM (Llama-3-8B: 4 for Q and O, one wave; 2 for K|V).
constexpr int kMinBlocksPerSm = 3;

template <int CH>
__global__ void __launch_bounds__(kWarps * 32) dequantize_gptq4_kernel(DequantizeBatch batch) {
    __shared__ __align__(16) __half tiles[kWarps][8 * kColumnStride];
    const int which = batch.count > 1 && static_cast<int>(blockIdx.x) >= batch.block_begin[1] ? 1 : 0;
    const DequantizeSlice d = which ? batch.slice[1] : batch.slice[0];  // no dynamic index into the parameters
    const PackedGptq4& w = d.w;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int local_tile = (blockIdx.x - batch.block_begin[which]) * kWarps + warp;
    const int chunk0 = blockIdx.y * CH;
    if (local_tile >= d.n_count / 8 || chunk0 >= w.chunks) return;
    const int chunks = min(CH, w.chunks - chunk0);
    const int n_tiles = d.n / 8;
    const int nt = d.n_begin / 8 + local_tile;
    __half* __restrict__ out = d.out;
    const int g = lane >> 2, t = lane & 3;
    const int N = n_tiles * 8;
    const int column = nt * 8 + g;
    uint4 q[CH];
    __half2 first_sz[CH];  // the scale and zero of each chunk's first group
#pragma unroll
    for (int u = 0; u < CH; ++u) {
        if (u < chunks) {
            q[u] = w.qpack[(static_cast<size_t>(chunk0 + u) * n_tiles + nt) * 32 + lane];
            first_sz[u] = w.chunk_scale_zero[static_cast<size_t>(chunk0 + u) * N + column];
        }
    }
    __half2* col = reinterpret_cast<__half2*>(tiles[warp] + g * kColumnStride);
    const int rows = w.chunks * kPackRows;
#pragma unroll
    for (int u = 0; u < CH; ++u) {
        if (u >= chunks) break;
        const int chunk = chunk0 + u;
        const bool mixed = (w.mixed_chunks[chunk / 32] >> (chunk % 32)) & 1u;  // warp-uniform
        const uint32_t words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const __half2 sz =
                mixed ? w.scale_zero[static_cast<size_t>(w.step_group[chunk * 8 + j]) * N + column] : first_sz[u];
            const __half2 scale = __half2half2(__low2half(sz)), zero = __half2half2(__high2half(sz));
            const uint32_t word = words[j >> 1] >> ((j & 1) * 8);
            // packed rows 2t, 2t + 1 of step j, then the same + 8
            col[(j * 16 + 2 * t) / 2] = __hmul2(low_nibbles_minus_zero(word, minus_low_offset(zero)), scale);
            col[(j * 16 + 2 * t + 8) / 2] = __hmul2(high_nibbles_minus_zero(word, minus_high_offset(zero)), scale);
        }
        __syncwarp();
        // Lane l writes rows 8 (l % 16) .. + 7 of columns l / 16 + 2 i.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = lane / 16 + 2 * i, piece = lane % 16;
            const uint4 v = *reinterpret_cast<const uint4*>(tiles[warp] + c * kColumnStride + piece * 8);
            *reinterpret_cast<uint4*>(out + static_cast<size_t>(local_tile * 8 + c) * rows + chunk * kPackRows +
                                      piece * 8) = v;
        }
        __syncwarp();  // the tile is the next chunk's
    }
}

}  // namespace

qattn_status launch_dequantize_gptq4(const DequantizeSlice* slices, int count, int sm_count, cudaStream_t stream) {
    if (count < 1 || count > kMaxDequantizeSlices)
        return fail(QATTN_ERROR_INTERNAL, "dequantize_gptq4: %d slices", count);
    DequantizeBatch batch{};
    batch.count = count;
    int blocks = 0, chunks = 0;
    for (int i = 0; i < count; ++i) {
        batch.slice[i] = slices[i];
        batch.block_begin[i] = blocks;
        blocks += (slices[i].n_count / 8 + kWarps - 1) / kWarps;
        chunks = std::max(chunks, slices[i].w.chunks);
    }
    if (blocks * ((chunks + 3) / 4) >= kMinBlocksPerSm * sm_count)
        dequantize_gptq4_kernel<4><<<dim3(blocks, (chunks + 3) / 4), kWarps * 32, 0, stream>>>(batch);
    else
        dequantize_gptq4_kernel<2><<<dim3(blocks, (chunks + 1) / 2), kWarps * 32, 0, stream>>>(batch);
    QATTN_LAUNCH_CHECK("dequantize_gptq4");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
