// CUDA low-rank merge: the op of lora_cpu.cpp, enqueued on the caller's stream.
//
// One thread block per output tile; the float32 accumulators stay in registers for the whole
// concatenated rank R = N * r, and the tile is written once.
//
// 16-bit factors: tensor cores (WMMA 16x16x16, bf16/fp16 in, float32 accumulate). For each
// checkpoint i the block computes that checkpoint's rank-r product tile B_i A_i into a float32
// fragment (r padded to a multiple of 16 with zeros), then adds w_i times it to the accumulator
// fragment, so w_i is applied in float32 and never rounded into a 16-bit factor. The order of
// the products inside one MMA is the hardware's, so results agree with the CPU path to within
// float32 rounding, not bitwise.
//
// float32 factors: plain FFMA tiles, no TF32, with the CPU path's exact sequence (lora.h):
// per panel of kLoraPanelRanks ranks a partial of one fma per rank in increasing k, with the
// multiplier fl32(w_i * B_i[j][p]), partials summed in panel order, then the base.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_host.h"
#include "elementwise.h"
#include "lora.h"

namespace lcsc {
namespace {

struct DeviceArgs {
  int64_t m, n, rank, num_checkpoints;
  void* out;
  int32_t out_dtype;
  const void* base;  // null = none
  int32_t base_dtype;
  const void* const* as;  // [N], device memory
  const void* const* bs;  // [N], device memory
  const float* weights;   // [N], device memory
};

constexpr char kOp[] = "LoRA merge";

void check(cudaError_t err, const std::string& what) { cuda::check(err, kOp, what); }

// out[j][c] = round(v + base[j][c]) when (j, c) is inside out.
__device__ __forceinline__ void finish_element(const DeviceArgs& d, int64_t j, int64_t c,
                                               float v) {
  if (j >= d.m || c >= d.n) return;
  const int64_t at = j * d.n + c;
  if (d.base != nullptr) v = v + load_as_float(d.base, at, d.base_dtype);
  store_from_float(d.out, at, d.out_dtype, v);
}

// ---------------------------------------------------------------- float32 factors: FFMA

constexpr int kFfmaBM = 64, kFfmaBN = 64, kFfmaBK = 16, kFfmaThreads = 256;

// 256 threads as 16 x 16, each owning a 4 x 4 block of the 64 x 64 tile.
__global__ void __launch_bounds__(kFfmaThreads) lora_ffma_kernel(DeviceArgs d) {
  __shared__ __align__(16) float bw_s[kFfmaBK][kFfmaBM + 4];  // weighted B, rank-major
  __shared__ __align__(16) float a_s[kFfmaBK][kFfmaBN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = int64_t(blockIdx.y) * kFfmaBM, col0 = int64_t(blockIdx.x) * kFfmaBN;
  const int64_t r = d.rank, R = d.rank * d.num_checkpoints;
  const auto* as = reinterpret_cast<const float* const*>(d.as);
  const auto* bs = reinterpret_cast<const float* const*>(d.bs);

  float acc[4][4], part[4][4];  // the sum of finished panels, and this panel's partial
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[q][e] = part[q][e] = 0.f;

  static_assert(kLoraPanelRanks % kFfmaBK == 0, "a chunk never straddles two panels");
  for (int64_t k0 = 0; k0 < R; k0 += kFfmaBK) {
    // Ranks fastest: a run of one row of B_i is contiguous in memory.
    for (int e = tid; e < kFfmaBM * kFfmaBK; e += kFfmaThreads) {
      const int kk = e % kFfmaBK, row = e / kFfmaBK;
      const int64_t k = k0 + kk, j = row0 + row;
      float v = 0.f;
      if (k < R && j < d.m) {
        const int64_t i = k / r;
        v = __fmul_rn(__ldg(d.weights + i), __ldg(bs[i] + j * r + (k - i * r)));
      }
      bw_s[kk][row] = v;
    }
    for (int e = tid; e < kFfmaBK * kFfmaBN; e += kFfmaThreads) {
      const int col = e % kFfmaBN, kk = e / kFfmaBN;
      const int64_t k = k0 + kk, c = col0 + col;
      float v = 0.f;
      if (k < R && c < d.n) {
        const int64_t i = k / r;
        v = __ldg(as[i] + (k - i * r) * d.n + c);
      }
      a_s[kk][col] = v;
    }
    __syncthreads();
    // Only the ranks that exist: an fma with the zero padding could turn an underflowed -0
    // into +0, and each output must take exactly the CPU path's fma sequence.
    const int kmax = int(min(int64_t(kFfmaBK), R - k0));
#pragma unroll
    for (int kk = 0; kk < kFfmaBK; ++kk) {
      if (kk >= kmax) break;
      const float4 b = *reinterpret_cast<const float4*>(&bw_s[kk][ty * 4]);
      const float4 x = *reinterpret_cast<const float4*>(&a_s[kk][tx * 4]);
      const float bv[4] = {b.x, b.y, b.z, b.w}, xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[q][e] = accumulate(part[q][e], bv[q], xv[e]);
    }
    __syncthreads();
    const int64_t next = k0 + kFfmaBK;
    if (next % kLoraPanelRanks == 0 || next >= R) {  // a panel ends: fold its partial in
      const bool first = k0 < kLoraPanelRanks;
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[q][e] = first ? part[q][e] : acc[q][e] + part[q][e];
          part[q][e] = 0.f;
        }
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) finish_element(d, row0 + ty * 4 + q, col0 + tx * 4 + e, acc[q][e]);
}

// ---------------------------------------------------------------- 16-bit factors: WMMA

constexpr int kMmaBM = 64, kMmaBN = 128, kMmaBK = 16, kMmaThreads = 256;
constexpr int kBPitch = kMmaBK + 8;  // halves; rows 48 bytes apart, 32-byte aligned every 16
constexpr int kAPitch = kMmaBN + 8;
constexpr int kCPitch = kMmaBN + 4;  // floats

template <int32_t D>
struct MmaType;
template <>
struct MmaType<kFloat16> {
  using T = __half;
};
template <>
struct MmaType<kBFloat16> {
  using T = __nv_bfloat16;
};

// 8 warps as 2 (rows) x 4 (columns), each owning 32 x 32 of the 64 x 128 tile: 2 x 2 fragments.
template <int32_t D>
__global__ void __launch_bounds__(kMmaThreads) lora_mma_kernel(DeviceArgs d) {
  using namespace nvcuda;
  using T = typename MmaType<D>::T;
  __shared__ __align__(128) uint16_t b_s[kMmaBM * kBPitch];  // B_i rows x 16 ranks
  __shared__ __align__(128) uint16_t a_s[kMmaBK * kAPitch];  // 16 ranks x A_i columns
  __shared__ __align__(128) float c_s[kMmaBM * kCPitch];     // the tile, for the epilogue
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;
  const int64_t row0 = int64_t(blockIdx.y) * kMmaBM, col0 = int64_t(blockIdx.x) * kMmaBN;
  const int64_t r = d.rank;
  const T* b_tile = reinterpret_cast<const T*>(b_s);
  const T* a_tile = reinterpret_cast<const T*>(a_s);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2], part[2][2];
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int v = 0; v < 2; ++v) wmma::fill_fragment(acc[u][v], 0.f);

