// CPU entry point of the low-rank merge: validates the args, picks the SIMD level's kernel,
// splits out into tiles and runs them in parallel.
#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "cpu_parallel.h"
#include "elementwise.h"
#include "lora.h"
#include "lora_cpu_kernel.h"
#include "merge.h"

namespace lcsc {
namespace {

// The level merges use (set_simd_level forces both ops alike).
cpu::LoraKernel current_kernel() {
#if defined(LCSC_X86_DISPATCH)
  const char* level = simd_level();
  if (std::strcmp(level, "avx512") == 0) return cpu::avx512_lora();
  if (std::strcmp(level, "avx2") == 0) return cpu::avx2_lora();
#endif
  return cpu::scalar_lora();
}

bool overlaps(const void* a, int64_t a_nbytes, const void* b, int64_t b_nbytes) {
  const auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a_nbytes > 0 && b_nbytes > 0 && a0 < b0 + uintptr_t(b_nbytes) &&
         b0 < a0 + uintptr_t(a_nbytes);
}

// Tile limits. Over several panels of ranks a tile's float32 accumulators live in a buffer
// between panels (768 x 768 of them, 2.25 MiB, in L2 and L3, prefetched a micro-tile ahead);
// every row block re-packs the A panel and every column block re-packs B from memory, so
// large tiles cut that traffic. With a single panel (R <= KC) nothing outlives a micro-tile
// and a tile spans every row: each packed A panel then serves all rows.
constexpr int64_t kMaxTileRows = 768;
constexpr int64_t kMaxTileCols = 768;
// Tiles are handed out dynamically, two per thread at least: a thread that another process
// preempts then holds up one tile, not half the layer. (Which thread runs a tile does not
// change its bits.)
constexpr int64_t kTilesPerThread = 2;
// Below this many fmas per thread, waking another thread costs more than it saves.
constexpr int64_t kFmasPerThread = int64_t{1} << 21;
// Outputs this large are written with non-temporal stores (they would not stay in cache).
constexpr int64_t kStreamingStoreNbytes = int64_t{64} << 20;  // as merges use

struct Tiling {
  int64_t row_blocks, col_blocks, strips_m, strips_n;
};

// Row and column blocks of whole micro-tile strips, as few as the limits allow, then more
// until there are kTilesPerThread tiles per thread and their count divides evenly among the
// threads. Splitting rows re-packs A once more per block and splitting columns re-packs B;
// with several panels rows go first (down to 4 strips a block), with one panel columns do
// (rows there are one block by design).
Tiling plan_tiles(int64_t m, int64_t n, const cpu::LoraKernel& k, int threads,
                  bool single_panel) {
  Tiling t;
  t.strips_m = (m + k.mr - 1) / k.mr;
  t.strips_n = (n + k.nr - 1) / k.nr;
  const int64_t max_m = single_panel ? t.strips_m : std::max<int64_t>(1, kMaxTileRows / k.mr);
  const int64_t max_n = std::max<int64_t>(1, kMaxTileCols / k.nr);
  t.row_blocks = (t.strips_m + max_m - 1) / max_m;
  t.col_blocks = (t.strips_n + max_n - 1) / max_n;
  const int64_t want = threads > 1 ? kTilesPerThread * threads : 1;
  while ((t.row_blocks * t.col_blocks) % threads != 0 || t.row_blocks * t.col_blocks < want) {
    const bool rows_left = t.row_blocks < t.strips_m, cols_left = t.col_blocks < t.strips_n;
    const bool rows_first = !single_panel && t.strips_m / t.row_blocks >= 4;
    if (rows_left && (rows_first || !cols_left)) {
      ++t.row_blocks;
    } else if (cols_left) {
      ++t.col_blocks;
    } else {
      break;
    }
  }
  return t;
}

// [lo, hi) strips of block b of `blocks` over `strips`: sizes differ by at most one strip.
inline int64_t block_start(int64_t b, int64_t blocks, int64_t strips) {
  return b * strips / blocks;
}

struct AlignedFree {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
};

}  // namespace

void validate(const LoraArgs& a) {
  if (a.m < 0 || a.n < 0) throw std::invalid_argument("lora: negative m or n");
  if (a.rank < 1 || a.num_checkpoints < 1) {
    throw std::invalid_argument("lora: need rank >= 1 and num_checkpoints >= 1");
  }
  if (!dtype_valid(a.out_dtype)) throw std::invalid_argument("lora: bad out dtype code");
  if (!dtype_valid(a.factor_dtype)) throw std::invalid_argument("lora: bad factor dtype code");
  if (a.base != nullptr && !dtype_valid(a.base_dtype)) {
    throw std::invalid_argument("lora: bad base dtype code");
  }
  if (a.as == nullptr || a.bs == nullptr || a.weights == nullptr) {
    throw std::invalid_argument("lora: null factor or weight table");
  }
  if (a.m == 0 || a.n == 0) return;
  const int64_t out_nbytes = a.m * a.n * dtype_nbytes(a.out_dtype);
  const int64_t a_nbytes = a.rank * a.n * dtype_nbytes(a.factor_dtype);
  const int64_t b_nbytes = a.m * a.rank * dtype_nbytes(a.factor_dtype);
  if (a.out == nullptr) throw std::invalid_argument("lora: null out");
  for (int64_t i = 0; i < a.num_checkpoints; ++i) {
    const std::string which = std::to_string(i);
    if (a.as[i] == nullptr) throw std::invalid_argument("lora: null A factor " + which);
    if (a.bs[i] == nullptr) throw std::invalid_argument("lora: null B factor " + which);
    if (overlaps(a.out, out_nbytes, a.as[i], a_nbytes)) {
      throw std::invalid_argument("lora: out overlaps A factor " + which);
    }
    if (overlaps(a.out, out_nbytes, a.bs[i], b_nbytes)) {
      throw std::invalid_argument("lora: out overlaps B factor " + which);
    }
  }
  if (a.base != nullptr) {
    const bool same = a.base == a.out && a.base_dtype == a.out_dtype;
    if (!same && overlaps(a.out, out_nbytes, a.base, a.m * a.n * dtype_nbytes(a.base_dtype))) {
      throw std::invalid_argument("lora: out partly overlaps the base");
    }
  }
}

namespace {

// What one call runs: the SIMD level's kernel, the tiles, the threads, scratch per thread.
struct CpuPlan {
  cpu::LoraKernel kernel;
  Tiling tiling;
  int64_t tiles = 0, scratch_floats = 0;
  int threads = 1;
};

CpuPlan plan_cpu(int64_t m, int64_t n, int64_t total_rank, int num_threads) {
  CpuPlan p;
  p.kernel = current_kernel();
  const int64_t fmas = m * n * total_rank;
  p.threads = static_cast<int>(
      std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(1, fmas / kFmasPerThread)));
  p.tiling = plan_tiles(m, n, p.kernel, p.threads, total_rank <= p.kernel.kc);
  p.tiles = p.tiling.row_blocks * p.tiling.col_blocks;
  p.threads = static_cast<int>(std::min<int64_t>(p.threads, p.tiles));
  // Sized for the largest tile.
  const Tiling& t = p.tiling;
  const int64_t max_rows = (t.strips_m + t.row_blocks - 1) / t.row_blocks * p.kernel.mr;
  const int64_t max_cols = (t.strips_n + t.col_blocks - 1) / t.col_blocks * p.kernel.nr;
  p.scratch_floats = (p.kernel.scratch_floats(max_rows, max_cols, total_rank) + 15) / 16 * 16;
  return p;
}

}  // namespace

