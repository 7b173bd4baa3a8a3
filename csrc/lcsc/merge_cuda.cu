// CUDA merge: the same op as merge_cpu.cpp, enqueued on the caller's stream.
//
// A block handles one tile of 2048 elements of one tensor (256 threads x 8 elements); blocks
// stride over the tiles of all tensors. Each thread folds its 8 elements of every source into
// up to eight outputs' float32 accumulators held in registers, and writes each output once.
//
// In a full tile a thread's 8 elements are consecutive and arrive as 16-byte loads: one (two
// for float32) where the source is 16-byte aligned, and otherwise the aligned 16-byte chunks
// that hold them, one more than that, funnel-shifted into place. The tensors of a checkpoint
// file, views into one buffer, are mostly not 16-byte aligned. In the last, partial tile of a
// tensor the elements lie 256 apart, so that each warp's scalar loads cover consecutive
// addresses.
//
// A merge is bound by how many bytes are in flight: a thread loads a group of sources before
// it folds the first one in, and the kernel is instantiated per source dtype so that nothing
// between those loads depends on one of them. The per-element math is elementwise.h's, shared
// with the CPU path, and the sources are folded in in order 0..N-1, so the results agree
// bitwise.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
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
constexpr int32_t kMixed = -1;         // kernel instance for sources of several dtypes

struct DeviceTables {
  int64_t num_tensors, num_sources, total_tiles;
  const int64_t* numels;         // [T]
  const int64_t* first_tile;     // [T + 1]
  const uint8_t* srcs_aligned;   // [T]: every source of the tensor is 16-byte aligned
  void* const* outs;             // [K, T]
  const int32_t* out_dtypes;     // [T]
  const void* const* bases;      // [T]
  const int32_t* base_dtypes;    // [T]
  const void* const* srcs;       // [T, N]
  const int32_t* src_dtypes;     // [T, N]
  const float* coeffs;           // [passes, N, KB]: each pass's rows by source, zero-padded
};

// Where a thread's elements are and how a source's come in (see the top comment).
enum Layout {
  kStrided,  // a partial tile: elements 256 apart, each checked against numel
  kAligned,  // a full tile, consecutive elements, every source 16-byte aligned
  kShifted,  // a full tile, consecutive elements, sources at any element-aligned address
};

constexpr char kOp[] = "merge";

void check(cudaError_t err, const std::string& what) { cuda::check(err, kOp, what); }

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// This thread's element q (< 8) of the tile that starts at element tile0.
__device__ __forceinline__ int64_t element(int64_t tile0, bool consecutive, int q) {
  return consecutive ? tile0 + int64_t(threadIdx.x) * kElemsPerThread + q
                     : tile0 + int64_t(q) * kThreads + threadIdx.x;
}

template <int32_t D>
__device__ __forceinline__ float half_as_float(uint16_t h) {
  return D == kFloat16 ? half_to_float(h) : bf16_to_float(h);
}

// x[0..8) = the 16-bit values in words w[0..4) (little-endian: the low half first).
template <int32_t D>
__device__ __forceinline__ void unpack_halves(const uint32_t* w, float* x) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    x[2 * j] = half_as_float<D>(uint16_t(w[j] & 0xffffu));
    x[2 * j + 1] = half_as_float<D>(uint16_t(w[j] >> 16));
  }
}

// x[q] = this thread's element q of p (dtype known at run time) as float, 0 past numel. The
// base, and the sources of a kernel for mixed dtypes, come this way.
__device__ __forceinline__ void load8(const void* p, int64_t tile0, int64_t numel, int32_t dtype,
                                      Layout layout, float* x) {
  const int64_t e = element(tile0, layout != kStrided, 0);
  if (layout != kStrided && aligned16(p)) {
    if (dtype == kFloat32) {
      const float4* v = reinterpret_cast<const float4*>(static_cast<const float*>(p) + e);
      const float4 a = __ldg(v), b = __ldg(v + 1);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
      return;
    }
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + e));
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    if (dtype == kFloat16) unpack_halves<kFloat16>(w, x); else unpack_halves<kBFloat16>(w, x);
  } else if (layout != kStrided) {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) x[q] = load_as_float(p, e + q, dtype);
  } else {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) {
      const int64_t eq = element(tile0, false, q);
      x[q] = eq < numel ? load_as_float(p, eq, dtype) : 0.f;
    }
  }
}

