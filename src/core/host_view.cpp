#include "core/device.h"

namespace qattn {

qattn_status HostView::load(const void* src, size_t bytes) {
    if (src == nullptr || !locate(src).on_cuda_device) {
        data_ = src;
        return QATTN_SUCCESS;
    }
    copy_.resize(bytes);
    qattn_status status = copy_to_host(copy_.data(), src, bytes);
    data_ = copy_.data();
    return status;
}

}  // namespace qattn
