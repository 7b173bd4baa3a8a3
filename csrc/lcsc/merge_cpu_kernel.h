// The CPU merge algorithm, written once over a vector-ops type V (Scalar, Avx2, Avx512) and
// compiled in one translation unit per SIMD level (cpu_<level>.cpp).
//
// Work is split into tiles of up to `tile` elements of one tensor. For each tile, sources are
// streamed in groups of eight: eight vectors are loaded and converted to float once, then
// folded into every output's float32 accumulator row (K rows of `tile` floats, in L1/L2), so
// each source element is read from memory once however many outputs there are. The base is
// added and the result rounded to the output dtype when the tile is finished.
//
// Each SIMD level defines its V in an anonymous namespace, so Tile<V> and the helpers of
// elementwise.h get internal linkage and no level's code can leak into another's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "elementwise.h"
#include "merge.h"

namespace lcsc::cpu {

// One tile: elements [begin, begin + len) of tensor t for every output, with K * tile floats
// of scratch, rows `stride` floats apart.
using TileFn = void (*)(const MergeArgs&, int64_t t, int64_t begin, int64_t len, float* acc,
                        int64_t stride, bool stream);
TileFn scalar_tile();
TileFn avx2_tile();    // x86-64 builds only
TileFn avx512_tile();  // x86-64 builds only

// Runs `iterations` rounds of 12 independent fma chains; returns the float lanes computed.
// The compute ceiling a batched merge (K fmas per source element) runs into.
using FmaProbeFn = int64_t (*)(int64_t iterations, float* sink);
FmaProbeFn scalar_fma_probe();
FmaProbeFn avx2_fma_probe();
FmaProbeFn avx512_fma_probe();

// The traffic probe's (merge.h) blocks [b0, b1) of 64 bytes of every source.
using TrafficFn = void (*)(const void* const* srcs, int64_t num_sources, int64_t elem_nbytes,
                           void* const* outs, int64_t num_outputs, int64_t b0, int64_t b1,
                           bool stream);
TrafficFn scalar_traffic();
TrafficFn avx2_traffic();
TrafficFn avx512_traffic();

}  // namespace lcsc::cpu

namespace lcsc_cpu_tile {

using lcsc::kBFloat16;
using lcsc::kFloat16;
using lcsc::kFloat32;
using lcsc::MergeArgs;

constexpr int32_t kMixed = -1;  // sources of a group with different dtypes
constexpr int32_t kNoBase = -1;

template <class V>
struct Tile {
  using Reg = typename V::Reg;
  static constexpr int64_t W = V::kWidth;

  static Reg load_any(const void* p, int64_t i, int32_t dtype) {
    switch (dtype) {
      case kFloat16: return V::template load<kFloat16>(p, i);
      case kBFloat16: return V::template load<kBFloat16>(p, i);
      default: return V::template load<kFloat32>(p, i);
    }
  }