// One source's bytes for this thread as loaded, before they become floats. kAligned and
// kShifted: the 16-byte chunks from the one that holds the thread's first element (W words;
// the last chunk is loaded only when the elements are not chunk-aligned). kStrided: the 8
// values, as float bits.
template <int32_t SD, Layout L>
struct Raw {
  static constexpr int W = L == kStrided ? 8 : (SD == kFloat32 ? 8 : 4) + (L == kShifted ? 4 : 0);
  uint32_t w[W];
  uint32_t shift;  // kShifted: the byte offset of the first element in the first chunk
};

template <int32_t SD, Layout L>
__device__ __forceinline__ void load_raw(const void* p, int64_t tile0, int64_t numel,
                                         Raw<SD, L>& r) {
  constexpr int64_t kBytes = SD == kFloat32 ? 4 : 2;
  if constexpr (L == kStrided) {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) {
      const int64_t eq = element(tile0, false, q);
      r.w[q] = eq < numel ? float_to_bits(load_as_float(p, eq, SD)) : 0u;
    }
  } else {
    const uintptr_t first = reinterpret_cast<uintptr_t>(p) + element(tile0, true, 0) * kBytes;
    r.shift = L == kShifted ? uint32_t(first & 15u) : 0u;
    const uint4* chunk = reinterpret_cast<const uint4*>(first - r.shift);
    constexpr int kChunks = Raw<SD, L>::W / 4;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      // The extra chunk of kShifted holds elements of this thread only when shift != 0; at
      // shift == 0 it may lie past the end of the tensor, so it is not read.
      const bool needed = L != kShifted || c + 1 < kChunks || r.shift != 0;
      const uint4 v = needed ? __ldg(chunk + c) : make_uint4(0u, 0u, 0u, 0u);
      r.w[4 * c] = v.x; r.w[4 * c + 1] = v.y; r.w[4 * c + 2] = v.z; r.w[4 * c + 3] = v.w;
    }
  }
}

// The words (Q, Q + 1, ...) of w shifted right by `bits` (< 32): out[j] = bytes of
// w[Q + j] .. w[Q + j + 1] starting `bits` into w[Q + j].
template <int Q, int M, int W>
__device__ __forceinline__ void take_words(const uint32_t (&w)[W], uint32_t bits, uint32_t* out) {
#pragma unroll
  for (int j = 0; j < M; ++j) out[j] = __funnelshift_r(w[Q + j], w[Q + j + 1], bits);
}

// x[0..8) = one source's 8 elements of this thread as float.
template <int32_t SD, Layout L>
__device__ __forceinline__ void unpack(const Raw<SD, L>& r, float* x) {
  if constexpr (L == kStrided) {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) x[q] = bits_to_float(r.w[q]);
    return;
  }
  constexpr int M = SD == kFloat32 ? 8 : 4;  // words of 8 elements
  uint32_t v[M];
  if constexpr (L == kAligned) {
#pragma unroll
    for (int j = 0; j < M; ++j) v[j] = r.w[j];
  } else {
    // The shift is the same for every thread (the tile and each thread's share of it are
    // multiples of 16 bytes), so this branch does not diverge.
    const uint32_t bits = (r.shift & 3u) * 8u;
    switch (r.shift >> 2) {
      case 0: take_words<0, M>(r.w, bits, v); break;
      case 1: take_words<1, M>(r.w, bits, v); break;
      case 2: take_words<2, M>(r.w, bits, v); break;
      default: take_words<3, M>(r.w, bits, v);
    }
  }
  if constexpr (SD == kFloat32) {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) x[q] = bits_to_float(v[q]);
  } else {
    unpack_halves<SD>(v, x);
  }
}

