// lcsc_fast._C: converts Python buffers and ints to the kernels' plain parameters.
//
// Tables arrive as 1-D buffers (Python's array module on the engine side): int64 numels,
// uint64 pointers, int32 dtype codes, float32 coefficients. Everything about tensors (shapes,
// devices, dtypes, overlap) was checked by lcsc_fast/engine.py before it built them; this
// layer checks only that the tables are consistent with each other.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lcsc/lora.h"
#include "lcsc/merge.h"

namespace py = pybind11;

static_assert(sizeof(void*) == sizeof(uint64_t), "lcsc_fast needs a 64-bit platform");

namespace {

#ifndef LCSC_CUDA_ARCHS
#define LCSC_CUDA_ARCHS ""
#endif

// A 1-D buffer of `count` items of type T, whose format character is one of `formats`.
template <class T>
const T* table(const py::buffer_info& info, int64_t count, const char* name) {
  if (info.ndim != 1 || info.itemsize != static_cast<py::ssize_t>(sizeof(T))) {
    throw std::invalid_argument(std::string(name) + ": expected a 1-D buffer of " +
                                std::to_string(sizeof(T)) + "-byte items");
  }
  if (info.size != count) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(count) +
                                " items, got " + std::to_string(info.size));
  }
  if (info.strides[0] != static_cast<py::ssize_t>(sizeof(T))) {
    throw std::invalid_argument(std::string(name) + ": buffer must be contiguous");
  }
  return static_cast<const T*>(info.ptr);
}

struct Tables {
  py::buffer_info numels, outs, out_dtypes, bases, base_dtypes, srcs, src_dtypes, coeffs;
  lcsc::MergeArgs args;

  Tables(const py::buffer& numels_, const py::buffer& outs_, const py::buffer& out_dtypes_,
         const py::buffer& bases_, const py::buffer& base_dtypes_, const py::buffer& srcs_,
         const py::buffer& src_dtypes_, const py::buffer& coeffs_, int64_t num_sources,
         int64_t num_outputs)
      : numels(numels_.request()), outs(outs_.request()), out_dtypes(out_dtypes_.request()),
        bases(bases_.request()), base_dtypes(base_dtypes_.request()), srcs(srcs_.request()),
        src_dtypes(src_dtypes_.request()), coeffs(coeffs_.request()) {
    if (num_sources < 1 || num_outputs < 1) {
      throw std::invalid_argument("num_sources and num_outputs must be at least 1");
    }
    const int64_t T = numels.size, N = num_sources, K = num_outputs;
    args.num_tensors = T;
    args.num_sources = N;
    args.num_outputs = K;
    args.numels = table<int64_t>(numels, T, "numels");
    args.outs = reinterpret_cast<void* const*>(table<uint64_t>(outs, K * T, "outs"));
    args.out_dtypes = table<int32_t>(out_dtypes, T, "out_dtypes");
    args.bases = reinterpret_cast<const void* const*>(table<uint64_t>(bases, T, "bases"));
    args.base_dtypes = table<int32_t>(base_dtypes, T, "base_dtypes");
    args.srcs = reinterpret_cast<const void* const*>(table<uint64_t>(srcs, T * N, "srcs"));
    args.src_dtypes = table<int32_t>(src_dtypes, T * N, "src_dtypes");
    args.coeffs = table<float>(coeffs, K * N, "coeffs");
  }
};

// One layer's low-rank merge: N checkpoints' factor pointers ([N] uint64 each) and float32
// weights ([N]), with the sizes and dtype codes that lcsc_fast/lora.py validated.
struct LoraTables {
  py::buffer_info as, bs, weights;
  lcsc::LoraArgs args;

