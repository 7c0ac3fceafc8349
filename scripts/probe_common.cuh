// What the standalone CUDA probes in scripts/ share: a status check that exits,
// random fp16 data and an event-timed median.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CHECK(call)                                                                   \
    do {                                                                              \
        auto status_ = (call);                                                        \
        if (static_cast<int>(status_) != 0) {                                         \
            std::fprintf(stderr, "%s:%d: %s -> %d\n", __FILE__, __LINE__, #call,     \
                         static_cast<int>(status_));                                  \
            std::exit(1);                                                             \
        }                                                                             \
    } while (0)

namespace probe {

__host__ __device__ inline uint32_t hash(uint32_t i, uint32_t seed) {
    uint32_t h = i * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    return h;
}

// Random values in (-1, 1) (not a constant: the tensor cores' power, so their
// clocks, depend on the data).
__global__ void fill_random(__half* p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        p[i] = __float2half((hash(static_cast<uint32_t>(i), seed) & 0xFFFF) / 32768.0f - 1.0f);
}

// Median µs of run(i % copies) over `reps` runs after three warm-up runs, by
// CUDA events (copies: operand sets cycled to keep the L2 cold).
inline float median_us(const std::function<void(int)>& run, int copies = 1, int reps = 20) {
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    for (int i = 0; i < 3; ++i) run(i % copies);
    std::vector<float> times;
    for (int i = 0; i < reps; ++i) {
        CHECK(cudaEventRecord(start));
        run(i % copies);
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms * 1e3f);
    }
    std::sort(times.begin(), times.end());
    CHECK(cudaEventDestroy(start));
    CHECK(cudaEventDestroy(stop));
    return times[times.size() / 2];
}

}  // namespace probe
