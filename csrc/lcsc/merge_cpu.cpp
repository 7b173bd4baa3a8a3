// CPU entry point: validates the args, picks the SIMD level once, and runs tiles in parallel.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(LCSC_X86_DISPATCH)
#include <cpuid.h>
#endif

#include "cpu_parallel.h"
#include "fault_guard.h"
#include "merge.h"
#include "merge_cpu_kernel.h"

namespace lcsc {
namespace {

enum SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kLevelNames[] = {"scalar", "avx2", "avx512"};

int detect_best_level() {
#if defined(LCSC_X86_DISPATCH)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return kScalar;
  const bool osxsave = ecx & (1u << 27), fma = ecx & (1u << 12), f16c = ecx & (1u << 29);
  if (!osxsave || !fma || !f16c) return kScalar;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return kScalar;  // the OS saves SSE and AVX state
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return kScalar;
  if (!(ebx & (1u << 5))) return kScalar;  // AVX2
  const bool avx512f = ebx & (1u << 16);
  if (avx512f && (xcr0_lo & 0xe6u) == 0xe6u) return kAvx512;  // and opmask/ZMM state
  return kAvx2;
#else
  return kScalar;
#endif
}

int best_level() {
  static const int best = detect_best_level();
  return best;
}

std::atomic<int> g_level{-1};  // -1: not chosen yet, use the best

int current_level() {
  const int level = g_level.load(std::memory_order_relaxed);
  return level < 0 ? best_level() : level;
}

// The kernels compiled for each SIMD level.
struct Kernels {
  cpu::TileFn tile;
  cpu::FmaProbeFn fma_probe;
  cpu::TrafficFn traffic;
};

Kernels kernels(int level) {
#if defined(LCSC_X86_DISPATCH)
  if (level == kAvx512) {
    return {cpu::avx512_tile(), cpu::avx512_fma_probe(), cpu::avx512_traffic()};
  }
  if (level == kAvx2) return {cpu::avx2_tile(), cpu::avx2_fma_probe(), cpu::avx2_traffic()};
#endif
  (void)level;
  return {cpu::scalar_tile(), cpu::scalar_fma_probe(), cpu::scalar_traffic()};
}

constexpr int64_t kStreamingStoreNbytes = int64_t{64} << 20;
constexpr int64_t kPrefetchSourceNbytes = int64_t{64} << 20;

// Tiles. A single merge: 16384 elements, accumulated in one row of 64 KiB (in L2), each group
// of sources streamed over the whole tile; on a 2-core Zen 4 that took 3-16% less time than
// 4096 (the row in L1, chosen on a 48 KiB-L1 Xeon) for fp32 and bf16 sources at N = 16-256,
// the same as 32768, and the same in cache. A batch: 2 KiB of each source, in groups of
// sources of 256 KiB together (in L2 with the next group being prefetched); measured on a
// 2-core Zen 4 against 1-16 KiB and 64 KiB-4 MiB: longer stretches lose to cache misses,
// shorter ones and smaller groups to the rate at which DRAM serves short runs.
constexpr int64_t kSingleTile = 16384;
constexpr int64_t kBatchStretchNbytes = 2048;
constexpr int64_t kBatchGroupNbytes = int64_t{256} << 10;
constexpr int64_t kBatchTileMultiple = 192;  // of every SIMD level's chunk widths (16-64 floats)

}  // namespace

void validate(const MergeArgs& a) {
  if (a.num_tensors < 0 || a.num_sources < 1 || a.num_outputs < 1) {
    throw std::invalid_argument("merge: need num_tensors >= 0, num_sources >= 1, num_outputs >= 1");
  }
  for (int64_t t = 0; t < a.num_tensors; ++t) {
    const std::string where = "merge: tensor " + std::to_string(t);
    if (a.numels[t] < 0) throw std::invalid_argument(where + " has a negative numel");
    if (!dtype_valid(a.out_dtypes[t])) throw std::invalid_argument(where + ": bad out dtype code");
    if (a.bases[t] != nullptr && !dtype_valid(a.base_dtypes[t])) {
      throw std::invalid_argument(where + ": bad base dtype code");
    }
    if (a.numels[t] == 0) continue;
    for (int64_t k = 0; k < a.num_outputs; ++k) {
      if (a.outs[k * a.num_tensors + t] == nullptr) {
        throw std::invalid_argument(where + ": null output " + std::to_string(k));
      }
    }
    for (int64_t i = 0; i < a.num_sources; ++i) {
      if (a.srcs[t * a.num_sources + i] == nullptr) {
        throw std::invalid_argument(where + ": null source " + std::to_string(i));
      }
      if (!dtype_valid(a.src_dtypes[t * a.num_sources + i])) {
        throw std::invalid_argument(where + ": bad dtype code for source " + std::to_string(i));
      }
    }
  }
}

Overlap find_overlap(const MergeArgs& a) {
  struct Interval {
    uintptr_t begin, end;
    int64_t k, t;  // output k of tensor t
    int32_t dtype;
  };
  const int64_t T = a.num_tensors, N = a.num_sources, K = a.num_outputs;
  std::vector<Interval> writes;
  writes.reserve(K * T);
  for (int64_t t = 0; t < T; ++t) {
    if (a.numels[t] == 0) continue;
    const uintptr_t nbytes = a.numels[t] * dtype_nbytes(a.out_dtypes[t]);
    for (int64_t k = 0; k < K; ++k) {
      const auto begin = reinterpret_cast<uintptr_t>(a.outs[k * T + t]);
      writes.push_back({begin, begin + nbytes, k, t, a.out_dtypes[t]});
    }
  }
  std::sort(writes.begin(), writes.end(),
            [](const Interval& x, const Interval& y) { return x.begin < y.begin; });
  Overlap found;
  // Sorted by start, two writes overlap only if some write overlaps its successor... unless a
  // long one covers several: track the one reaching furthest.
  for (size_t w = 1, far = 0; w < writes.size(); ++w) {
    if (writes[w].begin < writes[far].end) {
      found.found = true;
      found.out_k = writes[w].k, found.out_t = writes[w].t;
      found.other_k = writes[far].k, found.in_t = writes[far].t;
      return found;
    }
    if (writes[w].end > writes[far].end) far = w;
  }
  // Writes are now disjoint, so an input can overlap several only if it spans them: check the
  // last write starting at or before the input's start, and the first starting after it.
  auto check = [&](const void* p, int32_t dtype, int64_t t, int64_t i) {
    const auto begin = reinterpret_cast<uintptr_t>(p);
    const uintptr_t end = begin + a.numels[t] * dtype_nbytes(dtype);
    auto next = std::upper_bound(writes.begin(), writes.end(), begin,
                                 [](uintptr_t b, const Interval& w) { return b < w.begin; });
    for (auto w : {next == writes.begin() ? writes.end() : next - 1, next}) {
      if (w == writes.end() || !(begin < w->end && w->begin < end)) continue;
      const bool exact = w->t == t && w->begin == begin && w->end == end && w->dtype == dtype;
      if (exact) continue;
      found.found = true;
      found.out_k = w->k, found.out_t = w->t, found.in_t = t, found.in_i = i;
      return true;
    }
    return false;
  };
  for (int64_t t = 0; t < T && !writes.empty(); ++t) {
    if (a.numels[t] == 0) continue;
    if (a.bases[t] != nullptr && check(a.bases[t], a.base_dtypes[t], t, -1)) return found;
    for (int64_t i = 0; i < N; ++i) {
      if (check(a.srcs[t * N + i], a.src_dtypes[t * N + i], t, i)) return found;
    }
  }
  return found;
}

void merge_cpu(const MergeArgs& a, int num_threads, bool guard_faults) {
  validate(a);
  const int64_t T = a.num_tensors, N = a.num_sources, K = a.num_outputs;
  int widest = 2;  // bytes per source element
  for (int64_t i = 0; i < T * N; ++i) widest = std::max(widest, dtype_nbytes(a.src_dtypes[i]));
  int64_t tile = kSingleTile, group = 8;
  if (K > 1) {
    tile = std::max(kBatchTileMultiple,
                    kBatchStretchNbytes / widest / kBatchTileMultiple * kBatchTileMultiple);
    group = std::clamp<int64_t>(kBatchGroupNbytes / (tile * widest), 1, N);
  }
  std::vector<int64_t> first_tile(T + 1, 0);  // prefix sums of tiles per tensor
  for (int64_t t = 0; t < T; ++t) first_tile[t + 1] = first_tile[t] + (a.numels[t] + tile - 1) / tile;
  const int64_t total = first_tile[T];
  if (total == 0) return;

  std::vector<float> coeffs_by_source(N * K);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < N; ++i) coeffs_by_source[i * K + k] = a.coeffs[k * N + i];
  }
  // Streaming stores pay off only when the outputs could not stay in cache anyway.
  int64_t out_nbytes = 0;
  for (int64_t t = 0; t < T; ++t) out_nbytes += a.numels[t] * dtype_nbytes(a.out_dtypes[t]);
  const bool stream = out_nbytes * K >= kStreamingStoreNbytes;
  int64_t source_nbytes = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < N; ++i) {
      source_nbytes += a.numels[t] * dtype_nbytes(a.src_dtypes[t * N + i]);
    }
  }
  // Software prefetches only where the sources come from memory: in cache they cost a single
  // merge 4-13% (2-8 MiB of sources, 2-core Zen 4).
  const bool ahead = source_nbytes >= kPrefetchSourceNbytes;
  const cpu::Job job{&a, coeffs_by_source.data(), tile, group, stream, ahead};

  // A thread per 4 MiB of sources at most: below that, waking a second thread costs more than
  // it saves, and on a busy machine the barrier waits for whichever thread was descheduled.
  const int64_t useful = std::max<int64_t>(1, source_nbytes * K >> 22);
  const int threads = static_cast<int>(std::clamp<int64_t>(num_threads, 1, std::min(total, useful)));
  const cpu::TileFn run_tile = kernels(current_level()).tile;
  const int64_t scratch_floats = cpu::scratch_floats(K, tile);
  std::unique_ptr<float[]> scratch(new float[scratch_floats * threads]);
  auto span = [&](int64_t g) {
    const int64_t t = std::upper_bound(first_tile.begin(), first_tile.end(), g) -
                      first_tile.begin() - 1;
    const int64_t begin = (g - first_tile[t]) * tile;
    return cpu::Span{t, begin, std::min(tile, a.numels[t] - begin)};
  };
  // Static schedule: each worker runs one contiguous range of tiles, so tile g + 1 is usually
  // the one it runs next (a batch prefetches it).
  const bool ok = run_tiles(total, threads, Schedule::kStatic, guard_faults, stream,
                            [&](int64_t g, int worker) {
    run_tile(job, span(g), g + 1 < total ? span(g + 1) : cpu::Span{},
             scratch.get() + scratch_floats * worker);
  });
  if (!ok) {
    throw std::runtime_error(
        "a memory-mapped source could not be read (SIGBUS): a checkpoint file was truncated "
        "or changed while merging; the outputs are partly written");
  }
}

