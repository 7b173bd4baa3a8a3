// AVX2 + FMA + F16C vector ops, 8 floats a vector, and the merge tile and low-rank kernel
// built on them. Compiled with -mavx2 -mfma -mf16c; called only after the CPU has been checked
// for all three.
#include <immintrin.h>

#include "lora_cpu_kernel.h"
#include "merge_cpu_kernel.h"

namespace {

using lcsc::kBFloat16;
using lcsc::kFloat16;
using lcsc::kFloat32;

struct Avx2 {
  using Reg = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr int kAccRegs = 12;  // a batch's accumulators: 12 of the 16 registers
  static constexpr bool kPairs = false;
  static constexpr bool kBf16EvenOdd = false;

  template <int32_t D>
  static __m256 load(const void* p, int64_t i) {
    if constexpr (D == kFloat32) {
      return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    } else {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      if constexpr (D == kFloat16) return _mm256_cvtph_ps(h);
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }

  // kStream: a non-temporal store; the caller guarantees the vector-size alignment it needs.
  template <int32_t D, bool kStream = false>
  static void store(void* p, int64_t i, __m256 v) {
    if constexpr (D == kFloat32) {
      if constexpr (kStream) {
        _mm256_stream_ps(static_cast<float*>(p) + i, v);
      } else {
        _mm256_storeu_ps(static_cast<float*>(p) + i, v);
      }
      return;
    }
    __m128i h;
    if constexpr (D == kFloat16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // bf16: lcsc::float_to_bf16, eight lanes at a time
      const __m256i u = _mm256_castps_si256(v);
      const __m256i upper = _mm256_srli_epi32(u, 16);
      const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                            _mm256_and_si256(upper, _mm256_set1_epi32(1)));
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      const __m256i quiet_nan = _mm256_or_si256(upper, _mm256_set1_epi32(0x40));
      const __m256i is_nan = _mm256_cmpgt_epi32(
          _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
      const __m256i r = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    auto* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i);
    if constexpr (kStream) {
      _mm_stream_si128(dst, h);
    } else {
      _mm_storeu_si128(dst, h);
    }
  }

  static __m256 load_acc(const float* p) { return _mm256_loadu_ps(p); }
  static void store_acc(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 broadcast(float c) { return _mm256_set1_ps(c); }
  static __m256 fma(__m256 c, __m256 x, __m256 acc) { return _mm256_fmadd_ps(c, x, acc); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
};

}  // namespace

lcsc::cpu::TileFn lcsc::cpu::avx2_tile() { return &lcsc_cpu_tile::Tile<Avx2>::run; }
lcsc::cpu::FmaProbeFn lcsc::cpu::avx2_fma_probe() {
  return &lcsc_cpu_tile::Tile<Avx2>::fma_probe;
}
lcsc::cpu::TrafficFn lcsc::cpu::avx2_traffic() {
  return &lcsc_cpu_tile::Tile<Avx2>::traffic;
}

// 6 rows x 16 columns: twelve accumulators, two A vectors and a broadcast in sixteen registers.
lcsc::cpu::LoraKernel lcsc::cpu::avx2_lora() {
  return lcsc_cpu_lora::LoraTile<Avx2, 6, 2>::kernel();
}