__device__ __forceinline__ const void* load_pointer(const void* const* table, int64_t i) {
  return reinterpret_cast<const void*>(
      __ldg(reinterpret_cast<const unsigned long long*>(table) + i));
}

// acc[k][q] = c_k * x[q] + acc[k][q] for the KB coefficients of one source.
template <int KB>
__device__ __forceinline__ void fold(const float* coeffs, const float* x,
                                     float (&acc)[KB][kElemsPerThread]) {
  float c[KB];
  if constexpr (KB % 4 == 0) {
#pragma unroll
    for (int j = 0; j < KB / 4; ++j) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(coeffs) + j);
      c[4 * j] = v.x; c[4 * j + 1] = v.y; c[4 * j + 2] = v.z; c[4 * j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < KB; ++k) c[k] = __ldg(coeffs + k);
  }
#pragma unroll
  for (int k = 0; k < KB; ++k)
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) acc[k][q] = accumulate(acc[k][q], c[k], x[q]);
}

// Sources per group: the raw words of a group take at most 32 registers per thread (16 where
// the accumulators of 8 outputs need the rest).
template <int32_t SD, int KB, Layout L>
constexpr int kGroup = std::max(1, (KB >= 8 ? 16 : 32) / Raw<SD, L>::W);

// acc += every source's elements of this thread, times its coefficients, in source order.
template <int32_t SD, int KB, Layout L>
__device__ __forceinline__ void sum_sources(const DeviceTables& d, int64_t t, int64_t tile0,
                                            int64_t numel, const float* coeffs,
                                            float (&acc)[KB][kElemsPerThread]) {
  const int64_t N = d.num_sources;
  const void* const* srcs = d.srcs + t * N;
  int64_t i = 0;
  if constexpr (SD != kMixed) {
    constexpr int G = kGroup<SD, KB, L>;
    for (; i + G <= N; i += G) {
      Raw<SD, L> r[G];
#pragma unroll
      for (int u = 0; u < G; ++u) load_raw<SD, L>(load_pointer(srcs, i + u), tile0, numel, r[u]);
#pragma unroll
      for (int u = 0; u < G; ++u) {
        float x[kElemsPerThread];
        unpack<SD, L>(r[u], x);
        fold<KB>(coeffs + (i + u) * KB, x, acc);
      }
    }
    for (; i < N; ++i) {
      Raw<SD, L> r;
      load_raw<SD, L>(load_pointer(srcs, i), tile0, numel, r);
      float x[kElemsPerThread];
      unpack<SD, L>(r, x);
      fold<KB>(coeffs + i * KB, x, acc);
    }
  } else {
    const int32_t* dtypes = d.src_dtypes + t * N;
#pragma unroll 4
    for (; i < N; ++i) {
      float x[kElemsPerThread];
      load8(load_pointer(srcs, i), tile0, numel, __ldg(dtypes + i), L, x);
      fold<KB>(coeffs + i * KB, x, acc);
    }
  }
}

__device__ __forceinline__ uint32_t pack_halves(float a, float b, int32_t dtype) {
  const uint16_t lo = dtype == kFloat16 ? float_to_half(a) : float_to_bf16(a);
  const uint16_t hi = dtype == kFloat16 ? float_to_half(b) : float_to_bf16(b);
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

__device__ __forceinline__ void store8(void* p, int64_t tile0, int64_t numel, int32_t dtype,
                                       Layout layout, const float* x) {
  const int64_t e = element(tile0, layout != kStrided, 0);
  if (layout != kStrided && aligned16(p)) {
    if (dtype == kFloat32) {
      float4* v = reinterpret_cast<float4*>(static_cast<float*>(p) + e);
      v[0] = make_float4(x[0], x[1], x[2], x[3]);
      v[1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + e) =
          make_uint4(pack_halves(x[0], x[1], dtype), pack_halves(x[2], x[3], dtype),
                     pack_halves(x[4], x[5], dtype), pack_halves(x[6], x[7], dtype));
    }
  } else if (layout != kStrided) {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) store_from_float(p, e + q, dtype, x[q]);
  } else {
#pragma unroll
    for (int q = 0; q < kElemsPerThread; ++q) {
      const int64_t eq = element(tile0, false, q);
      if (eq < numel) store_from_float(p, eq, dtype, x[q]);
    }
  }
}

