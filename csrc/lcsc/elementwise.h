// Per-element math shared by the CPU and CUDA merge kernels: dtype codes, exact conversions to
// float, round-to-nearest-even conversions back, and the one accumulation step. Everything a
// kernel computes goes through these functions, which is why every code path (scalar, AVX2,
// AVX-512, CUDA) gives bitwise identical results.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Internal linkage on purpose: the CPU kernels are compiled once per SIMD level with different
// instruction-set flags, and a shared inline copy picked by the linker could carry AVX-512
// instructions into the scalar path.
#if defined(__CUDACC__)
#define LCSC_HD static __host__ __device__ __forceinline__
#else
#define LCSC_HD static inline
#endif

// For the CPU kernels' register blocks (GCC and Clang, the wheels' compilers): code that holds an
// array of accumulator registers must make no calls, which would spill them, and its loops over
// the array must be unrolled before GCC decides where the array lives. Left to -O3, the array
// goes through the stack on the way in and out of the hot loop.
#define LCSC_ALWAYS_INLINE __attribute__((always_inline))
#define LCSC_UNROLL _Pragma("GCC unroll 16")

namespace lcsc {

// Codes shared with lcsc_fast/engine.py.
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

LCSC_HD bool dtype_valid(int32_t d) { return d == kFloat32 || d == kFloat16 || d == kBFloat16; }
LCSC_HD int dtype_nbytes(int32_t d) { return d == kFloat32 ? 4 : 2; }

LCSC_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

LCSC_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LCSC_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN. Same rule as torch's c10::BFloat16.
LCSC_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Exact for every half value, subnormals, infinities and NaNs included.
LCSC_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  return bits_to_float(sign | float_to_bits(float(mantissa) * 5.9604644775390625e-8f));
}

// Round to nearest, ties to even, with IEEE overflow to infinity and gradual underflow, as the
// F16C instruction and CUDA's __float2half_rn do.
LCSC_HD uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((u >> 13) & 0x3ffu));  // NaN
  if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (u < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5 puts the 10 kept bits at the bottom of
    // the float's mantissa, and the float adder does the rounding to nearest even.
    const float shifted = bits_to_float(u) + 0.5f;
    return uint16_t(sign | (float_to_bits(shifted) - 0x3f000000u));
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round
  return uint16_t(sign | (u >> 13));
}

LCSC_HD float load_as_float(const void* p, int64_t i, int32_t dtype) {
  switch (dtype) {
    case kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

LCSC_HD void store_from_float(void* p, int64_t i, int32_t dtype, float v) {
  switch (dtype) {
    case kFloat16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// The accumulation step, acc + c * x with a single rounding. Every path uses a fused
// multiply-add so that vector, scalar and GPU code agree to the bit.
LCSC_HD float accumulate(float acc, float c, float x) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(c, x, acc);
#else
  return std::fma(c, x, acc);
#endif
}

}  // namespace lcsc