  // acc[k][j] += sum_{u<G} coeffs[k*N + u] * src[u][begin + j], one fma at a time in u order.
  // While it runs, the same elements of the next group's sources (next[0..num_next)) are
  // prefetched: a tile's stretch of one source is only a few KiB, too short for the hardware
  // prefetcher to ramp up on its own.
  template <int G, int32_t D>
  static void accumulate_group(const void* const* src, const int32_t* dtypes,
                               const float* coeffs, int64_t N, int64_t K, int64_t begin,
                               int64_t len, float* acc, int64_t stride, const void* const* next,
                               const int32_t* next_dtypes, int num_next) {
    auto prefetch_next = [&](int64_t j) {
      for (int u = 0; u < num_next; ++u) {
        __builtin_prefetch(static_cast<const char*>(next[u]) +
                           (begin + j) * lcsc::dtype_nbytes(next_dtypes[u]));
      }
    };
    auto load = [&](int u, int64_t j) {
      return D == kMixed ? load_any(src[u], begin + j, dtypes[u])
                         : V::template load<D>(src[u], begin + j);
    };
    int64_t j = 0;
    // Two vectors at a time where registers allow (V::kPairs): each broadcast coefficient then
    // feeds two fmas, halving the loads that compete with the sources for the load ports.
    if constexpr (V::kPairs) {
      for (; j + 2 * W <= len; j += 2 * W) {
        prefetch_next(j);
        Reg s0[G], s1[G];
        for (int u = 0; u < G; ++u) s0[u] = load(u, j), s1[u] = load(u, j + W);
        int64_t k = 0;
        for (; k + 2 <= K; k += 2) {  // two outputs interleaved: four independent fma chains
          float* a = acc + k * stride + j;
          float* b = a + stride;
          const float* ca = coeffs + k * N;
          const float* cb = ca + N;
          Reg r0 = V::load_acc(a), r1 = V::load_acc(a + W);
          Reg r2 = V::load_acc(b), r3 = V::load_acc(b + W);
          for (int u = 0; u < G; ++u) {
            const Reg cu = V::broadcast(ca[u]), cv = V::broadcast(cb[u]);
            r0 = V::fma(cu, s0[u], r0);
            r1 = V::fma(cu, s1[u], r1);
            r2 = V::fma(cv, s0[u], r2);
            r3 = V::fma(cv, s1[u], r3);
          }
          V::store_acc(a, r0);
          V::store_acc(a + W, r1);
          V::store_acc(b, r2);
          V::store_acc(b + W, r3);
        }
        for (; k < K; ++k) {
          float* a = acc + k * stride + j;
          const float* c = coeffs + k * N;
          Reg r0 = V::load_acc(a), r1 = V::load_acc(a + W);
          for (int u = 0; u < G; ++u) {
            const Reg cu = V::broadcast(c[u]);
            r0 = V::fma(cu, s0[u], r0);
            r1 = V::fma(cu, s1[u], r1);
          }
          V::store_acc(a, r0);
          V::store_acc(a + W, r1);
        }
      }
    }
    for (; j + W <= len; j += W) {
      prefetch_next(j);
      Reg s[G];
      for (int u = 0; u < G; ++u) s[u] = load(u, j);
      for (int64_t k = 0; k < K; ++k) {
        float* a = acc + k * stride + j;
        const float* c = coeffs + k * N;
        Reg r = V::load_acc(a);
        for (int u = 0; u < G; ++u) r = V::fma(V::broadcast(c[u]), s[u], r);
        V::store_acc(a, r);
      }
    }
    for (; j < len; ++j) {  // the tail: the same math one element at a time
      float s[G];
      for (int u = 0; u < G; ++u) s[u] = lcsc::load_as_float(src[u], begin + j, dtypes[u]);
      for (int64_t k = 0; k < K; ++k) {
        float r = acc[k * stride + j];
        for (int u = 0; u < G; ++u) r = lcsc::accumulate(r, coeffs[k * N + u], s[u]);
        acc[k * stride + j] = r;
      }
    }
  }

  template <int G>
  static void group(const void* const* src, const int32_t* dtypes, const float* coeffs,
                    int64_t N, int64_t K, int64_t begin, int64_t len, float* acc, int64_t stride,
                    int num_next) {
    const int32_t d = dtypes[0];
    bool uniform = true;
    for (int u = 1; u < G; ++u) uniform = uniform && dtypes[u] == d;
    const auto args = std::make_tuple(src, dtypes, coeffs, N, K, begin, len, acc, stride,
                                      src + G, dtypes + G, num_next);
    if (!uniform) return std::apply(accumulate_group<G, kMixed>, args);
    switch (d) {
      case kBFloat16: return std::apply(accumulate_group<G, kBFloat16>, args);
      case kFloat16: return std::apply(accumulate_group<G, kFloat16>, args);
      default: return std::apply(accumulate_group<G, kFloat32>, args);
    }
  }

  // outs[k][begin + j] = round(base[begin + j] + acc[k][j]); the base is read once per element
  // before any output is written, so an output may alias the base.
  // stream: outputs are written with non-temporal stores where aligned, which skips reading
  // each output line into the cache before overwriting it (a third of the memory traffic of a
  // batch of fp32 outputs). Only for merges too large to stay in cache anyway.
  template <int32_t OD, int32_t BD>
  static void finish(const MergeArgs& a, int64_t t, int64_t begin, int64_t len,
                     const float* acc, int64_t stride, bool stream) {
    const int64_t K = a.num_outputs, T = a.num_tensors;
    const void* base = a.bases[t];
    if (stream) {
      const int64_t bytes = W * lcsc::dtype_nbytes(OD);
      for (int64_t k = 0; k < K && stream; ++k) {
        const auto p = reinterpret_cast<uintptr_t>(a.outs[k * T + t]) + begin * (bytes / W);
        stream = p % bytes == 0;
      }
    }
    int64_t j = 0;
    for (; j + W <= len; j += W) {
      Reg b{};
      if constexpr (BD != kNoBase) b = V::template load<BD>(base, begin + j);
      for (int64_t k = 0; k < K; ++k) {
        Reg r = V::load_acc(acc + k * stride + j);
        if constexpr (BD != kNoBase) r = V::add(r, b);
        if (stream) {
          V::template store<OD, true>(a.outs[k * T + t], begin + j, r);
        } else {
          V::template store<OD>(a.outs[k * T + t], begin + j, r);
        }
      }
    }
    for (; j < len; ++j) {
      float b = 0.f;
      if constexpr (BD != kNoBase) b = lcsc::load_as_float(base, begin + j, BD);
      for (int64_t k = 0; k < K; ++k) {
        float r = acc[k * stride + j];
        if constexpr (BD != kNoBase) r = r + b;
        lcsc::store_from_float(a.outs[k * T + t], begin + j, OD, r);
      }
    }
  }

