// CUDA merge: the same op as merge_cpu.cpp, enqueued on the caller's stream.
//
// A block handles one tile of 2048 elements of one tensor (256 threads x 8 elements); blocks
// stride over the tiles of all tensors. Each thread folds its 8 elements of every source into
// up to eight outputs' float32 accumulators held in registers, and writes each output once. In
// a full tile of a tensor whose pointers are all 16-byte aligned, a thread's elements are
// consecutive and come with one 16-byte load (two for float32); in any other tile they lie
// 256 apart, so that each warp's scalar loads still cover consecutive addresses. The
// per-element math is elementwise.h's, shared with the CPU path, so the results agree bitwise.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_host.h"
#include "elementwise.h"
#include "merge.h"

namespace lcsc {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 8;
constexpr int64_t kTileElems = kThreads * kElemsPerThread;
constexpr int kMaxOutputsPerPass = 8;  // more outputs re-read the sources once per 8

struct DeviceTables {
  int64_t num_tensors, num_sources, total_tiles;
  const int64_t* numels;       // [T]
  const int64_t* first_tile;   // [T + 1]
  const uint8_t* vector_ok;    // [T]: every pointer of the tensor is 16-byte aligned
  void* const* outs;           // [K, T]
  const int32_t* out_dtypes;   // [T]
  const void* const* bases;    // [T]
  const int32_t* base_dtypes;  // [T]
  const void* const* srcs;     // [T, N]
  const int32_t* src_dtypes;   // [T, N]
  const float* coeffs;         // [K, N]
};

constexpr char kOp[] = "merge";

void check(cudaError_t err, const std::string& what) { cuda::check(err, kOp, what); }

__device__ __forceinline__ void unpack_halves(uint32_t word, int32_t dtype, float* x) {
  const uint16_t lo = uint16_t(word & 0xffffu), hi = uint16_t(word >> 16);
  x[0] = dtype == kFloat16 ? half_to_float(lo) : bf16_to_float(lo);
  x[1] = dtype == kFloat16 ? half_to_float(hi) : bf16_to_float(hi);
}

// This thread's element q (< 8) of the tile that starts at element tile0; see the top comment.
__device__ __forceinline__ int64_t element(int64_t tile0, bool vec, int q) {
  return vec ? tile0 + int64_t(threadIdx.x) * kElemsPerThread + q
             : tile0 + int64_t(q) * kThreads + threadIdx.x;
}

// x[q] = this thread's element q of p as float, 0 past numel (vec: a full tile, p aligned).
__device__ __forceinline__ void load8(const void* p, int64_t tile0, int64_t numel, int32_t dtype,
                                      bool vec, float* x) {
  const int64_t e = element(tile0, vec, 0);
  if (vec && dtype == kFloat32) {
    const float4* v = reinterpret_cast<const float4*>(static_cast<const float*>(p) + e);
    const float4 a = __ldg(v), b = __ldg(v + 1);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else if (vec) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + e));
    unpack_halves(r.x, dtype, x);
    unpack_halves(r.y, dtype, x + 2);
    unpack_halves(r.z, dtype, x + 4);
    unpack_halves(r.w, dtype, x + 6);
  } else {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) {
      const int64_t eq = element(tile0, false, q);
      x[q] = eq < numel ? load_as_float(p, eq, dtype) : 0.f;
    }
  }
}