void copy_regions(void* const* dst, const void* const* src, const int64_t* nbytes, int64_t count,
                  int num_threads) {
  install_sigbus_guard();
  std::atomic<bool> faulted{false};
#if defined(_OPENMP)
#pragma omp parallel for num_threads(std::max(num_threads, 1)) schedule(dynamic, 16)
#endif
  for (int64_t i = 0; i < count; ++i) {
    const auto copy = [&] { std::memcpy(dst[i], src[i], static_cast<size_t>(nbytes[i])); };
    if (faulted.load(std::memory_order_relaxed) || !guarded(copy)) faulted.store(true);
  }
  if (faulted.load()) {
    throw std::runtime_error(
        "a memory-mapped source could not be read (SIGBUS): a checkpoint file was truncated "
        "or changed while copying it");
  }
}

const char* simd_level() { return kLevelNames[current_level()]; }

const char* simd_levels_available() {
  static const std::string names = [] {
    std::string s;
    for (int level = 0; level <= best_level(); ++level) s += (level ? "," : "") + std::string(kLevelNames[level]);
    return s;
  }();
  return names.c_str();
}

void set_simd_level(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    g_level.store(-1);
    return;
  }
  for (int level = 0; level < 3; ++level) {
    if (std::strcmp(name, kLevelNames[level]) != 0) continue;
    if (level > best_level()) {
      throw std::invalid_argument(std::string("SIMD level '") + name +
                                  "' is not supported by this CPU or build; available: " +
                                  simd_levels_available());
    }
    g_level.store(level);
    return;
  }
  throw std::invalid_argument(std::string("unknown SIMD level '") + name +
                              "'; use auto, scalar, avx2 or avx512");
}

