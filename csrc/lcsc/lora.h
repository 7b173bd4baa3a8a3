// The fused low-rank merge, shared by the CPU and CUDA entry points.
//
// One layer, N checkpoints with LoRA factors B_i [m, r] and A_i [r, n] (row-major):
//   out[j][c] = round_to_out_dtype(sum_{i<N} sum_{p<r} (w_i * B_i[j][p]) * A_i[p][c] + base[j][c])
// which is one GEMM over the concatenated rank R = N * r, with the per-checkpoint weights w_i
// (the caller folds in the LoRA scale) applied on the fly as the B factors are read.
//
// CPU: each output element's float32 sum is formed panel by panel: for every kLoraPanelRanks
// consecutive ranks k = i * r + p (from k = 0), a partial starts at zero and takes one fused
// multiply-add per rank in increasing k, with the multiplier fl32(w_i * B_i[j][p]); the
// partials are added in panel order; the base (when non-null) is added last. That order does
// not depend on tiling, threads or the SIMD level, so CPU results are bitwise reproducible
// (tests/test_numerics.py carries this sequence out exactly).
// CUDA with float32 factors follows the same sequence; with 16-bit factors it keeps float32
// accumulation and checkpoint order but not this exact rounding sequence (see lora_cuda.cu).
//
// out may be the same buffer as base (same start and dtype); it must not overlap base
// otherwise, nor any factor.
#pragma once

#include <cstdint>

namespace lcsc {

// Ranks per partial sum (see above): part of the op's numerics, shared by every code path.
// 32 keeps float32 factors about as accurate as plain torch and cuBLAS: at 96 x 96, N = 20,
// r = 16 the max error against float64 was 1.95e-7 with 256-rank panels, 6.1e-8 with 64 and
// 5.8e-8 with 32 (plain torch on an H100: 7.6e-8); against torch's per-checkpoint addmm loop
// on the CPU (4 seeds, 3 shapes, R = 320-1600) 256 reached 3.3x its error, 64 2.0x, 32 1.1x.
// It is also the CPU kernel's cache block (KC), where 32 took 1.01-1.08x the time of 256.
constexpr int64_t kLoraPanelRanks = 32;

struct LoraArgs {
  int64_t m = 0;                // rows of out and of every B_i
  int64_t n = 0;                // columns of out and of every A_i
  int64_t rank = 0;             // r, >= 1
  int64_t num_checkpoints = 0;  // N, >= 1
  void* out = nullptr;          // [m, n]
  int32_t out_dtype = 0;
  const void* base = nullptr;   // [m, n], null = no base
  int32_t base_dtype = 0;
  const void* const* as = nullptr;  // [N] pointers to A_i [r, n]
  const void* const* bs = nullptr;  // [N] pointers to B_i [m, r]
  int32_t factor_dtype = 0;         // one dtype for every factor
  const float* weights = nullptr;   // [N], w_i = fl32(scale * c_i)
};

// Throws std::invalid_argument on malformed args: sizes, dtype codes, null pointers, or an
// out that overlaps a factor or partly overlaps the base.
void validate(const LoraArgs& args);

// CPU: cache-blocked GEMM over output tiles, OpenMP over tiles with num_threads threads, with
// the micro-kernel of the SIMD level in use (set_simd_level in merge.h forces one).
// guard_faults: the factors may live in memory-mapped files that can shrink under us. A SIGBUS
// while reading them then throws std::runtime_error (out partly written) instead of killing
// the process.
void lora_cpu(const LoraArgs& args, int num_threads, bool guard_faults = false);

// The scratch lora_cpu allocates for a layer (all threads together): packed panels and, when
// the rank spans several panels, one float32 output tile per thread. For benchmarks' reports.
int64_t lora_cpu_scratch_nbytes(int64_t m, int64_t n, int64_t total_rank, int num_threads);

// CUDA: enqueued on `stream` (a cudaStream_t) of `device`; returns without synchronising.
// Throws std::runtime_error when CUDA is not compiled in or a CUDA call fails.
void lora_cuda(const LoraArgs& args, int device, uintptr_t stream);

}  // namespace lcsc
