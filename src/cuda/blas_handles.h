// cuBLAS handles shared by the CUDA layers of a device. A handle holds tens of
// MiB of device memory (64.5 MiB each on an H200 with CUDA 13), and a layer
// needs one only while one of its calls runs: a call leases a free handle of its
// device (made if none is free) and gives it back at its end, so a device has as
// many handles as calls ran on it at once, not one per layer. Each layer keeps
// its own workspace and sets it, with its stream, on the leased handle: two
// layers running on two streams must not share a workspace. A device's handles
// are destroyed with its last layer.
#pragma once

#include "cuda/check.h"

namespace qattn::cuda {

// A layer of `device` exists from attach to detach; the last detach destroys
// the device's handles (call it with the device current).
void attach_blas_user(int device);
void detach_blas_user(int device);

// One call's handle: taken on first use (the device current), given back when
// the lease ends.
class BlasLease {
public:
    explicit BlasLease(int device) : device_(device) {}
    ~BlasLease();
    BlasLease(const BlasLease&) = delete;
    BlasLease& operator=(const BlasLease&) = delete;
    qattn_status get(cublasHandle_t* out);

private:
    int device_;
    cublasHandle_t handle_ = nullptr;
};

}  // namespace qattn::cuda
