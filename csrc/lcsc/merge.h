// The merge op's parameters, shared by the CPU and CUDA entry points.
//
// One call merges T tensors. For tensor t and output k:
//   outs[k*T + t][e] = round_to_out_dtype(bases[t][e] + sum_{i<N} coeffs[k*N + i] * srcs[t*N + i][e])
// for e < numels[t]. The sum is accumulated in float32 in source order 0..N-1, starting from
// zero, one fused multiply-add per source (elementwise.h's accumulate), and the base (when
// bases[t] is non-null) is added last, so results do not depend on the thread count or the
// code path (tests/test_numerics.py carries this sequence out exactly). An output may be the
// same buffer as its own base or sources (the caller checks that nothing overlaps otherwise):
// every element's inputs are read before it is written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lcsc {

struct MergeArgs {
  int64_t num_tensors = 0;   // T
  int64_t num_sources = 0;   // N
  int64_t num_outputs = 0;   // K
  const int64_t* numels = nullptr;       // [T]
  void* const* outs = nullptr;           // [K, T]
  const int32_t* out_dtypes = nullptr;   // [T]
  const void* const* bases = nullptr;    // [T], null = no base
  const int32_t* base_dtypes = nullptr;  // [T]
  const void* const* srcs = nullptr;     // [T, N]
  const int32_t* src_dtypes = nullptr;   // [T, N]
  const float* coeffs = nullptr;         // [K, N]
};

// Throws std::invalid_argument on malformed args (sizes, dtype codes, null pointers).
void validate(const MergeArgs& args);

// The first overlap in memory that would make the result depend on the order of the writes:
// two outputs sharing bytes, or an output sharing bytes with an input that is not exactly the
// same buffer (same start, size and dtype) of the same tensor. found == false when there is none.
struct Overlap {
  bool found = false;
  int64_t out_k = -1, out_t = -1;  // the output: outs[out_k * T + out_t]
  int64_t other_k = -1;            // another output k (with in_t == its tensor), or -1
  int64_t in_t = -1, in_i = -1;    // or the input: source in_i of tensor in_t, -1 = its base
};
Overlap find_overlap(const MergeArgs& args);

// CPU: OpenMP over tiles of all tensors with num_threads threads, vectorised with the best
// SIMD level this CPU supports (or the one forced by set_simd_level).
// guard_faults: sources may live in memory-mapped files that can shrink under us. A SIGBUS
// while reading one ends the merge with std::runtime_error instead of killing the process;
// the outputs are then partly written.
void merge_cpu(const MergeArgs& args, int num_threads, bool guard_faults = false);

// CUDA: enqueued on `stream` (a cudaStream_t) of `device`; returns without synchronising.
// Throws std::runtime_error when CUDA is not compiled in or a CUDA call fails.
void merge_cuda(const MergeArgs& args, int device, uintptr_t stream);

// CUDA, for a merge that runs many times with new coefficients (a MergePlan in a search): the
// tables that stay the same (sizes, pointers, dtypes, the tile layout), built once. The caller
// copies bytes() to device memory at a 16-byte aligned address and keeps it there; a run then
// moves only the coefficients. args.coeffs is not read.
class CudaMergeTables {
 public:
  explicit CudaMergeTables(const MergeArgs& args);
  const std::vector<char>& bytes() const { return bytes_; }
  // False when K > 8 and an output is also one of its inputs: merge_cuda handles that.
  bool reusable() const { return !aliased_; }
  // Enqueues the merge with coeffs [K, N] on `stream` of `device`, reading the tables at
  // device_tables (bytes() copied there).
  void run(const void* device_tables, const float* coeffs, int device, uintptr_t stream) const;

  // merge_cuda's pieces: each pass's coefficients laid out for the kernels, and the launches.
  std::vector<float> pass_coeffs(const float* coeffs, std::vector<size_t>* pass_offset) const;
  void launch(const char* device_tables, const float* device_coeffs,
              const std::vector<size_t>& pass_offset, int device, void* stream) const;

 private:
  int64_t T_ = 0, N_ = 0, K_ = 0, total_tiles_ = 0;
  int32_t source_dtype_ = 0;
  bool aliased_ = false;
  size_t offsets_[9] = {};
  std::vector<char> bytes_;
};

bool cuda_compiled();
int cuda_device_count();

// SIMD levels, best last. set_simd_level throws std::invalid_argument for a level this CPU or
// build lacks; "auto" picks the best available.
const char* simd_level();
void set_simd_level(const char* name);
const char* simd_levels_available();  // comma-separated

// dst[i][0, nbytes[i]) = src[i][0, nbytes[i]) for i < count, in parallel; a SIGBUS while reading
// (a mapped file that shrank) raises std::runtime_error. Gathers mapped file regions into
// pinned staging memory on their way to a GPU.
void copy_regions(void* const* dst, const void* const* src, const int64_t* nbytes, int64_t count,
                  int num_threads);

// Float fma lanes per second that num_threads threads sustain at the current SIMD level.
double fma_probe(int num_threads);

// Reads nbytes at p with num_threads threads and returns a checksum, so that benchmarks can
// measure the streaming read bandwidth the merge kernels compete against.
uint64_t read_probe(const void* p, int64_t nbytes, int num_threads);

// The memory traffic of a merge with no merge arithmetic: reads numel elements of elem_nbytes
// bytes from each of the num_sources sources and writes numel float32 words to each of the
// num_outputs outputs (non-temporal stores where the outputs are 64-byte aligned). Each thread
// takes a contiguous range and reads one 64-byte line of every source in turn, adds the lines
// up as floats and writes the sums. Benchmarks time it beside a merge of the same sizes, as a
// yardstick of how fast those bytes move in that pattern on this machine at that moment.
void traffic_probe(const void* const* srcs, int64_t num_sources, int64_t elem_nbytes,
                   void* const* outs, int64_t num_outputs, int64_t numel, int num_threads);

}  // namespace lcsc