  for (int64_t i = 0; i < d.num_checkpoints; ++i) {
    const auto* b = static_cast<const uint16_t*>(d.bs[i]);
    const auto* a = static_cast<const uint16_t*>(d.as[i]);
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int v = 0; v < 2; ++v) wmma::fill_fragment(part[u][v], 0.f);
    for (int64_t p0 = 0; p0 < r; p0 += kMmaBK) {
      for (int e = tid; e < kMmaBM * kMmaBK; e += kMmaThreads) {
        const int kk = e % kMmaBK, row = e / kMmaBK;
        const int64_t j = row0 + row, p = p0 + kk;
        b_s[row * kBPitch + kk] = (j < d.m && p < r) ? __ldg(b + j * r + p) : uint16_t(0);
      }
      for (int e = tid; e < kMmaBK * kMmaBN; e += kMmaThreads) {
        const int col = e % kMmaBN, kk = e / kMmaBN;
        const int64_t c = col0 + col, p = p0 + kk;
        a_s[kk * kAPitch + col] = (c < d.n && p < r) ? __ldg(a + p * d.n + c) : uint16_t(0);
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        wmma::load_matrix_sync(fa[u], b_tile + (wm * 32 + u * 16) * kBPitch, kBPitch);
        wmma::load_matrix_sync(fb[u], a_tile + wn * 32 + u * 16, kAPitch);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int v = 0; v < 2; ++v) wmma::mma_sync(part[u][v], fa[u], fb[v], part[u][v]);
      __syncthreads();
    }
    // Fragments of one shape share their element layout, so this is elementwise acc += w * P.
    const float w = __ldg(d.weights + i);
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int v = 0; v < 2; ++v)
#pragma unroll
        for (int e = 0; e < acc[u][v].num_elements; ++e) {
          acc[u][v].x[e] = accumulate(acc[u][v].x[e], w, part[u][v].x[e]);
        }
  }
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      wmma::store_matrix_sync(c_s + (wm * 32 + u * 16) * kCPitch + wn * 32 + v * 16, acc[u][v],
                              kCPitch, wmma::mem_row_major);
    }
  __syncthreads();
  for (int e = tid; e < kMmaBM * kMmaBN; e += kMmaThreads) {
    const int row = e / kMmaBN, col = e % kMmaBN;
    finish_element(d, row0 + row, col0 + col, c_s[row * kCPitch + col]);
  }
}

}  // namespace