__device__ __forceinline__ uint32_t pack_halves(float a, float b, int32_t dtype) {
  const uint16_t lo = dtype == kFloat16 ? float_to_half(a) : float_to_bf16(a);
  const uint16_t hi = dtype == kFloat16 ? float_to_half(b) : float_to_bf16(b);
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

__device__ __forceinline__ void store8(void* p, int64_t tile0, int64_t numel, int32_t dtype,
                                       bool vec, const float* x) {
  const int64_t e = element(tile0, vec, 0);
  if (vec && dtype == kFloat32) {
    float4* v = reinterpret_cast<float4*>(static_cast<float*>(p) + e);
    v[0] = make_float4(x[0], x[1], x[2], x[3]);
    v[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else if (vec) {
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + e) =
        make_uint4(pack_halves(x[0], x[1], dtype), pack_halves(x[2], x[3], dtype),
                   pack_halves(x[4], x[5], dtype), pack_halves(x[6], x[7], dtype));
  } else {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) {
      const int64_t eq = element(tile0, false, q);
      if (eq < numel) store_from_float(p, eq, dtype, x[q]);
    }
  }
}

// Outputs k0 .. k0 + kc - 1 (kc <= KB) of every tensor.
template <int KB>
__global__ void __launch_bounds__(kThreads) merge_kernel(DeviceTables d, int64_t k0, int kc) {
  const int64_t N = d.num_sources, T = d.num_tensors;
  for (int64_t g = blockIdx.x; g < d.total_tiles; g += gridDim.x) {
    int64_t lo = 0, hi = T;  // the tensor t with first_tile[t] <= g < first_tile[t + 1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (d.first_tile[mid] <= g) lo = mid; else hi = mid;
    }
    const int64_t t = lo;
    const int64_t tile0 = (g - d.first_tile[t]) * kTileElems;
    const int64_t numel = d.numels[t];
    const bool vec = d.vector_ok[t] && tile0 + kTileElems <= numel;
    if (element(tile0, vec, 0) >= numel) continue;  // a thread past the end of a last tile

    float acc[KB][kElemsPerThread];
#pragma unroll
    for (int k = 0; k < KB; ++k)
#pragma unroll
      for (int q = 0; q < kElemsPerThread; ++q) acc[k][q] = 0.f;

    const void* const* srcs = d.srcs + t * N;
    const int32_t* src_dtypes = d.src_dtypes + t * N;
#pragma unroll 4
    for (int64_t i = 0; i < N; ++i) {
      float x[kElemsPerThread];
      load8(srcs[i], tile0, numel, src_dtypes[i], vec, x);
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        if (k >= kc) break;
        const float c = __ldg(d.coeffs + (k0 + k) * N + i);
#pragma unroll
        for (int q = 0; q < kElemsPerThread; ++q) acc[k][q] = accumulate(acc[k][q], c, x[q]);
      }
    }

    const void* base = d.bases[t];
    float b[kElemsPerThread];
    if (base != nullptr) load8(base, tile0, numel, d.base_dtypes[t], vec, b);
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k >= kc) break;
      if (base != nullptr) {
#pragma unroll
        for (int q = 0; q < kElemsPerThread; ++q) acc[k][q] = acc[k][q] + b[q];
      }
      store8(d.outs[(k0 + k) * T + t], tile0, numel, d.out_dtypes[t], vec, acc[k]);
    }
  }
}

// Host tables packed into one buffer so that one copy moves them to the device.
class Blob {
 public:
  template <class T>
  size_t append(const T* data, size_t count) {
    const size_t offset = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(offset + count * sizeof(T));
    if (count) std::memcpy(bytes_.data() + offset, data, count * sizeof(T));
    return offset;
  }
  const std::vector<char>& bytes() const { return bytes_; }

 private:
  std::vector<char> bytes_;
};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error here, just none
    return 0;
  }
  return count;
}

