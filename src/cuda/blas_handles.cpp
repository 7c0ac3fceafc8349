#include "cuda/blas_handles.h"

#include <condition_variable>
#include <map>
#include <mutex>
#include <vector>

namespace qattn::cuda {
namespace {

struct DeviceHandles {
    int users = 0;
    std::vector<cublasHandle_t> free;
};

std::mutex mutex;
std::condition_variable handle_returned;

// Never destroyed: layers destroyed during static destruction still find it.
std::map<int, DeviceHandles>& devices() {
    static auto* all = new std::map<int, DeviceHandles>;
    return *all;
}

}  // namespace

qattn_status attach_blas_user(int device) {
    std::lock_guard<std::mutex> lock(mutex);
    DeviceHandles& d = devices()[device];
    if (d.users == 0) {  // no handle left: the last detach destroyed them, and no call holds one
        cublasHandle_t handle = nullptr;
        QATTN_CUBLAS_TRY(cublasCreate(&handle));
        d.free.push_back(handle);
    }
    ++d.users;
    return QATTN_SUCCESS;
}

void detach_blas_user(int device) {
    std::vector<cublasHandle_t> unused;
    {
        std::lock_guard<std::mutex> lock(mutex);
        DeviceHandles& d = devices()[device];
        if (--d.users == 0) unused.swap(d.free);
    }
    for (cublasHandle_t h : unused) cublasDestroy(h);
}

qattn_status BlasLease::get(bool capturing, cublasHandle_t* out) {
    if (!handle_) {
        std::unique_lock<std::mutex> lock(mutex);
        DeviceHandles& d = devices()[device_];
        // The handles in use belong to calls that are only enqueueing work: a wait
        // here is as long as one such call on another thread.
        if (capturing) handle_returned.wait(lock, [&] { return !d.free.empty(); });
        if (!d.free.empty()) {
            handle_ = d.free.back();
            d.free.pop_back();
        } else {
            lock.unlock();
            QATTN_CUBLAS_TRY(cublasCreate(&handle_));
        }
    }
    *out = handle_;
    return QATTN_SUCCESS;
}

BlasLease::~BlasLease() {
    if (!handle_) return;
    {
        std::lock_guard<std::mutex> lock(mutex);
        devices()[device_].free.push_back(handle_);
    }
    handle_returned.notify_all();
}

}  // namespace qattn::cuda
