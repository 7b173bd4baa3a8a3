// The CPU low-rank merge, written once over a vector-ops type V (Scalar, Avx2, Avx512) and
// compiled in the translation unit of each SIMD level (cpu_<level>.cpp), like merge_cpu_kernel.h.
//
// A GEMM out[m, n] = Bw[m, R] @ A[R, n] over the concatenated rank R = N * r, where
// Bw[j][i*r + p] = fl32(w_i * B_i[j][p]) is formed while packing (never stored whole), blocked
// the way BLIS blocks its loops, for one output tile (rows x cols) at a time:
//
//   for each panel of KC = kLoraPanelRanks ranks:
//     pack A's panel: [column strip][k][NR] floats (KC x cols, in L2)
//     for each MR-row strip of the tile:
//       pack the strip of Bw: [row][k] floats (MR x KC, in L1 for the whole sweep)
//       for each NR-column strip: the MR x NR micro-kernel, accumulators in registers,
//         streaming its A strip from L2
//
// The micro-kernel broadcasts MR weighted B values per rank and loads NR values of A: MR * NR / W
// independent fma chains, with no loads but those. Between panels the tile's accumulators live
// in a float32 tile buffer; after the last panel each micro-tile gets the base added and is
// rounded to out's dtype.
//
// Numerics, identical for every tiling, thread count and SIMD level (so results are bitwise
// reproducible): each output element's panel partial starts at zero and takes one fma per rank
// in increasing k; the partials of consecutive panels are summed in panel order; the base is
// added last. Partials keep float32 rounding error near that of a per-checkpoint loop of addmm
// (sum over the panel, then over panels) rather than growing with the whole rank N * r.
#pragma once

#include <algorithm>
#include <cstdint>

#include "elementwise.h"
#include "lora.h"

namespace lcsc::cpu {

// A SIMD level's low-rank kernel: its blocking, and one output tile.
struct LoraKernel {
  int mr = 1, nr = 1;  // micro-tile
  int64_t kc = 1;      // ranks per packed panel
  // rows x cols of out from (row0, col0); scratch: scratch_floats(rows, cols, R) floats,
  // 64-byte aligned; stream: write out with non-temporal stores where aligned.
  void (*tile)(const LoraArgs&, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
               float* scratch, bool stream) = nullptr;
  int64_t (*scratch_floats)(int64_t rows, int64_t cols, int64_t total_rank) = nullptr;
};
LoraKernel scalar_lora();
LoraKernel avx2_lora();    // x86-64 builds only
LoraKernel avx512_lora();  // x86-64 builds only

}  // namespace lcsc::cpu

namespace lcsc_cpu_lora {

using lcsc::kBFloat16;
using lcsc::kFloat16;
using lcsc::kFloat32;
using lcsc::LoraArgs;

constexpr int32_t kNoBase = -1;

template <class V, int MR, int NV>
struct LoraTile {
  static constexpr int64_t KC = lcsc::kLoraPanelRanks;  // part of the numerics: see lora.h
  using Reg = typename V::Reg;
  static constexpr int W = static_cast<int>(V::kWidth);
  static constexpr int NR = NV * W;
  static constexpr int64_t KB = KC + W;  // row pitch of a packed B strip: a vector of slack

  static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

  // Scratch: the packed A panel (KC x cols), one packed B strip (MR x KC), then the tile's
  // accumulators (one micro-tile when a single panel covers the rank: nothing lives across
  // panels then).
  static int64_t scratch_floats(int64_t rows, int64_t cols, int64_t total_rank) {
    const int64_t acc = total_rank > KC ? round_up(rows, MR) * round_up(cols, NR) : MR * NR;
    return KC * round_up(cols, NR) + MR * KB + acc;
  }

