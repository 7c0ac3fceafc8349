// CUDA and cuBLAS failures become QATTN_ERROR_CUDA with the failing call and the
// runtime's own text, so a caller sees which step broke and why.
#pragma once

#include "core/error.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <utility>

#define QATTN_CUDA_TRY(expr)                                                                              \
    do {                                                                                                  \
        cudaError_t qattn_cuda_err_ = (expr);                                                             \
        if (qattn_cuda_err_ != cudaSuccess) {                                                             \
            (void)cudaGetLastError();                                                                     \
            return ::qattn::fail(qattn_cuda_err_ == cudaErrorMemoryAllocation ? QATTN_ERROR_OUT_OF_MEMORY \
                                                                              : QATTN_ERROR_CUDA,         \
                                 "%s failed: %s (%s)", #expr, cudaGetErrorString(qattn_cuda_err_),        \
                                 cudaGetErrorName(qattn_cuda_err_));                                      \
        }                                                                                                 \
    } while (0)

#define QATTN_CUBLAS_TRY(expr)                                                                            \
    do {                                                                                                  \
        cublasStatus_t qattn_cublas_st_ = (expr);                                                         \
        if (qattn_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                                    \
            return ::qattn::fail(QATTN_ERROR_CUDA, "%s failed: %s", #expr,                                \
                                 cublasGetStatusString(qattn_cublas_st_));                                \
    } while (0)

// A kernel launch reports bad configurations only through the last-error state.
#define QATTN_LAUNCH_CHECK(name)                                                                          \
    do {                                                                                                  \
        cudaError_t qattn_launch_err_ = cudaGetLastError();                                               \
        if (qattn_launch_err_ != cudaSuccess)                                                             \
            return ::qattn::fail(QATTN_ERROR_CUDA, "launching the %s kernel failed: %s (%s)", name,       \
                                 cudaGetErrorString(qattn_launch_err_), cudaGetErrorName(qattn_launch_err_)); \
    } while (0)

namespace qattn::cuda {

// Makes `device` current for a scope and restores the caller's device after, so
// the library never leaves a different device current behind.
class DeviceGuard {
public:
    DeviceGuard() = default;
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;
    ~DeviceGuard() {
        if (changed_) cudaSetDevice(previous_);
    }
    qattn_status enter(int device) {
        QATTN_CUDA_TRY(cudaGetDevice(&previous_));
        if (previous_ != device) {
            QATTN_CUDA_TRY(cudaSetDevice(device));
            changed_ = true;
        }
        return QATTN_SUCCESS;
    }

private:
    int previous_ = 0;
    bool changed_ = false;
};

// Owns one cudaMalloc allocation; freed on the device it was made on.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& other) noexcept { swap(other); }
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
        DeviceBuffer moved(std::move(other));
        swap(moved);
        return *this;
    }
    ~DeviceBuffer() {
        if (ptr_ == nullptr) return;
        int current = 0;
        const bool switched = cudaGetDevice(&current) == cudaSuccess && current != device_ &&
                              cudaSetDevice(device_) == cudaSuccess;
        cudaFree(ptr_);
        if (switched) cudaSetDevice(current);
    }

    // Allocates on the current device (the caller holds a DeviceGuard).
    qattn_status allocate(size_t bytes) {
        *this = DeviceBuffer();
        if (bytes == 0) return QATTN_SUCCESS;
        QATTN_CUDA_TRY(cudaGetDevice(&device_));
        QATTN_CUDA_TRY(cudaMalloc(&ptr_, bytes));
        bytes_ = bytes;
        return QATTN_SUCCESS;
    }
    // Allocates and fills from host memory.
    qattn_status upload(const void* host, size_t bytes) {
        QATTN_TRY(allocate(bytes));
        if (bytes) QATTN_CUDA_TRY(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice));
        return QATTN_SUCCESS;
    }

    template <typename T = void>
    T* get() const { return static_cast<T*>(ptr_); }
    size_t bytes() const { return bytes_; }

private:
    void swap(DeviceBuffer& o) noexcept {
        std::swap(ptr_, o.ptr_);
        std::swap(bytes_, o.bytes_);
        std::swap(device_, o.device_);
    }
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
    int device_ = 0;
};

}  // namespace qattn::cuda
