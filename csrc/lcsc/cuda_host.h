// Host-side pieces shared by the CUDA ops (merge_cuda.cu, lora_cuda.cu): error checks, the
// tensors' device made current for one op, and the op's device scratch.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace lcsc::cuda {

// Throws "lcsc_fast CUDA <op>: <what> failed: <CUDA's message>".
inline void check(cudaError_t err, const char* op, const std::string& what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lcsc_fast CUDA ") + op + ": " + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the lifetime of the guard and then gives the caller back its own
// current device: torch reads the same per-thread state, so a merge of tensors on cuda:1 must
// not move the caller's later torch.empty(device="cuda") there.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    check(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), op, "cudaSetDevice");
    switched_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Device memory allocated and freed in the order of `stream`: the free is queued behind the
// kernels that read it, and also when the op throws after allocating. Devices without memory
// pools (cudaMallocAsync unsupported: some vGPU and older driver setups) get cudaMalloc, and
// cudaFree, which waits for the device's queued work before it frees.
class StreamScratch {
 public:
  StreamScratch(size_t nbytes, cudaStream_t stream, const char* op) : stream_(stream) {
    int device = 0, pools = 0;
    check(cudaGetDevice(&device), op, "cudaGetDevice");
    check(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device), op,
          "cudaDeviceGetAttribute(cudaDevAttrMemoryPoolsSupported)");
    async_ = pools != 0;
    if (async_) {
      check(cudaMallocAsync(&ptr_, nbytes, stream), op, "cudaMallocAsync");
    } else {
      check(cudaMalloc(&ptr_, nbytes), op, "cudaMalloc");
    }
  }
  ~StreamScratch() {
    if (async_) {
      cudaFreeAsync(ptr_, stream_);
    } else {
      cudaFree(ptr_);
    }
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;

  char* get() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
  bool async_ = true;
};

}  // namespace lcsc::cuda
