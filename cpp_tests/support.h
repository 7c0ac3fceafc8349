// Test support: fp16 conversion, random data, device memory (host or CUDA) and
// a status-checking assertion. Written independently of src/ so that the tests
// do not share the library's mistakes.
#pragma once

#include "qattn.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <new>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(QATTN_TESTS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace qtest {

// ---- fp16 -------------------------------------------------------------------

inline double from_half(uint16_t h) {
    const int sign = (h & 0x8000) ? -1 : 1;
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x3ff;
    if (exponent == 0x1f) return mantissa ? NAN : sign * INFINITY;
    if (exponent == 0) return sign * std::ldexp(mantissa, -24);
    return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

// Round to nearest even (the default floating-point rounding mode of nearbyint).
inline uint16_t to_half(double v) {
    const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
    const double a = std::fabs(v);
    if (a == 0.0) return sign;
    int e;
    std::frexp(a, &e);
    int exponent = std::max(e - 1, -14);  // a in [2^exponent, 2^(exponent+1)) unless subnormal
    double mantissa = std::nearbyint(std::ldexp(a, 10 - exponent));
    if (mantissa >= 2048) {
        mantissa /= 2;
        exponent += 1;
    }
    if (exponent > 15) return sign | 0x7c00;
    if (mantissa < 1024) return sign | static_cast<uint16_t>(mantissa);
    return sign | static_cast<uint16_t>(((exponent + 15) << 10) | (static_cast<int>(mantissa) - 1024));
}

// ---- random data --------------------------------------------------------------

class Random {
public:
    explicit Random(uint32_t seed) : engine_(seed) {}
    double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(engine_); }
    int integer(int lo, int hi_inclusive) { return std::uniform_int_distribution<int>(lo, hi_inclusive)(engine_); }
    // fp16 values uniform in [lo, hi), as bits.
    std::vector<uint16_t> halves(size_t n, double lo, double hi) {
        std::vector<uint16_t> out(n);
        for (auto& h : out) h = to_half(uniform(lo, hi));
        return out;
    }
    std::mt19937& engine() { return engine_; }

private:
    std::mt19937 engine_;
};

inline std::vector<double> widen(const std::vector<uint16_t>& h) {
    std::vector<double> out(h.size());
    for (size_t i = 0; i < h.size(); ++i) out[i] = from_half(h[i]);
    return out;
}

// ||out - ref|| / ||ref||
inline double relative_error(const std::vector<double>& out, const std::vector<double>& ref) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        diff += (out[i] - ref[i]) * (out[i] - ref[i]);
        norm += ref[i] * ref[i];
    }
    return std::sqrt(diff) / std::sqrt(norm);
}

// ---- devices --------------------------------------------------------------------

inline bool cuda_available() { return qattn_cuda_device_count() > 0; }

inline std::string device_name(int device) {
    return device == QATTN_DEVICE_CPU ? "cpu" : "cuda" + std::to_string(device);
}

// Skips the current test when `device` is a CUDA device this machine or build lacks.
#define QTEST_SKIP_IF_ABSENT(device)                                                          \
    do {                                                                                      \
        if ((device) != QATTN_DEVICE_CPU && !::qtest::cuda_runtime_usable())                  \
            GTEST_SKIP() << "no usable CUDA device (or the tests were built without CUDA)";   \
    } while (0)

inline bool cuda_runtime_usable() {
#if defined(QATTN_TESTS_WITH_CUDA)
    return cuda_available();
#else
    return false;
#endif
}