// Blocks per multiprocessor that the register budget must allow: 3 (at most 80 registers per
// thread) for one or two outputs, 2 (128) for the accumulators of four or eight. On an H100,
// 3 rather than 2 took a 304-tensor bf16 merge from 1547 to 1685 GB/s (4 blocks: 1679).
template <int KB>
constexpr int kMinBlocks = KB <= 2 ? 3 : 2;

// Outputs k0 .. k0 + kc - 1 (kc <= KB) of every tensor, with their coefficients at coeffs
// ([N, KB]); sources of dtype SD, or of any dtypes with SD = kMixed.
template <int32_t SD, int KB>
__global__ void __launch_bounds__(kThreads, kMinBlocks<KB>) merge_kernel(DeviceTables d,
                                                                     const float* coeffs,
                                                                     int64_t k0, int kc) {
  const int64_t T = d.num_tensors;
  // Each block takes a run of consecutive tiles: the tensor is looked up once and then
  // followed, and the block's next tile lies in the pages of its last one (on an H100 a
  // 304-tensor bf16 MergePlan call ran at 1547 GB/s so, 1093 with blocks striding over tiles).
  const int64_t per_block = (d.total_tiles + gridDim.x - 1) / gridDim.x;
  const int64_t g_begin = int64_t(blockIdx.x) * per_block;
  const int64_t g_end = min(d.total_tiles, g_begin + per_block);
  int64_t t = 0;
  {
    int64_t lo = 0, hi = T;  // the tensor t with first_tile[t] <= g_begin < first_tile[t + 1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (__ldg(d.first_tile + mid) <= g_begin) lo = mid; else hi = mid;
    }
    t = lo;
  }
  for (int64_t g = g_begin; g < g_end; ++g) {
    while (g >= __ldg(d.first_tile + t + 1)) ++t;
    const int64_t tile0 = (g - d.first_tile[t]) * kTileElems;
    const int64_t numel = d.numels[t];
    const Layout layout = tile0 + kTileElems > numel ? kStrided
                          : d.srcs_aligned[t]         ? kAligned
                                                      : kShifted;
    if (element(tile0, layout != kStrided, 0) >= numel) continue;  // past the end of a tile

    float acc[KB][kElemsPerThread];
#pragma unroll
    for (int k = 0; k < KB; ++k)
#pragma unroll
      for (int q = 0; q < kElemsPerThread; ++q) acc[k][q] = 0.f;
    switch (layout) {
      case kAligned: sum_sources<SD, KB, kAligned>(d, t, tile0, numel, coeffs, acc); break;
      case kShifted: sum_sources<SD, KB, kShifted>(d, t, tile0, numel, coeffs, acc); break;
      default: sum_sources<SD, KB, kStrided>(d, t, tile0, numel, coeffs, acc);
    }

    const void* base = d.bases[t];
    float b[kElemsPerThread];
    if (base != nullptr) load8(base, tile0, numel, d.base_dtypes[t], layout, b);
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k >= kc) break;
      if (base != nullptr) {
#pragma unroll
        for (int q = 0; q < kElemsPerThread; ++q) acc[k][q] = acc[k][q] + b[q];
      }
      store8(d.outs[(k0 + k) * T + t], tile0, numel, d.out_dtypes[t], layout, acc[k]);
    }
  }
}

