// The one file that needs a Torch built with CUDA: tells the NCCL backend
// which stream is the caller's current one (Torch's current CUDA stream).
// Built only with LOOM_WITH_CUDA.
#include <c10/cuda/CUDAStream.h>

#include "loom/runtime/comm/nccl_communicator.h"

namespace loom {
namespace {
void* torch_current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
// Installed when libloom loads.
const bool installed = [] {
  set_current_stream_provider(&torch_current_stream);
  return true;
}();
}  // namespace
}  // namespace loom