  template <int32_t OD>
  static void finish_out(const MergeArgs& a, int64_t t, int64_t begin, int64_t len,
                         const float* acc, int64_t stride, bool stream) {
    if (a.bases[t] == nullptr) return finish<OD, kNoBase>(a, t, begin, len, acc, stride, stream);
    switch (a.base_dtypes[t]) {
      case kFloat16: return finish<OD, kFloat16>(a, t, begin, len, acc, stride, stream);
      case kBFloat16: return finish<OD, kBFloat16>(a, t, begin, len, acc, stride, stream);
      default: return finish<OD, kFloat32>(a, t, begin, len, acc, stride, stream);
    }
  }

  static int64_t fma_probe(int64_t iterations, float* sink) {
    constexpr int kChains = 12;  // enough independent chains to cover the fma latency
    Reg a[kChains];
    for (int i = 0; i < kChains; ++i) a[i] = V::broadcast(float(i));
    const Reg c = V::broadcast(0.999f), x = V::broadcast(1e-3f);
    for (int64_t r = 0; r < iterations; ++r) {
      for (int i = 0; i < kChains; ++i) a[i] = V::fma(c, a[i], x);
    }
    float buf[64];
    for (int i = 0; i < kChains; ++i) {
      V::store_acc(buf, a[i]);
      *sink += buf[0];
    }
    return iterations * kChains * W;
  }

  // The traffic probe: blocks [b0, b1) of 64 bytes of every source, read as vectors and added
  // up; block b of each output, its 64 / elem_nbytes float32 elements from b * 64 / elem_nbytes
  // on, gets the sums. Only the bytes moved matter, not the values.
  static void traffic(const void* const* srcs, int64_t N, int64_t elem_nbytes,
                      void* const* outs, int64_t K, int64_t b0, int64_t b1, bool stream) {
    constexpr int64_t kIn = W < 16 ? 16 / W : 1;  // vectors per 64-byte block
    const int64_t per_block = 64 / elem_nbytes;
    for (int64_t b = b0; b < b1; ++b) {
      Reg sum[kIn];
      for (int64_t v = 0; v < kIn; ++v) sum[v] = V::zero();
      for (int64_t i = 0; i < N; ++i) {
        for (int64_t v = 0; v < kIn; ++v) {
          sum[v] = V::add(sum[v], V::template load<kFloat32>(srcs[i], b * 16 + v * W));
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t e = 0; e < per_block; e += W) {
          const Reg x = sum[(e / W) % kIn];
          if (stream) {
            V::template store<kFloat32, true>(outs[k], b * per_block + e, x);
          } else {
            V::template store<kFloat32>(outs[k], b * per_block + e, x);
          }
        }
      }
    }
  }

  // Elements [begin, begin + len) of tensor t, every output; acc is K * tile floats of scratch.
  static void run(const MergeArgs& a, int64_t t, int64_t begin, int64_t len, float* acc,
                  int64_t stride, bool stream) {
    const int64_t N = a.num_sources, K = a.num_outputs;
    for (int64_t k = 0; k < K; ++k) std::fill_n(acc + k * stride, len, 0.f);
    const void* const* src = a.srcs + t * N;
    const int32_t* dtypes = a.src_dtypes + t * N;
    int64_t i = 0;
    auto next_count = [N](int64_t after) { return int(std::min<int64_t>(8, N - after)); };
    for (; i + 8 <= N; i += 8) {
      group<8>(src + i, dtypes + i, a.coeffs + i, N, K, begin, len, acc, stride, next_count(i + 8));
    }
    if (i + 4 <= N) {
      group<4>(src + i, dtypes + i, a.coeffs + i, N, K, begin, len, acc, stride, next_count(i + 4));
      i += 4;
    }
    for (; i < N; ++i) {
      group<1>(src + i, dtypes + i, a.coeffs + i, N, K, begin, len, acc, stride, next_count(i + 1));
    }
    switch (a.out_dtypes[t]) {
      case kFloat16: return finish_out<kFloat16>(a, t, begin, len, acc, stride, stream);
      case kBFloat16: return finish_out<kBFloat16>(a, t, begin, len, acc, stride, stream);
      default: return finish_out<kFloat32>(a, t, begin, len, acc, stride, stream);
    }
  }
};

}  // namespace lcsc_cpu_tile
