// The portable vector ops: one float at a time, and the merge tile and low-rank kernel built on
// them. The reference the SIMD levels must match to the bit, the path on CPUs without AVX2,
// and (auto-vectorised) the path on non-x86 machines.
#include "lora_cpu_kernel.h"
#include "merge_cpu_kernel.h"

namespace {

struct Scalar {
  using Reg = float;
  static constexpr int64_t kWidth = 1;
  static constexpr int kAccRegs = 8;  // a batch's accumulators: 8 of the 16 SSE registers
  static constexpr bool kPairs = false;
  static constexpr bool kBf16EvenOdd = false;
  template <int32_t D>
  static float load(const void* p, int64_t i) { return lcsc::load_as_float(p, i, D); }
  template <int32_t D, bool kStream = false>
  static void store(void* p, int64_t i, float v) { lcsc::store_from_float(p, i, D, v); }
  static float load_acc(const float* p) { return *p; }
  static void store_acc(float* p, float v) { *p = v; }
  static float zero() { return 0.f; }
  static float broadcast(float c) { return c; }
  static float fma(float c, float x, float acc) { return lcsc::accumulate(acc, c, x); }
  static float add(float a, float b) { return a + b; }
  static float mul(float a, float b) { return a * b; }
};

}  // namespace

lcsc::cpu::TileFn lcsc::cpu::scalar_tile() { return &lcsc_cpu_tile::Tile<Scalar>::run; }
lcsc::cpu::FmaProbeFn lcsc::cpu::scalar_fma_probe() {
  return &lcsc_cpu_tile::Tile<Scalar>::fma_probe;
}
lcsc::cpu::TrafficFn lcsc::cpu::scalar_traffic() {
  return &lcsc_cpu_tile::Tile<Scalar>::traffic;
}

// 4 x 4 floats: sixteen accumulators fit the sixteen SSE registers of x86-64's baseline.
lcsc::cpu::LoraKernel lcsc::cpu::scalar_lora() {
  return lcsc_cpu_lora::LoraTile<Scalar, 4, 4>::kernel();
}