int64_t lora_cpu_scratch_nbytes(int64_t m, int64_t n, int64_t total_rank, int num_threads) {
  if (m <= 0 || n <= 0 || total_rank <= 0) return 0;
  const CpuPlan p = plan_cpu(m, n, total_rank, num_threads);
  return int64_t(sizeof(float)) * p.scratch_floats * p.threads;
}

void lora_cpu(const LoraArgs& a, int num_threads, bool guard_faults) {
  validate(a);
  if (a.m == 0 || a.n == 0) return;
  const CpuPlan plan = plan_cpu(a.m, a.n, a.num_checkpoints * a.rank, num_threads);
  const cpu::LoraKernel& kernel = plan.kernel;
  const Tiling& tiling = plan.tiling;
  const int64_t tiles = plan.tiles, scratch_floats = plan.scratch_floats;
  const int threads = plan.threads;
  std::unique_ptr<float[], AlignedFree> scratch(static_cast<float*>(
      ::operator new[](sizeof(float) * scratch_floats * threads, std::align_val_t(64))));

  const bool stream = a.m * a.n * dtype_nbytes(a.out_dtype) >= kStreamingStoreNbytes;
  // Tiles are handed out dynamically (see kTilesPerThread).
  const bool ok = run_tiles(tiles, threads, Schedule::kDynamic, guard_faults, stream,
                            [&](int64_t g, int worker) {
    const int64_t rb = g / tiling.col_blocks, cb = g % tiling.col_blocks;
    const int64_t s0 = block_start(rb, tiling.row_blocks, tiling.strips_m);
    const int64_t s1 = block_start(rb + 1, tiling.row_blocks, tiling.strips_m);
    const int64_t c0 = block_start(cb, tiling.col_blocks, tiling.strips_n);
    const int64_t c1 = block_start(cb + 1, tiling.col_blocks, tiling.strips_n);
    const int64_t row0 = s0 * kernel.mr, col0 = c0 * kernel.nr;
    const int64_t rows = std::min(s1 * kernel.mr, a.m) - row0;
    const int64_t cols = std::min(c1 * kernel.nr, a.n) - col0;
    kernel.tile(a, row0, rows, col0, cols, scratch.get() + scratch_floats * worker, stream);
  });
  if (!ok) {
    throw std::runtime_error(
        "a memory-mapped LoRA factor could not be read (SIGBUS): an adapter file was truncated "
        "or changed while merging; out is partly written");
  }
}

}  // namespace lcsc