// Launches merge_kernel<SD, KB> with as many blocks as fit on the device at once (at most one
// per tile), and returns that grid size for error messages.
template <int32_t SD, int KB>
unsigned launch_kernel(int sm_count, cudaStream_t stream, const DeviceTables& d,
                       const float* coeffs, int64_t k0, int kc) {
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, merge_kernel<SD, KB>, kThreads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const unsigned grid =
      unsigned(std::min<int64_t>(d.total_tiles, int64_t(sm_count) * std::max(per_sm, 1)));
  merge_kernel<SD, KB><<<grid, kThreads, 0, stream>>>(d, coeffs, k0, kc);
  return grid;
}

template <int32_t SD>
unsigned launch_typed(int kb, int sm_count, cudaStream_t stream, const DeviceTables& d,
                      const float* coeffs, int64_t k0, int kc) {
  switch (kb) {
    case 1: return launch_kernel<SD, 1>(sm_count, stream, d, coeffs, k0, kc);
    case 2: return launch_kernel<SD, 2>(sm_count, stream, d, coeffs, k0, kc);
    case 4: return launch_kernel<SD, 4>(sm_count, stream, d, coeffs, k0, kc);
    default: return launch_kernel<SD, 8>(sm_count, stream, d, coeffs, k0, kc);
  }
}

unsigned launch(int32_t sd, int kb, int sm_count, cudaStream_t stream, const DeviceTables& d,
                const float* coeffs, int64_t k0, int kc) {
  switch (sd) {
    case kFloat32: return launch_typed<kFloat32>(kb, sm_count, stream, d, coeffs, k0, kc);
    case kFloat16: return launch_typed<kFloat16>(kb, sm_count, stream, d, coeffs, k0, kc);
    case kBFloat16: return launch_typed<kBFloat16>(kb, sm_count, stream, d, coeffs, k0, kc);
    default: return launch_typed<kMixed>(kb, sm_count, stream, d, coeffs, k0, kc);
  }
}

// Appends arrays to a byte buffer, each at a 16-byte boundary.
template <class T>
size_t append(std::vector<char>& bytes, const T* data, size_t count) {
  const size_t offset = (bytes.size() + 15) / 16 * 16;
  bytes.resize(offset + count * sizeof(T));
  if (count) std::memcpy(bytes.data() + offset, data, count * sizeof(T));
  return offset;
}

bool host_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The width of the register block for a pass of kc outputs.
int block_width(int64_t kc) { return kc == 1 ? 1 : kc == 2 ? 2 : kc <= 4 ? 4 : 8; }

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

CudaMergeTables::CudaMergeTables(const MergeArgs& a) {
  validate(a);
  T_ = a.num_tensors, N_ = a.num_sources, K_ = a.num_outputs;
  std::vector<int64_t> first_tile(T_ + 1, 0);
  for (int64_t t = 0; t < T_; ++t) {
    first_tile[t + 1] = first_tile[t] + (a.numels[t] + kTileElems - 1) / kTileElems;
  }
  total_tiles_ = first_tile[T_];

  // With more than 8 outputs, the passes after the first read the inputs again, so an output
  // that is also one of its tensor's inputs cannot be written in place (see merge_cuda).
  for (int64_t t = 0; K_ > kMaxOutputsPerPass && t < T_ && !aliased_; ++t) {
    for (int64_t k = 0; k < K_ && a.numels[t] > 0; ++k) {
      const void* out = a.outs[k * T_ + t];
      aliased_ = aliased_ || out == a.bases[t];
      for (int64_t i = 0; i < N_; ++i) aliased_ = aliased_ || out == a.srcs[t * N_ + i];
    }
  }

  // One kernel instance per source dtype when every source has the same one.
  source_dtype_ = N_ * T_ > 0 ? a.src_dtypes[0] : kFloat32;
  for (int64_t j = 0; j < N_ * T_; ++j) {
    if (a.src_dtypes[j] != source_dtype_) source_dtype_ = kMixed;
  }
  std::vector<uint8_t> srcs_aligned(T_, 1);
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t i = 0; i < N_; ++i) {
      srcs_aligned[t] &= uint8_t(host_aligned16(a.srcs[t * N_ + i]));
    }
  }
  offsets_[0] = append(bytes_, a.numels, T_);
  offsets_[1] = append(bytes_, first_tile.data(), T_ + 1);
  offsets_[2] = append(bytes_, srcs_aligned.data(), T_);
  offsets_[3] = append(bytes_, a.outs, K_ * T_);
  offsets_[4] = append(bytes_, a.out_dtypes, T_);
  offsets_[5] = append(bytes_, a.bases, T_);
  offsets_[6] = append(bytes_, a.base_dtypes, T_);
  offsets_[7] = append(bytes_, a.srcs, T_ * N_);
  offsets_[8] = append(bytes_, a.src_dtypes, T_ * N_);
}