double fma_probe(int num_threads) {
  const cpu::FmaProbeFn probe = kernels(current_level()).fma_probe;
  const int threads = std::max(num_threads, 1);
  constexpr int64_t kIterations = 20'000'000;
  int64_t lanes = 0;
  float sink = 0.f;
  const auto start = std::chrono::steady_clock::now();
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(+ : lanes, sink)
#endif
  lanes += probe(kIterations, &sink);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return sink == 12345.f ? 0.0 : double(lanes) / seconds;  // sink keeps the work alive
}

uint64_t read_probe(const void* p, int64_t nbytes, int num_threads) {
  const auto* words = static_cast<const uint64_t*>(p);
  const int64_t n = nbytes / 8;
  uint64_t sum = 0;
#if defined(_OPENMP)
#pragma omp parallel for reduction(+ : sum) num_threads(std::max(num_threads, 1)) schedule(static)
#endif
  for (int64_t i = 0; i < n; ++i) sum += words[i];
  return sum;
}

void traffic_probe(const void* const* srcs, int64_t num_sources, int64_t elem_nbytes,
                   void* const* outs, int64_t num_outputs, int64_t numel, int num_threads) {
  if (elem_nbytes != 2 && elem_nbytes != 4) {
    throw std::invalid_argument("traffic_probe: elem_nbytes must be 2 or 4");
  }
  const cpu::TrafficFn run = kernels(current_level()).traffic;
  const int64_t per_block = 64 / elem_nbytes, blocks = numel / per_block;
  bool stream = true;  // 64-byte-aligned outputs suit every level's streaming stores
  for (int64_t k = 0; k < num_outputs; ++k) {
    stream = stream && reinterpret_cast<uintptr_t>(outs[k]) % 64 == 0;
  }
  const int threads = std::max(num_threads, 1);
  run_tiles(threads, threads, Schedule::kStatic, false, stream, [&](int64_t g, int) {
    run(srcs, num_sources, elem_nbytes, outs, num_outputs, blocks * g / threads,
        blocks * (g + 1) / threads, stream);
  });
  for (int64_t e = blocks * per_block; e < numel; ++e) {  // the last partial block
    float sum = 0.f;
    for (int64_t i = 0; i < num_sources; ++i) {
      sum += load_as_float(srcs[i], e, elem_nbytes == 4 ? kFloat32 : kBFloat16);
    }
    for (int64_t k = 0; k < num_outputs; ++k) static_cast<float*>(outs[k])[e] = sum;
  }
}

}  // namespace lcsc