// A buffer in the memory of a device: host memory for QATTN_DEVICE_CPU, else
// cudaMalloc'ed memory of that CUDA device.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(int device, size_t bytes) : device_(device), bytes_(bytes) {
        if (device == QATTN_DEVICE_CPU) {
            // 256-byte aligned like cudaMalloc, so one test serves both devices.
            host_.reset(static_cast<unsigned char*>(::operator new(std::max<size_t>(bytes, 1), kAlignment)));
            ptr_ = host_.get();
        } else {
#if defined(QATTN_TESTS_WITH_CUDA)
            const cudaError_t err = cudaSetDevice(device) == cudaSuccess ? cudaMalloc(&ptr_, bytes) : cudaErrorInvalidDevice;
            if (err != cudaSuccess) {
                ptr_ = nullptr;
                ADD_FAILURE() << "cudaMalloc of " << bytes << " bytes on device " << device << ": "
                              << cudaGetErrorString(err);
            }
#endif
        }
    }
    template <typename T>
    DeviceBuffer(int device, const std::vector<T>& values) : DeviceBuffer(device, values.size() * sizeof(T)) {
        upload(values.data());
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        release();
        device_ = o.device_;
        bytes_ = o.bytes_;
        ptr_ = o.ptr_;
        host_ = std::move(o.host_);
        o.ptr_ = nullptr;
        return *this;
    }
    ~DeviceBuffer() { release(); }

    void upload(const void* src) {
        if (device_ == QATTN_DEVICE_CPU) {
            std::memcpy(ptr_, src, bytes_);
        } else {
#if defined(QATTN_TESTS_WITH_CUDA)
            // Pageable copies may return before the DMA lands, and the library works on
            // non-blocking streams that do not wait for the legacy stream: wait here.
            cudaError_t err = cudaMemcpy(ptr_, src, bytes_, cudaMemcpyHostToDevice);
            if (err == cudaSuccess) err = cudaDeviceSynchronize();
            if (err != cudaSuccess) ADD_FAILURE() << "cudaMemcpy to the device: " << cudaGetErrorString(err);
#endif
        }
    }
    template <typename T>
    std::vector<T> download() const {
        std::vector<T> out(bytes_ / sizeof(T));
        if (device_ == QATTN_DEVICE_CPU) {
            std::memcpy(out.data(), ptr_, bytes_);
        } else {
#if defined(QATTN_TESTS_WITH_CUDA)
            cudaError_t err = cudaDeviceSynchronize();
            if (err == cudaSuccess) err = cudaMemcpy(out.data(), ptr_, bytes_, cudaMemcpyDeviceToHost);
            if (err != cudaSuccess) ADD_FAILURE() << "cudaMemcpy from the device: " << cudaGetErrorString(err);
#endif
        }
        return out;
    }
    void* get() const { return ptr_; }
    template <typename T>
    T* as() const { return static_cast<T*>(ptr_); }

private:
    void release() {
#if defined(QATTN_TESTS_WITH_CUDA)
        if (ptr_ && device_ != QATTN_DEVICE_CPU) cudaFree(ptr_);
#endif
        ptr_ = nullptr;
        host_.reset();
    }

    static constexpr std::align_val_t kAlignment{256};
    struct AlignedDelete {
        void operator()(unsigned char* p) const { ::operator delete(p, kAlignment); }
    };

    int device_ = QATTN_DEVICE_CPU;
    size_t bytes_ = 0;
    void* ptr_ = nullptr;
    std::unique_ptr<unsigned char, AlignedDelete> host_;
};

// A stream for the device: a fresh non-blocking CUDA stream (so that the library's
// work is ordered by the stream it is given, not by the legacy default stream),
// or NULL on the CPU.
class Stream {
public:
    explicit Stream(int device) {
#if defined(QATTN_TESTS_WITH_CUDA)
        if (device != QATTN_DEVICE_CPU) {
            cudaSetDevice(device);
            cudaStream_t s = nullptr;
            if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess) stream_ = s;
        }
#else
        (void)device;
#endif
    }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    ~Stream() {
#if defined(QATTN_TESTS_WITH_CUDA)
        if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
#endif
    }
    void* get() const { return stream_; }
    void synchronize() const {
#if defined(QATTN_TESTS_WITH_CUDA)
        if (stream_) cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
#endif
    }

private:
    void* stream_ = nullptr;
};

// ---- handles ------------------------------------------------------------------------

struct QMatrixDeleter {
    void operator()(qattn_qmatrix* m) const { qattn_qmatrix_destroy(m); }
};
struct LayerDeleter {
    void operator()(qattn_layer* l) const { qattn_destroy(l); }
};
using QMatrixPtr = std::unique_ptr<qattn_qmatrix, QMatrixDeleter>;
using LayerPtr = std::unique_ptr<qattn_layer, LayerDeleter>;
struct ScratchDeleter {
    void operator()(qattn_scratch* s) const { qattn_scratch_destroy(s); }
};
using ScratchPtr = std::unique_ptr<qattn_scratch, ScratchDeleter>;

inline std::string failure_text(qattn_status s) {
    return std::string(qattn_status_string(s)) + ": " + qattn_last_error();
}

}  // namespace qtest

#define QTEST_ASSERT_OK(call)                                                          \
    do {                                                                               \
        const qattn_status qtest_status_ = (call);                                     \
        ASSERT_EQ(qtest_status_, QATTN_SUCCESS) << #call << " -> "                     \
                                                << ::qtest::failure_text(qtest_status_); \
    } while (0)

// The call fails with `status` and qattn_last_error() mentions `needle`.
#define QTEST_EXPECT_ERROR(call, status, needle)                                                 \
    do {                                                                                         \
        const qattn_status qtest_status_ = (call);                                               \
        EXPECT_EQ(qtest_status_, (status)) << #call << " -> " << ::qtest::failure_text(qtest_status_); \
        const std::string qtest_message_ = qattn_last_error();                                   \
        EXPECT_NE(qtest_message_.find(needle), std::string::npos)                                \
            << #call << ": last error \"" << qtest_message_ << "\" does not mention \"" << (needle) << "\""; \
    } while (0)
