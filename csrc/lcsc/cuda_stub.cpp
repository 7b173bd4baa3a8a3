// Compiled instead of merge_cuda.cu and lora_cuda.cu when CMake finds no CUDA compiler (or LCSC_CUDA=OFF).
#include <stdexcept>

#include "lora.h"
#include "merge.h"

namespace lcsc {

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }

void merge_cuda(const MergeArgs&, int, uintptr_t) {
  throw std::runtime_error(
      "lcsc_fast was built without CUDA; reinstall with nvcc on PATH to merge CUDA tensors");
}

CudaMergeTables::CudaMergeTables(const MergeArgs&) {
  throw std::runtime_error(
      "lcsc_fast was built without CUDA; reinstall with nvcc on PATH to merge CUDA tensors");
}
void CudaMergeTables::run(const void*, const float*, int, uintptr_t) const {}
std::vector<float> CudaMergeTables::pass_coeffs(const float*, std::vector<size_t>*) const {
  return {};
}
void CudaMergeTables::launch(const char*, const float*, const std::vector<size_t>&, int,
                             void*) const {}

void lora_cuda(const LoraArgs&, int, uintptr_t) {
  throw std::runtime_error(
      "lcsc_fast was built without CUDA; reinstall with nvcc on PATH to merge CUDA tensors");
}

}  // namespace lcsc
