// cuBLAS handles shared by the CUDA layers of a device. A handle holds tens of
// MiB of device memory (64.5 MiB each on an H200 with CUDA 13), and a layer
// needs one only while one of its calls runs: a call leases a free handle of its
// device and gives it back at its end, so a device has as many handles as calls
// ran on it at once, not one per layer. Each layer keeps its own workspace and
// sets it, with its stream, on the leased handle: two layers running on two
// streams must not share a workspace.
//
// cublasCreate allocates, which a stream capture forbids: a device's first
// handle is made with its first layer, and a call made during a capture that
// finds no handle free waits for one instead of making one. A device's handles
// are destroyed with its last layer.
#pragma once

#include "cuda/check.h"

namespace qattn::cuda {

// A layer of `device` exists from attach to detach (both with the device current).
qattn_status attach_blas_user(int device);
void detach_blas_user(int device);

// One call's handle: taken on first use, given back when the lease ends.
class BlasLease {
public:
    explicit BlasLease(int device) : device_(device) {}
    ~BlasLease();
    BlasLease(const BlasLease&) = delete;
    BlasLease& operator=(const BlasLease&) = delete;
    // `capturing`: the call's stream is being captured, so no handle may be made.
    qattn_status get(bool capturing, cublasHandle_t* out);

private:
    int device_;
    cublasHandle_t handle_ = nullptr;
};

}  // namespace qattn::cuda
