// The CPU merge algorithm, written once over a vector-ops type V (Scalar, Avx2, Avx512) and
// compiled in one translation unit per SIMD level (cpu_<level>.cpp). Work is split into tiles:
// up to job.tile elements of one tensor. Two tile kernels share the per-element math, so a
// single merge and a batch give bitwise identical outputs:
//
// - One output (a single merge, which only memory bandwidth limits). Sources are streamed in
//   groups of eight, each over the whole tile, folded into one float32 accumulator row in L2
//   (the last group writes float32 outputs directly). A tile's stretch of each source is one
//   sequential run of 32 or 64 KiB; in merges larger than the caches, each step also
//   prefetches every source of the group a few KiB ahead (Tile::prefetch_ahead).
// - K >= 2 outputs (a population batch, K fmas per source element, which has to be compute
//   efficient too). Up to 8 outputs x C vectors of accumulators stay in registers while the
//   sources of a group stream through: each source vector is loaded once and feeds 8 x C fmas
//   with no accumulator traffic; after the last group, float32 outputs are written straight
//   from those registers (16-bit ones from scratch once the tile is summed, a line of each
//   output at a time). The tile is short (2 KiB of each source), so that a group's
//   stretch of every source fits in L2, and the next group's (or the next tile's) stretch is
//   prefetched into L2 one source after the other, in sequential runs, while this one computes.
//   Large merges of up to 32 sources that share their offset within a page read a packed
//   copy of the group's stretch instead of the sources (Tile::pack).
//
// Each SIMD level defines its V in an anonymous namespace, so Tile<V> and the helpers of
// elementwise.h get internal linkage and no level's code can leak into another's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#include "elementwise.h"
#include "merge.h"

namespace lcsc::cpu {

// A batch copies a group of at most this many sources' stretches of a tile into a panel in
// its scratch (after the K accumulator rows) when they all start at one offset within a 4 KiB
// page; see Tile::pack.
constexpr int64_t kPackMaxSources = 32;

// What every tile of one merge shares.
struct Job {
  const MergeArgs* args;
  const float* coeffs_by_source;  // [N, K]: coeffs[k*N + i] at [i*K + k]
  int64_t tile;                   // elements per tile; scratch rows are this many floats apart
  int64_t group;                  // sources per pass over a tile (batches)
  bool stream;                    // non-temporal output stores where aligned
  bool ahead;                     // single merges prefetch sources (Tile::prefetch_ahead)
};

// Elements [begin, begin + len) of tensor t; len 0: none.
struct Span {
  int64_t t = 0, begin = 0, len = 0;
};

// Runs tile `tile` for every output, with scratch_floats(K, job.tile) floats of scratch; `next`
// is the tile this worker runs after it (prefetched by batches).
inline int64_t scratch_floats(int64_t num_outputs, int64_t tile) {
  return num_outputs * tile + (num_outputs > 1 ? kPackMaxSources * tile + 16 : 0);
}
using TileFn = void (*)(const Job&, const Span& tile, const Span& next, float* scratch);
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
using lcsc::cpu::Job;
using lcsc::cpu::kPackMaxSources;
using lcsc::cpu::Span;

constexpr int32_t kMixed = -1;  // sources of a group with different dtypes
// A single merge whose sources are all bf16, at a level with V::kBf16EvenOdd: two vectors of
// sums hold the even and the odd elements of 2W, so one load of 2W bf16 values feeds both
// (a shift and a mask instead of two widening loads and two shifts); the last group puts them
// back in order. The same fmas in the same order per element: the same bits.
constexpr int32_t kBFloat16EvenOdd = -2;
constexpr int32_t kNoBase = -1;

// Prefetches the lines of some sources' stretch of a span into L2, source after source, a few
// lines per step, so that they arrive in long sequential runs spread over the steps of the
// computation they overlap with.
class Prefetcher {
 public:
  Prefetcher() = default;
  // Sources [u0, u1) of span s; `steps` calls to step() should cover them.
  Prefetcher(const MergeArgs& a, const Span& s, int64_t u0, int64_t u1, int64_t steps)
      : srcs_(a.srcs + s.t * a.num_sources), dtypes_(a.src_dtypes + s.t * a.num_sources),
        u_(u0), u_end_(u1), begin_(s.begin), len_(s.len) {
    if (s.len <= 0 || u0 >= u1) return;
    const int64_t lines = (u1 - u0) * (s.len * lcsc::dtype_nbytes(dtypes_[u0]) / 64 + 2);
    per_step_ = (lines + steps - 1) / std::max<int64_t>(steps, 1);
    start_source();
  }

