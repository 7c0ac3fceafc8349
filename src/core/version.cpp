#include "core/backend.h"
#include "core/device.h"

#include <string>

extern "C" {

int qattn_version(void) { return QATTN_VERSION; }

const char* qattn_build_info(void) {
    static const std::string info = [] {
        std::string s = "qattn " + std::to_string(QATTN_VERSION_MAJOR) + "." + std::to_string(QATTN_VERSION_MINOR) +
                        "." + std::to_string(QATTN_VERSION_PATCH) + "; backends: cpu";
#if defined(QATTN_WITH_CUDA)
        s += ", cuda (archs ";
        s += qattn::cuda::architectures();
        s += ")";
#endif
        return s;
    }();
    return info.c_str();
}

int qattn_cuda_device_count(void) { return qattn::cuda_device_count(); }

}  // extern "C"
