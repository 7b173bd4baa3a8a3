// AVX-512F vector ops, 16 floats a vector, and the merge tile and low-rank kernel built on them.
// Compiled with -mavx512f (plus AVX2/FMA/F16C); called only after the CPU and the OS have been
// checked for AVX-512 state.
#include <immintrin.h>

#include "lora_cpu_kernel.h"
#include "merge_cpu_kernel.h"

namespace {

using lcsc::kBFloat16;
using lcsc::kFloat16;
using lcsc::kFloat32;

struct Avx512 {
  using Reg = __m512;
  static constexpr int64_t kWidth = 16;
  static constexpr int kAccRegs = 24;  // a batch's accumulators: 24 of the 32 registers
  static constexpr bool kPairs = true;  // a single merge does two vectors per step
  static constexpr bool kBf16EvenOdd = true;  // see merge_cpu_kernel.h

  template <int32_t D>
  static __m512 load(const void* p, int64_t i) {
    if constexpr (D == kFloat32) {
      return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    } else {
      const __m256i h = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
      if constexpr (D == kFloat16) return _mm512_cvtph_ps(h);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }

  // kStream: a non-temporal store; the caller guarantees the vector-size alignment it needs.
  template <int32_t D, bool kStream = false>
  static void store(void* p, int64_t i, __m512 v) {
    if constexpr (D == kFloat32) {
      if constexpr (kStream) {
        _mm512_stream_ps(static_cast<float*>(p) + i, v);
      } else {
        _mm512_storeu_ps(static_cast<float*>(p) + i, v);
      }
      return;
    }
    __m256i h;
    if constexpr (D == kFloat16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // bf16: lcsc::float_to_bf16, sixteen lanes at a time
      const __m512i u = _mm512_castps_si512(v);
      const __m512i upper = _mm512_srli_epi32(u, 16);
      const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                            _mm512_and_si512(upper, _mm512_set1_epi32(1)));
      const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
      const __m512i quiet_nan = _mm512_or_si512(upper, _mm512_set1_epi32(0x40));
      const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(
          _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
      h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, quiet_nan));
    }
    auto* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i);
    if constexpr (kStream) {
      _mm256_stream_si256(dst, h);
    } else {
      _mm256_storeu_si256(dst, h);
    }
  }

  // bf16 elements [i, i + 32) as float32: the even ones in `even`, the odd ones in `odd`.
  static void load_bf16_even_odd(const void* p, int64_t i, __m512& even, __m512& odd) {
    const __m512i x = _mm512_loadu_si512(static_cast<const uint16_t*>(p) + i);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u))));
  }

  // (even, odd) of 32 elements back to elements [0, 16) and [16, 32) in order.
  static void interleave(__m512& even, __m512& odd) {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi =
        _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512 first = _mm512_permutex2var_ps(even, lo, odd);
    odd = _mm512_permutex2var_ps(even, hi, odd);
    even = first;
  }

  static __m512 load_acc(const float* p) { return _mm512_loadu_ps(p); }
  static void store_acc(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 broadcast(float c) { return _mm512_set1_ps(c); }
  static __m512 fma(__m512 c, __m512 x, __m512 acc) { return _mm512_fmadd_ps(c, x, acc); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
};

}  // namespace

lcsc::cpu::TileFn lcsc::cpu::avx512_tile() { return &lcsc_cpu_tile::Tile<Avx512>::run; }
lcsc::cpu::FmaProbeFn lcsc::cpu::avx512_fma_probe() {
  return &lcsc_cpu_tile::Tile<Avx512>::fma_probe;
}
lcsc::cpu::TrafficFn lcsc::cpu::avx512_traffic() {
  return &lcsc_cpu_tile::Tile<Avx512>::traffic;
}

// 12 rows x 32 columns: 24 accumulators, two A vectors and broadcasts in 32 registers; a
// 192-rank panel of A (192 x 32 floats, 24 KiB) stays in a 32-48 KiB L1 while the rows sweep it.
lcsc::cpu::LoraKernel lcsc::cpu::avx512_lora() {
    return lcsc_cpu_lora::LoraTile<Avx512, 12, 2>::kernel();
}