  void step() {
    for (int64_t i = 0; i < per_step_; ++i) {
      if (p_ >= end_) {
        if (++u_ >= u_end_) {
          per_step_ = 0;
          return;
        }
        start_source();
      }
      __builtin_prefetch(p_, 0, 2);
      p_ += 64;
    }
  }

 private:
  void start_source() {
    const int64_t nbytes = lcsc::dtype_nbytes(dtypes_[u_]);
    const char* s = static_cast<const char*>(srcs_[u_]);
    p_ = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(s + begin_ * nbytes) &
                                       ~uintptr_t{63});
    end_ = s + (begin_ + len_) * nbytes;
  }

  const void* const* srcs_ = nullptr;
  const int32_t* dtypes_ = nullptr;
  int64_t u_ = 0, u_end_ = 0, begin_ = 0, len_ = 0, per_step_ = 0;
  const char* p_ = nullptr;
  const char* end_ = nullptr;
};

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

  template <int32_t D>
  static Reg load_src(const void* const* src, const int32_t* dtypes, int64_t u, int64_t i) {
    if constexpr (D == kMixed) return load_any(src[u], i, dtypes[u]);
    return V::template load<D>(src[u], i);
  }

  // ---------------------------------------------------------------- one output

  // Where a single merge's last group puts its sums: plus the base, straight into a float32
  // output (stream: with non-temporal stores, which the output's alignment allows).
  struct Out {
    float* out;
    const void* base;
    int32_t base_dtype;
    bool stream;
    bool ahead;  // software prefetches (prefetch_ahead)
  };

  // A single merge reads its 8 sources of a group a vector of each in turn: 8 streams at once,
  // which the hardware prefetchers alone serve slower than one (2-core Zen 4 VM, phases when a
  // one-stream read ran at ~49 GB/s: bf16 sources merged at 58% of that, fp32 at 70%). Where
  // the sources come from memory (Job::ahead), each step therefore also prefetches into L2 the
  // lines kAheadElems elements further on in every source: 3 KiB ahead for 16-bit sources,
  // 6 KiB for float32. Measured against 1-8 KiB: bf16 best at 2-4 KiB, fp32 flat over 2-8 KiB.
  // The address may lie past the end of a source (whatever follows it, or nothing): a
  // software prefetch never faults, so it is formed as an integer.
  static constexpr int64_t kAheadElems = 1536;

  // The prefetch for source u's step of kStep elements from element i: every line of the step's
  // bytes kAheadElems further on. AVX2 steps of 16 or 32 bytes prefetch a line every time:
  // against 59eb3fb that took 0.78-0.91x the time; skipping the repeats behind a test of the
  // address took 0.86-1.11x (bf16 N=16 slower: the test cost more than the prefetches saved).
  template <int32_t D, int64_t kStep>
  LCSC_ALWAYS_INLINE static void prefetch_ahead(const void* const* src, const int32_t* dtypes,
                                                int u, int64_t i) {
    if constexpr (W > 1) {
      const int64_t nbytes = D == kMixed ? lcsc::dtype_nbytes(dtypes[u]) : D == kFloat32 ? 4 : 2;
      const uintptr_t p = reinterpret_cast<uintptr_t>(src[u]) + (i + kAheadElems) * nbytes;
      for (int64_t b = 0; b < kStep * nbytes; b += 64) {
        __builtin_prefetch(reinterpret_cast<const void*>(p + b), 0, 2);
      }
    }
  }

  // acc[j] += sum_{u<G} coeffs[u] * src[u][begin + j], one fma at a time in u order, starting
  // from zero instead of acc when `first`; when kWrite, out[begin + j] = base[begin + j] + that
  // sum (the order finish() adds them in) instead of acc. With kBFloat16EvenOdd, acc holds each
  // 2W elements as their even then their odd ones until the `last` group.
  template <int G, int32_t D, bool kWrite>
  static void accumulate_group(const void* const* src, const int32_t* dtypes,
                               const float* coeffs, int64_t begin, int64_t len, float* acc,
                               bool first, bool last, const Out& o) {
    constexpr int32_t DL = D == kBFloat16EvenOdd ? kBFloat16 : D;  // for one vector at a time
    // The base is loaded before the output is stored, so the output may be the base itself.
    auto put = [&](int64_t j, Reg r) LCSC_ALWAYS_INLINE {
      if constexpr (!kWrite) {
        V::store_acc(acc + j, r);
      } else {
        if (o.base) r = V::add(r, load_any(o.base, begin + j, o.base_dtype));
        if (o.stream) {
          V::template store<kFloat32, true>(o.out, begin + j, r);
        } else {
          V::template store<kFloat32>(o.out, begin + j, r);
        }
      }
    };
    int64_t j = 0;
    // Two vectors at a time where registers allow (V::kPairs): each broadcast coefficient then
    // feeds two fmas.
    if constexpr (V::kPairs) {
      for (; j + 2 * W <= len; j += 2 * W) {
        Reg r0 = first ? V::zero() : V::load_acc(acc + j);
        Reg r1 = first ? V::zero() : V::load_acc(acc + j + W);
        if constexpr (D == kBFloat16EvenOdd) {
          for (int u = 0; u < G; ++u) {
            if (o.ahead) prefetch_ahead<D, 2 * W>(src, dtypes, u, begin + j);
            const Reg c = V::broadcast(coeffs[u]);
            Reg even, odd;
            V::load_bf16_even_odd(src[u], begin + j, even, odd);
            r0 = V::fma(c, even, r0);
            r1 = V::fma(c, odd, r1);
          }
          if (last) V::interleave(r0, r1);
        } else {
          for (int u = 0; u < G; ++u) {
            if (o.ahead) prefetch_ahead<D, 2 * W>(src, dtypes, u, begin + j);
            const Reg c = V::broadcast(coeffs[u]);
            r0 = V::fma(c, load_src<D>(src, dtypes, u, begin + j), r0);
            r1 = V::fma(c, load_src<D>(src, dtypes, u, begin + j + W), r1);
          }
        }
        put(j, r0);
        put(j + W, r1);
      }
    }
    for (; j + W <= len; j += W) {
      Reg r = first ? V::zero() : V::load_acc(acc + j);
      for (int u = 0; u < G; ++u) {
        if (o.ahead) prefetch_ahead<DL, W>(src, dtypes, u, begin + j);
        r = V::fma(V::broadcast(coeffs[u]), load_src<DL>(src, dtypes, u, begin + j), r);
      }
      put(j, r);
    }
    for (; j < len; ++j) {  // the tail: the same math one element at a time
      float r = first ? 0.f : acc[j];
      for (int u = 0; u < G; ++u) {
        r = lcsc::accumulate(r, coeffs[u], lcsc::load_as_float(src[u], begin + j, dtypes[u]));
      }
      if constexpr (kWrite) {
        o.out[begin + j] = o.base ? r + lcsc::load_as_float(o.base, begin + j, o.base_dtype) : r;
      } else {
        acc[j] = r;
      }
    }
  }

  // even_odd: every source of the merge is bf16 (kBFloat16EvenOdd applies to all its groups).
  template <int G, bool kWrite>
  static void group(const void* const* src, const int32_t* dtypes, const float* coeffs,
                    int64_t begin, int64_t len, float* acc, bool first, bool last, bool even_odd,
                    const Out& o) {
    const int32_t d = dtypes[0];
    bool uniform = true;
    for (int u = 1; u < G; ++u) uniform = uniform && dtypes[u] == d;
    const auto args =
        std::make_tuple(src, dtypes, coeffs, begin, len, acc, first, last, std::cref(o));
    if (!uniform) return std::apply(accumulate_group<G, kMixed, kWrite>, args);
    if constexpr (V::kBf16EvenOdd) {
      if (even_odd) return std::apply(accumulate_group<G, kBFloat16EvenOdd, kWrite>, args);
    }
    switch (d) {
      case kBFloat16: return std::apply(accumulate_group<G, kBFloat16, kWrite>, args);
      case kFloat16: return std::apply(accumulate_group<G, kFloat16, kWrite>, args);
      default: return std::apply(accumulate_group<G, kFloat32, kWrite>, args);
    }
  }

  // Sources in groups of 8 (then 4, then one at a time) over the whole tile. The first group
  // starts the row from zero; with a float32 output, the last group writes the output directly:
  // the row is not stored and read back once more, and the output's stores spread over that
  // group's reading instead of following it in a burst.
  static void single(const Job& job, const Span& s, float* acc) {
    const MergeArgs& a = *job.args;
    const int64_t N = a.num_sources;
    const void* const* src = a.srcs + s.t * N;
    const int32_t* dtypes = a.src_dtypes + s.t * N;
    const bool direct = a.out_dtypes[s.t] == kFloat32;
    Out o{static_cast<float*>(a.outs[s.t]), a.bases[s.t], a.base_dtypes[s.t], false, job.ahead};
    if (direct) {
      const auto p = reinterpret_cast<uintptr_t>(o.out + s.begin);
      o.stream = job.stream && p % (W * sizeof(float)) == 0;
    }
    const bool even_odd =
        std::all_of(dtypes, dtypes + N, [](int32_t d) { return d == kBFloat16; });
    auto run = [&](auto g, int64_t i) {
      constexpr int G = decltype(g)::value;
      const auto args = std::make_tuple(src + i, dtypes + i, a.coeffs + i, s.begin, s.len, acc,
                                        i == 0, i + G == N, even_odd, std::cref(o));
      if (direct && i + G == N) return std::apply(group<G, true>, args);
      std::apply(group<G, false>, args);
    };
    int64_t i = 0;
    for (; i + 8 <= N; i += 8) run(std::integral_constant<int, 8>{}, i);
    if (i + 4 <= N) run(std::integral_constant<int, 4>{}, i), i += 4;
    for (; i < N; ++i) run(std::integral_constant<int, 1>{}, i);
    if (!direct) finish(a, s.t, s.begin, s.len, acc, job.tile, 1, job.stream);
  }

  // ---------------------------------------------------------------- K >= 2 outputs

  // Sources u0 + j, j < u1 - u0, of a batch's tile as its kernels read them: element e of
  // source u0 + j at index e - origin of src[j]. Either the tensor's sources themselves
  // (origin 0) or their stretches of the tile copied into the panel (origin: the tile's begin).
  struct Sources {
    const void* const* src;
    const int32_t* dtypes;
    int64_t origin, u0, u1;
  };

  // Elements [e, e + C*W) of tensor t, outputs [k0, k0 + KB), sources g: the KB x C
  // accumulators start from zero (first) or from their scratch rows, and end in those rows
  // (acc: row k of output k, rows job.tile floats apart) or, when `write` (float32 outputs
  // only), in the outputs.
  // LCSC_UNROLL (elementwise.h) keeps r in registers: without it, about 100 extra vector moves
  // per call.
  template <int KB, int C, int32_t D>
  static void accumulate(const Job& job, int64_t t, int64_t e, int64_t k0, const Sources& g,
                         bool first, bool write, bool stream, float* acc, Prefetcher* pf) {
    const MergeArgs& a = *job.args;
    const int64_t K = a.num_outputs, ld = job.tile, i = e - g.origin;
    float* rows = acc + k0 * ld;
    Reg r[KB][C];
    LCSC_UNROLL for (int kk = 0; kk < KB; ++kk) {
      LCSC_UNROLL for (int c = 0; c < C; ++c) {
        r[kk][c] = first ? V::zero() : V::load_acc(rows + kk * ld + c * W);
      }
    }
    for (int64_t j = 0; j < g.u1 - g.u0; ++j) {
      if (pf) pf->step();
      Reg s[C];
      LCSC_UNROLL for (int c = 0; c < C; ++c) s[c] = load_src<D>(g.src, g.dtypes, j, i + c * W);
      const float* cu = job.coeffs_by_source + (g.u0 + j) * K + k0;
      LCSC_UNROLL for (int kk = 0; kk < KB; ++kk) {
        const Reg b = V::broadcast(cu[kk]);
        LCSC_UNROLL for (int c = 0; c < C; ++c) r[kk][c] = V::fma(b, s[c], r[kk][c]);
      }
    }
    if (write) {
      return stream ? write_chunk<KB, C, true>(a, t, e, k0, r, acc, ld)
                    : write_chunk<KB, C, false>(a, t, e, k0, r, acc, ld);
    }
    LCSC_UNROLL for (int kk = 0; kk < KB; ++kk) {
      LCSC_UNROLL for (int c = 0; c < C; ++c) V::store_acc(rows + kk * ld + c * W, r[kk][c]);
    }
  }

  // Writes elements [e, e + C*W) of every (float32) output of tensor t once all their sources
  // are read: outputs [0, k0) from their scratch rows in acc, [k0, k0 + KB) from r, each plus
  // the base. The base is loaded before the first store, so an output may be the base (or a
  // source) itself. Always inlined, so that r stays in registers.
  template <int KB, int C, bool kStream>
  LCSC_ALWAYS_INLINE static void write_chunk(const MergeArgs& a, int64_t t, int64_t e,
                                             int64_t k0, const Reg (&r)[KB][C],
                                             const float* acc, int64_t ld) {
    const int64_t T = a.num_tensors;
    const void* base = a.bases[t];
    Reg b[C];
    LCSC_UNROLL for (int c = 0; c < C; ++c) {
      b[c] = base ? load_any(base, e + c * W, a.base_dtypes[t]) : V::zero();
    }
    // The sum as finish() forms it: plus the base only when there is one (x + 0 is not x for -0).
    auto put = [&](int64_t k, int c, Reg x) LCSC_ALWAYS_INLINE {
      V::template store<kFloat32, kStream>(a.outs[k * T + t], e + c * W, base ? V::add(x, b[c]) : x);
    };
    for (int64_t k = 0; k < k0; ++k) {
      LCSC_UNROLL for (int c = 0; c < C; ++c) put(k, c, V::load_acc(acc + k * ld + c * W));
    }
    LCSC_UNROLL for (int kk = 0; kk < KB; ++kk) {
      LCSC_UNROLL for (int c = 0; c < C; ++c) put(k0 + kk, c, r[kk][c]);
    }
  }

  // Elements [e, e + C*W), sources g, every output: in groups of KB0 outputs, then the rest in
  // groups of 4, 2 and 1, all at the same C. `write`: these are the last sources and the
  // outputs are float32, so the last output group writes every output of the chunk.
  template <int KB0, int C, int32_t D>
  static void chunk(const Job& job, int64_t t, int64_t e, const Sources& g, bool first,
                    bool write, bool stream, float* acc, Prefetcher* pf) {
    const int64_t K = job.args->num_outputs;
    auto outputs = [&](auto kb, int64_t k) {
      constexpr int KB = decltype(kb)::value;
      accumulate<KB, C, D>(job, t, e, k, g, first, write && k + KB == K, stream, acc,
                           k == 0 ? pf : nullptr);
    };
    int64_t k = 0;
    for (; k + KB0 <= K; k += KB0) outputs(std::integral_constant<int, KB0>{}, k);
    if constexpr (KB0 > 4) {
      if (k + 4 <= K) outputs(std::integral_constant<int, 4>{}, k), k += 4;
    }
    if constexpr (KB0 > 2) {
      if (k + 2 <= K) outputs(std::integral_constant<int, 2>{}, k), k += 2;
    }
    if constexpr (KB0 > 1) {
      if (k < K) outputs(std::integral_constant<int, 1>{}, k);
    }
  }

  // The tile's whole vectors, sources in groups of job.group, each group over the whole tile
  // for every output while the next group's (or the next tile's first group's) stretch is
  // prefetched; the last group writes the outputs chunk by chunk.
  template <int KB0, int32_t D>
  static void batch_vectors(const Job& job, const Span& s, const Span& next, float* acc) {
    constexpr int C = std::max(1, std::min(V::kAccRegs / KB0, 4));
    const MergeArgs& a = *job.args;
    const int64_t N = a.num_sources, G = job.group;
    const int64_t full = s.len / (C * W) * (C * W), vectors = s.len / W * W;
    const int64_t steps_per_source = full / (C * W) + (vectors - full) / W;
    // Streaming stores where every output's vectors are aligned for them. Chunks start at
    // multiples of W, so that depends on the outputs' pointers only.
    const int64_t T = a.num_tensors;
    const uintptr_t align_mask = W * lcsc::dtype_nbytes(a.out_dtypes[s.t]) - 1;
    bool stream = job.stream;
    for (int64_t k = 0; k < a.num_outputs && stream; ++k) {
      stream = (reinterpret_cast<uintptr_t>(a.outs[k * T + s.t]) & align_mask) == 0;
    }
    // float32 outputs are written chunk by chunk from the registers; 16-bit ones once the last
    // group has left the whole tile's sums in scratch, line after line of each (finish).
    const bool direct = a.out_dtypes[s.t] == kFloat32;
    char* panel = align64(reinterpret_cast<char*>(acc + a.num_outputs * job.tile));
    const void* packed[kPackMaxSources];
    for (int64_t u0 = 0; u0 < N; u0 += G) {
      const int64_t u1 = std::min(N, u0 + G);
      const bool first = u0 == 0, last = u1 == N;
      const int64_t steps = (u1 - u0) * steps_per_source;
      Prefetcher pf = last ? Prefetcher(a, next, 0, std::min(N, G), steps)
                           : Prefetcher(a, s, u1, std::min(N, u1 + G), steps);
      Sources g{a.srcs + s.t * N + u0, a.src_dtypes + s.t * N + u0, 0, u0, u1};
      if (job.stream && pack(g, s.begin, vectors, panel, packed)) {
        g = {packed, g.dtypes, s.begin, u0, u1};
      }
      const bool write = last && direct;
      for (int64_t j = 0; j < full; j += C * W) {
        chunk<KB0, C, D>(job, s.t, s.begin + j, g, first, write, stream, acc + j, &pf);
      }
      if constexpr (C > 1) {
        for (int64_t j = full; j < vectors; j += W) {
          chunk<KB0, 1, D>(job, s.t, s.begin + j, g, first, write, stream, acc + j, &pf);
        }
      }
    }
    if (!direct) finish(a, s.t, s.begin, vectors, acc, job.tile, a.num_outputs, job.stream);
  }

  static char* align64(char* p) {
    return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64;
  }

  // GEMM-style packing: a group's stretch of the tile is copied, source after source, into the
  // panel (rows of whole lines, in L1 or L2), and the chunks read it there. Only in merges too
  // large for the caches (job.stream), for groups of at most kPackMaxSources, and when the
  // group's sources all start at one offset within a 4 KiB page, as separately allocated
  // tensors and a tensor at one offset in every checkpoint file do. Read in place, the same
  // element of each such source falls in one set of a virtually indexed L1 (4 KiB per way);
  // on a 2-core Zen 4 VM the batch then ran up to 2.5x as long as with the sources at spread
  // offsets, by an amount that also moved with how far apart the sources lie (the VM has no
  // PMU to say why). Packed, it runs at about the spread-offset speed wherever they lie.
  // fp32 and bf16, N = 16 and 32, K = 8, packed / in place: 0.44-0.84x in the benchmark's
  // layout and 0.44-0.79x with sources 128 MiB + 4 KiB to 129 MiB apart; where reading in
  // place was already fast it costs 1.06x (bf16, N = 32, 32 MiB apart) and 1.07x (fp32,
  // N = 16, exactly 128 MiB apart). At N = 64 (the benchmark's sources, 32 MiB apart) it took
  // 1.35x (fp32) and 1.08x (bf16): hence the cap.
  // Elements [begin, begin + len) of every source are copied; rows[j] gets source u0 + j's.
  static bool pack(const Sources& g, int64_t begin, int64_t len, char* panel,
                   const void** rows) {
    const int64_t G = g.u1 - g.u0;
    if (G > kPackMaxSources || len == 0) return false;
    auto at = [&](int64_t j) {
      return static_cast<const char*>(g.src[j]) + begin * lcsc::dtype_nbytes(g.dtypes[j]);
    };
    const uintptr_t offset = reinterpret_cast<uintptr_t>(at(0)) % 4096;
    for (int64_t j = 1; j < G; ++j) {
      if (reinterpret_cast<uintptr_t>(at(j)) % 4096 != offset) return false;
    }
    for (int64_t j = 0; j < G; ++j) {
      const char* from = at(j);
      const int64_t nbytes = len * lcsc::dtype_nbytes(g.dtypes[j]);
      int64_t b = 0;
      if constexpr (W > 1) {  // vector moves of the bits, whatever the dtype (unaligned, may alias)
        for (; b + W * 4 <= nbytes; b += W * 4) {
          V::store_acc(reinterpret_cast<float*>(panel + b),
                       V::load_acc(reinterpret_cast<const float*>(from + b)));
        }
      }
      std::memcpy(panel + b, from + b, nbytes - b);
      rows[j] = panel;
      panel = align64(panel + nbytes);
    }
    return true;
  }

  template <int32_t D>
  static void batch_vectors(const Job& job, const Span& s, const Span& next, float* acc) {
    const int64_t K = job.args->num_outputs;
    if (K >= 8) return batch_vectors<8, D>(job, s, next, acc);
    if (K >= 4) return batch_vectors<4, D>(job, s, next, acc);
    return batch_vectors<2, D>(job, s, next, acc);
  }

  static void batch(const Job& job, const Span& s, const Span& next, float* acc) {
    const MergeArgs& a = *job.args;
    const int64_t N = a.num_sources, K = a.num_outputs;
    const void* const* src = a.srcs + s.t * N;
    const int32_t* dtypes = a.src_dtypes + s.t * N;
    bool uniform = true;
    for (int64_t u = 1; u < N && uniform; ++u) uniform = dtypes[u] == dtypes[0];
    switch (uniform ? dtypes[0] : kMixed) {
      case kBFloat16: batch_vectors<kBFloat16>(job, s, next, acc); break;
      case kFloat16: batch_vectors<kFloat16>(job, s, next, acc); break;
      case kFloat32: batch_vectors<kFloat32>(job, s, next, acc); break;
      default: batch_vectors<kMixed>(job, s, next, acc);
    }
    // The last len % W elements, one at a time, in the same order.
    const int64_t rest = s.len % W, e = s.begin + s.len - rest;
    if (rest == 0) return;
    for (int64_t k = 0; k < K; ++k) std::fill_n(acc + k * job.tile, rest, 0.f);
    for (int64_t u = 0; u < N; ++u) {
      for (int64_t j = 0; j < rest; ++j) {
        const float x = lcsc::load_as_float(src[u], e + j, dtypes[u]);
        for (int64_t k = 0; k < K; ++k) {
          float& r = acc[k * job.tile + j];
          r = lcsc::accumulate(r, job.coeffs_by_source[u * K + k], x);
        }
      }
    }
    finish(a, s.t, e, rest, acc, job.tile, K, false);
  }

  static void run(const Job& job, const Span& s, const Span& next, float* scratch) {
    if (job.args->num_outputs == 1) return single(job, s, scratch);
    batch(job, s, next, scratch);
  }

  // ---------------------------------------------------------------- writing the outputs

  // outs[k][e + j] = round(base[e + j] + acc[k * ld + j]) for k < K, j < len; the base is read
  // once per element before any output is written, so an output may alias the base.
  // stream: outputs are written with non-temporal stores where aligned, which skips reading
  // each output line into the cache before overwriting it (a third of the memory traffic of a
  // batch of fp32 outputs). Only for merges too large to stay in cache anyway.
  template <int32_t OD, int32_t BD>
  static void finish_typed(const MergeArgs& a, int64_t t, int64_t e, int64_t len, const float* acc,
                     int64_t ld, int64_t K, bool stream) {
    const int64_t T = a.num_tensors;
    const void* base = a.bases[t];
    if (stream) {
      const int64_t bytes = W * lcsc::dtype_nbytes(OD);
      for (int64_t k = 0; k < K && stream; ++k) {
        const auto p = reinterpret_cast<uintptr_t>(a.outs[k * T + t]) + e * (bytes / W);
        stream = p % bytes == 0;
      }
    }
    // Every output's block of NV vectors in turn, its stores one after the other: NV = L makes
    // a 64-byte line, so that non-temporal stores combine into whole-line writes. (A vector of
    // every output at a time interleaves K outputs' half-lines when they are 16-bit.)
    constexpr int64_t L = std::max<int64_t>(1, 64 / (W * (OD == kFloat32 ? 4 : 2)));
    int64_t j = 0;
    auto blocks = [&](auto num_vectors) LCSC_ALWAYS_INLINE {
      constexpr int64_t NV = decltype(num_vectors)::value;
      for (; j + NV * W <= len; j += NV * W) {
        Reg b[NV]{};
        if constexpr (BD != kNoBase) {
          for (int64_t v = 0; v < NV; ++v) b[v] = V::template load<BD>(base, e + j + v * W);
        }
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t v = 0; v < NV; ++v) {
            Reg r = V::load_acc(acc + k * ld + j + v * W);
            if constexpr (BD != kNoBase) r = V::add(r, b[v]);
            if (stream) {
              V::template store<OD, true>(a.outs[k * T + t], e + j + v * W, r);
            } else {
              V::template store<OD>(a.outs[k * T + t], e + j + v * W, r);
            }
          }
        }
      }
    };
    blocks(std::integral_constant<int64_t, L>{});
    if constexpr (L > 1) blocks(std::integral_constant<int64_t, 1>{});
    for (; j < len; ++j) {
      float b = 0.f;
      if constexpr (BD != kNoBase) b = lcsc::load_as_float(base, e + j, BD);
      for (int64_t k = 0; k < K; ++k) {
        float r = acc[k * ld + j];
        if constexpr (BD != kNoBase) r = r + b;
        lcsc::store_from_float(a.outs[k * T + t], e + j, OD, r);
      }
    }
  }

  template <int32_t OD>
  static void finish_out(const MergeArgs& a, int64_t t, int64_t e, int64_t len, const float* acc,
                         int64_t ld, int64_t K, bool stream) {
    if (a.bases[t] == nullptr) return finish_typed<OD, kNoBase>(a, t, e, len, acc, ld, K, stream);
    switch (a.base_dtypes[t]) {
      case kFloat16: return finish_typed<OD, kFloat16>(a, t, e, len, acc, ld, K, stream);
      case kBFloat16: return finish_typed<OD, kBFloat16>(a, t, e, len, acc, ld, K, stream);
      default: return finish_typed<OD, kFloat32>(a, t, e, len, acc, ld, K, stream);
    }
  }

  static void finish(const MergeArgs& a, int64_t t, int64_t e, int64_t len, const float* acc,
                     int64_t ld, int64_t K, bool stream) {
    switch (a.out_dtypes[t]) {
      case kFloat16: return finish_out<kFloat16>(a, t, e, len, acc, ld, K, stream);
      case kBFloat16: return finish_out<kBFloat16>(a, t, e, len, acc, ld, K, stream);
      default: return finish_out<kFloat32>(a, t, e, len, acc, ld, K, stream);
    }
  }

  // ---------------------------------------------------------------- probes

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

};

}  // namespace lcsc_cpu_tile