void merge_cuda(const MergeArgs& a, int device, uintptr_t stream_handle) {
  validate(a);
  const int64_t T = a.num_tensors, N = a.num_sources, K = a.num_outputs;
  std::vector<int64_t> first_tile(T + 1, 0);
  std::vector<uint8_t> vector_ok(T, 1);
  for (int64_t t = 0; t < T; ++t) {
    first_tile[t + 1] = first_tile[t] + (a.numels[t] + kTileElems - 1) / kTileElems;
    bool ok = a.bases[t] == nullptr || aligned16(a.bases[t]);
    for (int64_t k = 0; k < K; ++k) ok = ok && aligned16(a.outs[k * T + t]);
    for (int64_t i = 0; i < N; ++i) ok = ok && aligned16(a.srcs[t * N + i]);
    vector_ok[t] = ok;
  }
  const int64_t total_tiles = first_tile[T];
  if (total_tiles == 0) return;
  if (K > kMaxOutputsPerPass) {
    // Outputs past the first pass re-read the inputs, so none may alias an output.
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const void* out = a.outs[k * T + t];
        bool aliased = out == a.bases[t];
        for (int64_t i = 0; i < N; ++i) aliased = aliased || out == a.srcs[t * N + i];
        if (aliased && a.numels[t] > 0) {
          throw std::invalid_argument(
              "on CUDA, a batch of more than 8 outputs cannot write into one of its inputs "
              "(output " + std::to_string(k) + " of tensor " + std::to_string(t) +
              "); use separate output tensors");
        }
      }
    }
  }

  Blob blob;
  const size_t o_numels = blob.append(a.numels, T);
  const size_t o_first = blob.append(first_tile.data(), T + 1);
  const size_t o_vec = blob.append(vector_ok.data(), T);
  const size_t o_outs = blob.append(a.outs, K * T);
  const size_t o_out_dt = blob.append(a.out_dtypes, T);
  const size_t o_bases = blob.append(a.bases, T);
  const size_t o_base_dt = blob.append(a.base_dtypes, T);
  const size_t o_srcs = blob.append(a.srcs, T * N);
  const size_t o_src_dt = blob.append(a.src_dtypes, T * N);
  const size_t o_coeffs = blob.append(a.coeffs, K * N);

  const cuda::DeviceGuard guard(device, kOp);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int sm_count = 0;
  check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  const cuda::StreamScratch scratch(blob.bytes().size(), stream, kOp);
  char* dev = scratch.get();
  // From pageable memory: returns once the bytes are staged, so the blob may go out of scope.
  check(cudaMemcpyAsync(dev, blob.bytes().data(), blob.bytes().size(), cudaMemcpyHostToDevice,
                        stream), "cudaMemcpyAsync");
  DeviceTables d{T, N, total_tiles,
                 reinterpret_cast<const int64_t*>(dev + o_numels),
                 reinterpret_cast<const int64_t*>(dev + o_first),
                 reinterpret_cast<const uint8_t*>(dev + o_vec),
                 reinterpret_cast<void* const*>(dev + o_outs),
                 reinterpret_cast<const int32_t*>(dev + o_out_dt),
                 reinterpret_cast<const void* const*>(dev + o_bases),
                 reinterpret_cast<const int32_t*>(dev + o_base_dt),
                 reinterpret_cast<const void* const*>(dev + o_srcs),
                 reinterpret_cast<const int32_t*>(dev + o_src_dt),
                 reinterpret_cast<const float*>(dev + o_coeffs)};
  const unsigned grid = unsigned(std::min<int64_t>(total_tiles, int64_t(sm_count) * 8));
  for (int64_t k0 = 0; k0 < K; k0 += kMaxOutputsPerPass) {
    const int kc = int(std::min<int64_t>(kMaxOutputsPerPass, K - k0));
    const int kb = kc == 1 ? 1 : kc == 2 ? 2 : kc <= 4 ? 4 : 8;
    if (kb == 1) merge_kernel<1><<<grid, kThreads, 0, stream>>>(d, k0, kc);
    else if (kb == 2) merge_kernel<2><<<grid, kThreads, 0, stream>>>(d, k0, kc);
    else if (kb == 4) merge_kernel<4><<<grid, kThreads, 0, stream>>>(d, k0, kc);
    else merge_kernel<8><<<grid, kThreads, 0, stream>>>(d, k0, kc);
    check(cudaGetLastError(), "launch of merge_kernel<" + std::to_string(kb) + "> (" +
                                  std::to_string(grid) + " blocks, " + std::to_string(T) +
                                  " tensors, " + std::to_string(N) + " sources)");
  }
}

}  // namespace lcsc