void lora_cuda(const LoraArgs& a, int device, uintptr_t stream_handle) {
  validate(a);
  if (a.m == 0 || a.n == 0) return;
  const int64_t N = a.num_checkpoints;
  const bool mma = a.factor_dtype != kFloat32;
  const int64_t bm = mma ? kMmaBM : kFfmaBM, bn = mma ? kMmaBN : kFfmaBN;
  const int64_t grid_y = (a.m + bm - 1) / bm, grid_x = (a.n + bn - 1) / bn;
  if (grid_y > 65535 || grid_x > 0x7fffffff) {
    throw std::invalid_argument("lora on CUDA: out has too many rows (" + std::to_string(a.m) +
                                ") for one launch");
  }

  // The factor pointer tables and weights, in one device buffer.
  std::vector<char> host(N * (2 * sizeof(void*) + sizeof(float)));
  std::memcpy(host.data(), a.as, N * sizeof(void*));
  std::memcpy(host.data() + N * sizeof(void*), a.bs, N * sizeof(void*));
  std::memcpy(host.data() + 2 * N * sizeof(void*), a.weights, N * sizeof(float));

  const cuda::DeviceGuard guard(device, kOp);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const cuda::StreamScratch scratch(host.size(), stream, kOp);
  char* dev = scratch.get();
  // From pageable memory: returns once the bytes are staged, so `host` may go out of scope.
  check(cudaMemcpyAsync(dev, host.data(), host.size(), cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync");
  DeviceArgs d{a.m, a.n, a.rank, N, a.out, a.out_dtype, a.base, a.base_dtype,
               reinterpret_cast<const void* const*>(dev),
               reinterpret_cast<const void* const*>(dev + N * sizeof(void*)),
               reinterpret_cast<const float*>(dev + 2 * N * sizeof(void*))};
  const dim3 grid{unsigned(grid_x), unsigned(grid_y)};
  if (!mma) {
    lora_ffma_kernel<<<grid, kFfmaThreads, 0, stream>>>(d);
  } else if (a.factor_dtype == kFloat16) {
    lora_mma_kernel<kFloat16><<<grid, kMmaThreads, 0, stream>>>(d);
  } else {
    lora_mma_kernel<kBFloat16><<<grid, kMmaThreads, 0, stream>>>(d);
  }
  check(cudaGetLastError(), std::string("launch of ") +
                                (!mma ? "lora_ffma_kernel" : "lora_mma_kernel") + " (" +
                                std::to_string(grid_x) + " x " + std::to_string(grid_y) +
                                " blocks, " + std::to_string(N) + " checkpoints of rank " +
                                std::to_string(a.rank) + ")");
}

}  // namespace lcsc