  // pb[jj][kk] = fl32(w_i * B_i[row + jj][p]) for k = k0 + kk = i*r + p, jj < MR (rows past
  // nrows are zero), rows KB floats apart. Row-major, so each run of one checkpoint's row is a
  // contiguous copy, done in whole vectors: the lanes past a run land where the next run (or
  // the row's padding) is written later, and a vector may read on into B_i's next row, but
  // never past B_i's end. One checkpoint at a time, so its rows are read front to back.
  template <int32_t D>
  static void pack_b(const LoraArgs& a, int64_t row, int nrows, int64_t k0, int64_t kcl,
                     float* pb) {
    const int64_t r = a.rank, b_numel = a.m * r;
    int64_t i = k0 / r, p0 = k0 % r;
    for (int64_t kk = 0; kk < kcl; ++i, p0 = 0) {
      const int64_t len = std::min(r - p0, kcl - kk);
      const float wi = a.weights[i];
      const Reg w = V::broadcast(wi);
      const void* b = a.bs[i];
      const int64_t first = row * r + p0;
      float* dst = pb + kk;
      if (first + (nrows - 1) * r + round_up(len, W) <= b_numel) {  // every vector in bounds
        for (int jj = 0; jj < nrows; ++jj) {
          for (int64_t p = 0; p < len; p += W) {
            V::store_acc(dst + jj * KB + p, V::mul(w, V::template load<D>(b, first + jj * r + p)));
          }
        }
      } else {
        for (int jj = 0; jj < nrows; ++jj) {
          const int64_t at = first + jj * r;
          int64_t p = 0;
          for (; p < len && at + p + W <= b_numel; p += W) {
            V::store_acc(dst + jj * KB + p, V::mul(w, V::template load<D>(b, at + p)));
          }
          for (; p < len; ++p) dst[jj * KB + p] = wi * lcsc::load_as_float(b, at + p, D);
        }
      }
      kk += len;
    }
    for (int jj = nrows; jj < MR; ++jj) std::fill_n(pb + jj * KB, kcl, 0.f);
  }

  // pa[s][kk][c] = A_i[p][col0 + s*NR + c] as float for k = k0 + kk = i*r + p, c < NR (zero
  // past cols). Row by row: each rank's run of A_i is read front to back, one stream the
  // hardware prefetcher follows, and the next run is prefetched while this one is copied.
  template <int32_t D>
  static void pack_a(const LoraArgs& a, int64_t k0, int64_t kcl, int64_t col0, int64_t cols,
                     float* pa) {
    constexpr int64_t nbytes = D == kFloat32 ? 4 : 2;
    const int64_t r = a.rank, n = a.n, full = cols / NR;
    int64_t i = k0 / r, p = k0 % r;
    for (int64_t kk = 0; kk < kcl; ++kk) {
      const void* src = a.as[i];
      const int64_t at = p * n + col0;
      if (++p == r) p = 0, ++i;  // (i, p) of the next rank
      if (kk + 1 < kcl) {
        const char* next = static_cast<const char*>(a.as[i]) + (p * n + col0) * nbytes;
        for (int64_t c = 0; c < cols; c += 64 / nbytes) __builtin_prefetch(next + c * nbytes);
      }
      float* dst = pa + kk * NR;
      int64_t s = 0;
      for (; s < full; ++s, dst += KC * NR) {
        for (int v = 0; v < NV; ++v) {
          V::store_acc(dst + v * W, V::template load<D>(src, at + s * NR + v * W));
        }
      }
      if (s * NR < cols) {
        int64_t c = 0;
        for (; s * NR + c < cols; ++c) dst[c] = lcsc::load_as_float(src, at + s * NR + c, D);
        for (; c < NR; ++c) dst[c] = 0.f;
      }
    }
  }

  // The panel partial sum_k pb[jj][k] * pa[k][q] over kcl ranks (from zero, one fma per rank
  // in order), stored to c[jj][q], or added to what c holds from earlier panels.
  template <bool kFirst>
  static void micro(const float* __restrict pb, const float* __restrict pa, int64_t kcl,
                    float* __restrict c) {
    Reg acc[MR][NV];  // LCSC_UNROLL (elementwise.h) keeps it in registers
    LCSC_UNROLL for (int jj = 0; jj < MR; ++jj) {
      LCSC_UNROLL for (int v = 0; v < NV; ++v) acc[jj][v] = V::zero();
    }
    for (int64_t k = 0; k < kcl; ++k) {
      Reg x[NV];
      LCSC_UNROLL for (int v = 0; v < NV; ++v) x[v] = V::load_acc(pa + k * NR + v * W);
      LCSC_UNROLL for (int jj = 0; jj < MR; ++jj) {
        const Reg b = V::broadcast(pb[jj * KB + k]);
        LCSC_UNROLL for (int v = 0; v < NV; ++v) acc[jj][v] = V::fma(b, x[v], acc[jj][v]);
      }
    }
    LCSC_UNROLL for (int jj = 0; jj < MR; ++jj) {
      LCSC_UNROLL for (int v = 0; v < NV; ++v) {
        float* at = c + jj * NR + v * W;
        V::store_acc(at, kFirst ? acc[jj][v] : V::add(V::load_acc(at), acc[jj][v]));
      }
    }
  }