std::vector<float> CudaMergeTables::pass_coeffs(const float* coeffs,
                                                std::vector<size_t>* pass_offset) const {
  // Each pass's coefficients by source, [N, KB], zero-padded to the register block's width.
  std::vector<float> table;
  for (int64_t k0 = 0; k0 < K_; k0 += kMaxOutputsPerPass) {
    const int64_t kc = std::min<int64_t>(kMaxOutputsPerPass, K_ - k0), kb = block_width(kc);
    pass_offset->push_back(table.size());
    table.resize(table.size() + N_ * kb, 0.f);
    float* rows = table.data() + pass_offset->back();
    for (int64_t i = 0; i < N_; ++i) {
      for (int64_t k = 0; k < kc; ++k) rows[i * kb + k] = coeffs[(k0 + k) * N_ + i];
    }
  }
  return table;
}

void CudaMergeTables::launch(const char* tables, const float* coeffs,
                             const std::vector<size_t>& pass_offset, int device,
                             void* stream_ptr) const {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (total_tiles_ == 0) return;
  int sm_count = 0;
  check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  DeviceTables d{T_, N_, total_tiles_,
                 reinterpret_cast<const int64_t*>(tables + offsets_[0]),
                 reinterpret_cast<const int64_t*>(tables + offsets_[1]),
                 reinterpret_cast<const uint8_t*>(tables + offsets_[2]),
                 reinterpret_cast<void* const*>(tables + offsets_[3]),
                 reinterpret_cast<const int32_t*>(tables + offsets_[4]),
                 reinterpret_cast<const void* const*>(tables + offsets_[5]),
                 reinterpret_cast<const int32_t*>(tables + offsets_[6]),
                 reinterpret_cast<const void* const*>(tables + offsets_[7]),
                 reinterpret_cast<const int32_t*>(tables + offsets_[8]),
                 coeffs};
  for (int64_t k0 = 0, pass = 0; k0 < K_; k0 += kMaxOutputsPerPass, ++pass) {
    const int kc = int(std::min<int64_t>(kMaxOutputsPerPass, K_ - k0));
    const int kb = block_width(kc);
    const unsigned grid =
        ::lcsc::launch(source_dtype_, kb, sm_count, stream, d, coeffs + pass_offset[pass], k0, kc);
    check(cudaGetLastError(), "launch of merge_kernel<" + std::to_string(source_dtype_) + ", " +
                                  std::to_string(kb) + "> (" + std::to_string(grid) +
                                  " blocks, " + std::to_string(T_) + " tensors, " +
                                  std::to_string(N_) + " sources)");
  }
}

