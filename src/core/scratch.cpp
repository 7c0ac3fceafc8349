// qattn_scratch_create / qattn_scratch_destroy: per-call device memory that
// layers of one device share (qattn.h). The backend owns what it holds; the
// handle and every layer made with it keep a reference.
#include "core/guard.h"
#include "core/handles.h"
#include "core/validate.h"

namespace qattn {
namespace {

qattn_status create(int device, qattn_scratch** out) {
    QATTN_REQUIRE_ARG(out != nullptr, "qattn_scratch_create: out is NULL");
    *out = nullptr;
    QATTN_TRY(check_device(device));
    auto scratch = std::make_unique<qattn_scratch>();
    scratch->device = device;
#if defined(QATTN_WITH_CUDA)
    if (device != QATTN_DEVICE_CPU) QATTN_TRY(cuda::create_scratch(device, &scratch->impl));
#endif
    *out = scratch.release();
    return QATTN_SUCCESS;
}

}  // namespace
}  // namespace qattn

extern "C" {

qattn_status qattn_scratch_create(int device, qattn_scratch** out) {
    return qattn::guarded("qattn_scratch_create", [&] { return qattn::create(device, out); });
}

qattn_status qattn_scratch_destroy(qattn_scratch* scratch) {
    return qattn::guarded("qattn_scratch_destroy", [&] {
        delete scratch;
        return QATTN_SUCCESS;
    });
}

}  // extern "C"