  // out[row + jj][col + q] = round(c[jj][q] + base[...]) for jj < nrows, q < ncols. The base
  // element is read just before its output element is written, so out may alias the base.
  // stream: non-temporal stores where a row's run is vector-aligned, which skips reading the
  // output's lines into the cache before overwriting them; for outputs too large to stay there.
  template <int32_t OD, int32_t BD>
  static void finish(const LoraArgs& a, int64_t row, int nrows, int64_t col, int64_t ncols,
                     const float* c, bool stream) {
    constexpr int64_t out_nbytes = OD == kFloat32 ? 4 : 2;
    for (int jj = 0; jj < nrows; ++jj) {
      const int64_t at = (row + jj) * a.n + col;
      const float* src = c + jj * NR;
      const bool nt =
          stream && (reinterpret_cast<uintptr_t>(a.out) + at * out_nbytes) % (W * out_nbytes) == 0;
      int64_t q = 0;
      for (; q + W <= ncols; q += W) {
        Reg v = V::load_acc(src + q);
        if constexpr (BD != kNoBase) v = V::add(v, V::template load<BD>(a.base, at + q));
        if (nt) {
          V::template store<OD, true>(a.out, at + q, v);
        } else {
          V::template store<OD>(a.out, at + q, v);
        }
      }
      for (; q < ncols; ++q) {
        float v = src[q];
        if constexpr (BD != kNoBase) v = v + lcsc::load_as_float(a.base, at + q, BD);
        lcsc::store_from_float(a.out, at + q, OD, v);
      }
    }
  }

  using FinishFn = void (*)(const LoraArgs&, int64_t, int, int64_t, int64_t, const float*, bool);

  template <int32_t OD>
  static FinishFn finisher_for_base(int32_t base_dtype, bool has_base) {
    if (!has_base) return &finish<OD, kNoBase>;
    switch (base_dtype) {
      case kFloat16: return &finish<OD, kFloat16>;
      case kBFloat16: return &finish<OD, kBFloat16>;
      default: return &finish<OD, kFloat32>;
    }
  }

  static FinishFn finisher(const LoraArgs& a) {
    const bool has_base = a.base != nullptr;
    switch (a.out_dtype) {
      case kFloat16: return finisher_for_base<kFloat16>(a.base_dtype, has_base);
      case kBFloat16: return finisher_for_base<kBFloat16>(a.base_dtype, has_base);
      default: return finisher_for_base<kFloat32>(a.base_dtype, has_base);
    }
  }

  template <int32_t D>
  static void run(const LoraArgs& a, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                  float* scratch, bool stream) {
    const int64_t total_rank = a.num_checkpoints * a.rank;
    const int64_t strips_m = (rows + MR - 1) / MR, strips_n = (cols + NR - 1) / NR;
    float* pa = scratch;
    float* pb = pa + KC * strips_n * NR;
    float* acc = pb + MR * KB;
    const bool panels = total_rank > KC;  // accumulators live across panels in the tile buffer
    const FinishFn finish_block = finisher(a);
    for (int64_t k0 = 0; k0 < total_rank; k0 += KC) {
      const int64_t kcl = std::min(KC, total_rank - k0);
      const bool first = k0 == 0, last = k0 + kcl == total_rank;
      pack_a<D>(a, k0, kcl, col0, cols, pa);
      for (int64_t t = 0; t < strips_m; ++t) {
        const int nrows = static_cast<int>(std::min<int64_t>(MR, rows - t * MR));
        pack_b<D>(a, row0 + t * MR, nrows, k0, kcl, pb);
        for (int64_t s = 0; s < strips_n; ++s) {
          float* c = panels ? acc + (t * strips_n + s) * MR * NR : acc;
          if (panels && !first) {  // the next micro-tile's accumulators, from L2 or L3
            for (int64_t q = 0; q < MR * NR; q += 64 / sizeof(float)) {
              __builtin_prefetch(c + MR * NR + q);
            }
          }
          if (first) {
            micro<true>(pb, pa + s * KC * NR, kcl, c);
          } else {
            micro<false>(pb, pa + s * KC * NR, kcl, c);
          }
          if (last) {
            const int64_t col = col0 + s * NR;
            finish_block(a, row0 + t * MR, nrows, col, std::min<int64_t>(NR, col0 + cols - col), c,
                         stream);
          }
        }
      }
    }
  }

  static void tile(const LoraArgs& a, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                   float* scratch, bool stream) {
    switch (a.factor_dtype) {
      case kFloat16: return run<kFloat16>(a, row0, rows, col0, cols, scratch, stream);
      case kBFloat16: return run<kBFloat16>(a, row0, rows, col0, cols, scratch, stream);
      default: return run<kFloat32>(a, row0, rows, col0, cols, scratch, stream);
    }
  }

  static lcsc::cpu::LoraKernel kernel() {
    lcsc::cpu::LoraKernel k;
    k.mr = MR;
    k.nr = NR;
    k.kc = KC;
    k.tile = &tile;
    k.scratch_floats = &scratch_floats;
    return k;
  }
};

}  // namespace lcsc_cpu_lora