  LoraTables(int64_t m, int64_t n, int64_t rank, uintptr_t out, int32_t out_dtype,
             uintptr_t base, int32_t base_dtype, const py::buffer& as_, const py::buffer& bs_,
             int32_t factor_dtype, const py::buffer& weights_)
      : as(as_.request()), bs(bs_.request()), weights(weights_.request()) {
    const int64_t N = as.size;
    args.m = m;
    args.n = n;
    args.rank = rank;
    args.num_checkpoints = N;
    args.out = reinterpret_cast<void*>(out);
    args.out_dtype = out_dtype;
    args.base = reinterpret_cast<const void*>(base);
    args.base_dtype = base_dtype;
    args.as = reinterpret_cast<const void* const*>(table<uint64_t>(as, N, "as"));
    args.bs = reinterpret_cast<const void* const*>(table<uint64_t>(bs, N, "bs"));
    args.factor_dtype = factor_dtype;
    args.weights = table<float>(weights, N, "weights");
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lcsc_fast native merge engine (CPU, and CUDA when compiled in)";

  m.def(
      "merge_cpu",
      [](py::buffer numels, py::buffer outs, py::buffer out_dtypes, py::buffer bases,
         py::buffer base_dtypes, py::buffer srcs, py::buffer src_dtypes, py::buffer coeffs,
         int64_t num_sources, int64_t num_outputs, int num_threads, bool guard_faults) {
        Tables tables(numels, outs, out_dtypes, bases, base_dtypes, srcs, src_dtypes, coeffs,
                      num_sources, num_outputs);
        py::gil_scoped_release release;
        lcsc::merge_cpu(tables.args, num_threads, guard_faults);
      },
      py::arg("numels"), py::arg("outs"), py::arg("out_dtypes"), py::arg("bases"),
      py::arg("base_dtypes"), py::arg("srcs"), py::arg("src_dtypes"), py::arg("coeffs"),
      py::arg("num_sources"), py::arg("num_outputs"), py::arg("num_threads"),
      py::arg("guard_faults") = false,
      "Fused weighted sum over T tensors x N sources x K outputs on the CPU. guard_faults turns "
      "a SIGBUS from a truncated memory-mapped source into RuntimeError.");

  m.def(
      "merge_cuda",
      [](py::buffer numels, py::buffer outs, py::buffer out_dtypes, py::buffer bases,
         py::buffer base_dtypes, py::buffer srcs, py::buffer src_dtypes, py::buffer coeffs,
         int64_t num_sources, int64_t num_outputs, int device, uintptr_t stream) {
        Tables tables(numels, outs, out_dtypes, bases, base_dtypes, srcs, src_dtypes, coeffs,
                      num_sources, num_outputs);
        py::gil_scoped_release release;
        lcsc::merge_cuda(tables.args, device, stream);
      },
      "The same op enqueued on a CUDA stream (a cudaStream_t as an int).");

  py::class_<lcsc::CudaMergeTables>(
      m, "CudaMergeTables",
      "The tables of a CUDA merge that stay the same from run to run, built once for a plan: "
      "copy bytes() to device memory, then run(device_tables, coeffs, ...) moves only the "
      "coefficients.")
      .def(py::init([](py::buffer numels, py::buffer outs, py::buffer out_dtypes, py::buffer bases,
                       py::buffer base_dtypes, py::buffer srcs, py::buffer src_dtypes,
                       py::buffer coeffs, int64_t num_sources, int64_t num_outputs) {
             Tables tables(numels, outs, out_dtypes, bases, base_dtypes, srcs, src_dtypes,
                           coeffs, num_sources, num_outputs);
             return lcsc::CudaMergeTables(tables.args);
           }),
           "The same tables as merge_cuda takes (coeffs is not read).")
      .def("bytes",
           [](const lcsc::CudaMergeTables& t) {
             return py::bytes(t.bytes().data(), t.bytes().size());
           })
      .def("reusable", &lcsc::CudaMergeTables::reusable)
      .def(
          "run",
          [](const lcsc::CudaMergeTables& t, uintptr_t device_tables, py::buffer coeffs,
             int64_t num_coeffs, int device, uintptr_t stream) {
            const py::buffer_info info = coeffs.request();
            if (info.format != py::format_descriptor<float>::format() ||
                info.size != num_coeffs) {
              throw std::invalid_argument("coeffs must be " + std::to_string(num_coeffs) +
                                          " float32 values");
            }
            const auto* data = static_cast<const float*>(info.ptr);
            py::gil_scoped_release release;
            t.run(reinterpret_cast<const void*>(device_tables), data, device, stream);
          },
          py::arg("device_tables"), py::arg("coeffs"), py::arg("num_coeffs"), py::arg("device"),
          py::arg("stream"));

  m.def(
      "lora_cpu",
      [](int64_t m, int64_t n, int64_t rank, uintptr_t out, int32_t out_dtype, uintptr_t base,
         int32_t base_dtype, py::buffer as, py::buffer bs, int32_t factor_dtype,
         py::buffer weights, int num_threads, bool guard_faults) {
        LoraTables tables(m, n, rank, out, out_dtype, base, base_dtype, as, bs, factor_dtype,
                          weights);
        py::gil_scoped_release release;
        lcsc::lora_cpu(tables.args, num_threads, guard_faults);
      },
      py::arg("m"), py::arg("n"), py::arg("rank"), py::arg("out"), py::arg("out_dtype"),
      py::arg("base"), py::arg("base_dtype"), py::arg("as_"), py::arg("bs"),
      py::arg("factor_dtype"), py::arg("weights"), py::arg("num_threads"),
      py::arg("guard_faults") = false,
      "out[m, n] = base + sum_i weights[i] * B_i[m, rank] @ A_i[rank, n] on the CPU, fused over "
      "the concatenated rank (base 0 = none; may equal out). guard_faults turns a SIGBUS from a "
      "truncated memory-mapped factor into RuntimeError.");

  m.def("lora_cpu_scratch_nbytes", &lcsc::lora_cpu_scratch_nbytes, py::arg("m"), py::arg("n"),
        py::arg("total_rank"), py::arg("num_threads"),
        "Bytes of scratch lora_cpu allocates for an m x n layer of concatenated rank total_rank.");

  m.def(
      "lora_cuda",
      [](int64_t m, int64_t n, int64_t rank, uintptr_t out, int32_t out_dtype, uintptr_t base,
         int32_t base_dtype, py::buffer as, py::buffer bs, int32_t factor_dtype,
         py::buffer weights, int device, uintptr_t stream) {
        LoraTables tables(m, n, rank, out, out_dtype, base, base_dtype, as, bs, factor_dtype,
                          weights);
        py::gil_scoped_release release;
        lcsc::lora_cuda(tables.args, device, stream);
      },
      py::arg("m"), py::arg("n"), py::arg("rank"), py::arg("out"), py::arg("out_dtype"),
      py::arg("base"), py::arg("base_dtype"), py::arg("as_"), py::arg("bs"),
      py::arg("factor_dtype"), py::arg("weights"), py::arg("device"), py::arg("stream"),
      "The same op enqueued on a CUDA stream (a cudaStream_t as an int).");

  m.def(
      "find_overlap",
      [](py::buffer numels, py::buffer outs, py::buffer out_dtypes, py::buffer bases,
         py::buffer base_dtypes, py::buffer srcs, py::buffer src_dtypes, py::buffer coeffs,
         int64_t num_sources, int64_t num_outputs) -> py::object {
        Tables tables(numels, outs, out_dtypes, bases, base_dtypes, srcs, src_dtypes, coeffs,
                      num_sources, num_outputs);
        lcsc::validate(tables.args);
        const lcsc::Overlap o = lcsc::find_overlap(tables.args);
        if (!o.found) return py::none();
        return py::make_tuple(o.out_k, o.out_t, o.other_k, o.in_t, o.in_i);
      },
      "None, or (out_k, out_t, other_k, in_t, in_i) naming the first illegal overlap.");

  m.def(
      "copy_regions",
      [](py::buffer dst, py::buffer src, py::buffer nbytes, int num_threads) {
        const py::buffer_info d = dst.request(), s = src.request(), n = nbytes.request();
        const int64_t count = n.size;
        const auto* dst_ptrs = table<uint64_t>(d, count, "dst");
        const auto* src_ptrs = table<uint64_t>(s, count, "src");
        const auto* sizes = table<int64_t>(n, count, "nbytes");
        for (int64_t i = 0; i < count; ++i) {
          if (sizes[i] < 0) throw std::invalid_argument("nbytes: negative size");
        }
        py::gil_scoped_release release;
        lcsc::copy_regions(reinterpret_cast<void* const*>(dst_ptrs),
                           reinterpret_cast<const void* const*>(src_ptrs), sizes, count,
                           num_threads);
      },
      "Copy regions src[i] -> dst[i] of nbytes[i] bytes in parallel; SIGBUS -> RuntimeError.");

  m.def("cuda_compiled", &lcsc::cuda_compiled);
  m.def("cuda_device_count", &lcsc::cuda_device_count);
  m.def("simd_level", &lcsc::simd_level, "The SIMD level CPU merges use now.");
  m.def("set_simd_level", [](const std::string& name) { lcsc::set_simd_level(name.c_str()); },
        "Force a SIMD level (scalar, avx2, avx512) or go back to the best ('auto').");
  m.def(
      "read_probe",
      [](uintptr_t ptr, int64_t nbytes, int num_threads) {
        py::gil_scoped_release release;
        return lcsc::read_probe(reinterpret_cast<const void*>(ptr), nbytes, num_threads);
      },
      "Read nbytes at ptr with num_threads threads; returns a checksum (a bandwidth probe).");

  m.def(
      "traffic_probe",
      [](const py::buffer& srcs_, int64_t elem_nbytes, const py::buffer& outs_, int64_t numel,
         int num_threads) {
        const py::buffer_info srcs = srcs_.request(), outs = outs_.request();
        const auto* s = table<uint64_t>(srcs, srcs.size, "srcs");
        const auto* o = table<uint64_t>(outs, outs.size, "outs");
        if (numel < 0) throw std::invalid_argument("traffic_probe: numel must be >= 0");
        py::gil_scoped_release release;
        lcsc::traffic_probe(reinterpret_cast<const void* const*>(s), srcs.size, elem_nbytes,
                            reinterpret_cast<void* const*>(o), outs.size, numel, num_threads);
      },
      "Read numel elements (elem_nbytes each) of every source and write numel float32 words to "
      "every output (uint64 pointer buffers), with no merge arithmetic: a merge's memory "
      "traffic alone.");

  m.def(
      "fma_probe",
      [](int num_threads) {
        py::gil_scoped_release release;
        return lcsc::fma_probe(num_threads);
      },
      "Float fma lanes/s that num_threads threads sustain at the current SIMD level.");

  m.def("build_info", [] {
    py::dict info;
    info["cuda_compiled"] = lcsc::cuda_compiled();
    info["cuda_architectures"] = std::string(LCSC_CUDA_ARCHS);
#if defined(_OPENMP)
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["simd"] = std::string(lcsc::simd_level());
    info["simd_available"] = std::string(lcsc::simd_levels_available());
    info["compiler"] = std::string(__VERSION__);
    return info;
  });
}
