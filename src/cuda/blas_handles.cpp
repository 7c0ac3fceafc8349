#include "cuda/blas_handles.h"

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

// Never destroyed: layers destroyed during static destruction still find it.
std::map<int, DeviceHandles>& devices() {
    static auto* all = new std::map<int, DeviceHandles>;
    return *all;
}

}  // namespace

void attach_blas_user(int device) {
    std::lock_guard<std::mutex> lock(mutex);
    ++devices()[device].users;
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

qattn_status BlasLease::get(cublasHandle_t* out) {
    if (!handle_) {
        {
            std::lock_guard<std::mutex> lock(mutex);
            std::vector<cublasHandle_t>& free = devices()[device_].free;
            if (!free.empty()) {
                handle_ = free.back();
                free.pop_back();
            }
        }
        if (!handle_) QATTN_CUBLAS_TRY(cublasCreate(&handle_));
    }
    *out = handle_;
    return QATTN_SUCCESS;
}

BlasLease::~BlasLease() {
    if (!handle_) return;
    std::lock_guard<std::mutex> lock(mutex);
    devices()[device_].free.push_back(handle_);
}

}  // namespace qattn::cuda
