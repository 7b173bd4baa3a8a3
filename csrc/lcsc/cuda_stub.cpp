// Compiled instead of merge_cuda.cu and lora_cuda.cu when CMake finds no CUDA compiler (or LCSC_CUDA=OFF).
#include <stdexcept>

#include "lora.h"
#include "merge.h"

namespace lcsc {

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "lcsc_fast was built without CUDA; reinstall with nvcc on PATH to merge CUDA tensors");
}

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }

void merge_cuda(const MergeArgs&, int, uintptr_t) {
  throw std::runtime_error(
      "lcsc_fast was built without CUDA; reinstall with nvcc on PATH to merge CUDA tensors");
}

// The constructor throws, so no instance exists; the members throw too rather than do nothing.
CudaMergeTables::CudaMergeTables(const MergeArgs&) { no_cuda(); }
void CudaMergeTables::run(const void*, const float*, int, uintptr_t) const { no_cuda(); }
std::vector<float> CudaMergeTables::pass_coeffs(const float*, std::vector<size_t>*) const {
  no_cuda();
}
void CudaMergeTables::launch(const char*, const float*, const std::vector<size_t>&, int,
                             void*) const {
  no_cuda();
}

void lora_cuda(const LoraArgs&, int, uintptr_t) {
  throw std::runtime_error(
      "lcsc_fast was built without CUDA; reinstall with nvcc on PATH to merge CUDA tensors");
}

}  // namespace lcsc