void CudaMergeTables::run(const void* device_tables, const float* coeffs, int device,
                          uintptr_t stream_handle) const {
  if (aliased_) {
    throw std::invalid_argument(
        "these CUDA merge tables cannot be reused: with more than 8 outputs, one that is also "
        "an input needs merge_cuda");
  }
  if (!host_aligned16(device_tables)) {
    throw std::invalid_argument("the CUDA merge tables must be at a 16-byte aligned address");
  }
  if (total_tiles_ == 0) return;
  std::vector<size_t> pass_offset;
  const std::vector<float> table = pass_coeffs(coeffs, &pass_offset);
  const cuda::DeviceGuard guard(device, kOp);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const cuda::StreamScratch scratch(table.size() * sizeof(float), stream, kOp);
  // From pageable memory: returns once the bytes are staged, so the table may go out of scope.
  check(cudaMemcpyAsync(scratch.get(), table.data(), table.size() * sizeof(float),
                        cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
  launch(static_cast<const char*>(device_tables), reinterpret_cast<const float*>(scratch.get()),
         pass_offset, device, stream);
}

void merge_cuda(const MergeArgs& a, int device, uintptr_t stream_handle) {
  validate(a);
  const int64_t T = a.num_tensors, N = a.num_sources, K = a.num_outputs;
  int64_t total_tiles = 0;
  for (int64_t t = 0; t < T; ++t) total_tiles += (a.numels[t] + kTileElems - 1) / kTileElems;
  if (total_tiles == 0) return;

  // With more than 8 outputs, the passes after the first read the inputs again, so an output
  // that is also one of its tensor's inputs is written to scratch and copied into place once
  // every pass has run.
  std::vector<void*> outs(a.outs, a.outs + K * T);
  struct Deferred {
    void* dst;
    size_t offset, nbytes;
  };
  std::vector<Deferred> deferred;
  size_t deferred_nbytes = 0;
  for (int64_t t = 0; K > kMaxOutputsPerPass && t < T; ++t) {
    for (int64_t k = 0; k < K && a.numels[t] > 0; ++k) {
      void* out = outs[k * T + t];
      bool aliased = out == a.bases[t];
      for (int64_t i = 0; i < N; ++i) aliased = aliased || out == a.srcs[t * N + i];
      if (!aliased) continue;
      const size_t offset = (deferred_nbytes + 255) / 256 * 256;
      deferred.push_back({out, offset, size_t(a.numels[t]) * dtype_nbytes(a.out_dtypes[t])});
      deferred_nbytes = offset + deferred.back().nbytes;
    }
  }

  const cuda::DeviceGuard guard(device, kOp);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  std::unique_ptr<cuda::StreamScratch> staging;
  if (!deferred.empty()) {
    staging = std::make_unique<cuda::StreamScratch>(deferred_nbytes, stream, kOp);
    for (const Deferred& r : deferred) {
      for (void*& out : outs) {
        if (out == r.dst) out = staging->get() + r.offset;
      }
    }
  }
  MergeArgs redirected = a;
  redirected.outs = outs.data();
  const CudaMergeTables tables(redirected);

  // The tables and the coefficients in one buffer, so that one copy moves them.
  std::vector<size_t> pass_offset;
  const std::vector<float> coeffs = tables.pass_coeffs(a.coeffs, &pass_offset);
  std::vector<char> bytes = tables.bytes();
  const size_t o_coeffs = append(bytes, coeffs.data(), coeffs.size());
  const cuda::StreamScratch scratch(bytes.size(), stream, kOp);
  // From pageable memory: returns once the bytes are staged, so they may go out of scope.
  check(cudaMemcpyAsync(scratch.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice,
                        stream), "cudaMemcpyAsync");
  tables.launch(scratch.get(), reinterpret_cast<const float*>(scratch.get() + o_coeffs),
                pass_offset, device, stream);
  for (const Deferred& r : deferred) {
    check(cudaMemcpyAsync(r.dst, staging->get() + r.offset, r.nbytes, cudaMemcpyDeviceToDevice,
                          stream), "cudaMemcpyAsync of an output that is also an input");
  }
}

}  // namespace lcsc
