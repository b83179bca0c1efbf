// sglite::ggml_quant_matmul / ggml_dequantize / ggml_quantize_ref: torch ops over ggml-quantized weight rows,
// running llama.cpp's dot products from a per-ISA library (ggml_shim.c) whose kernel table Python registered.
//
// A matmul quantizes each activation row once to the weight format's vec_dot_type (q8_0 / q8_1 / q8_K, as
// llama.cpp does), then splits the output features over threads; each thread walks its features in tiles of
// kTileRows weight rows and, per tile, every activation row, so a tile's blocks are read from memory once
// and reused from cache by all rows (decode reads each weight byte once; prefill reuses it M times).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace {

// mirrors sg_ggml_type_kernels / sg_ggml_kernels_table in ggml_shim.c (abi_version 1)
using vec_dot_t = void (*)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
using from_float_t = void (*)(const float*, void*, int64_t);
using to_float_t = void (*)(const void*, float*, int64_t);

struct TypeKernels {
  int32_t qtype, vec_dot_type, block_size, block_bytes, vd_block_size, vd_block_bytes;
  vec_dot_t vec_dot;
  from_float_t quantize_vd;
  to_float_t dequantize;
  from_float_t quantize_ref;
};

constexpr int kMaxTypes = 16;
constexpr int kAbiVersion = 1;

struct KernelTable {
  int32_t abi_version;
  int32_t count;
  const char* level;
  TypeKernels types[kMaxTypes];
};

constexpr int kMaxLevels = 8;
std::atomic<const KernelTable*> tables[kMaxLevels];

constexpr int64_t kTileRows = 16;        // most weight rows per tile
constexpr int64_t kL1Bytes = 16 << 10;   // half a typical 32-48 KiB L1d: activation tile + weight tile
constexpr int64_t kL2Bytes = 256 << 10;  // half a typical 512 KiB-2 MiB L2: one activation panel
constexpr int64_t kGemmMinRows = 32;     // from this many activation rows, dequantized tiles + BLAS GEMM
constexpr int64_t kGemmTileBytes = 1 << 20;  // dequantized float32 weight rows per GEMM call (per thread)

const TypeKernels& kernels_for(int64_t level, int64_t qtype) {
  TORCH_CHECK(level >= 0 && level < kMaxLevels, "ggml kernel level index ", level, " out of range");
  const KernelTable* table = tables[level].load();
  TORCH_CHECK(table != nullptr, "ggml kernel level ", level, " is not loaded (sglite.runtime.kernels.quant_linear loads it)");
  for (int i = 0; i < table->count; ++i) {
    if (table->types[i].qtype == qtype) return table->types[i];
  }
  TORCH_CHECK(false, "ggml type ", qtype, " has no kernels in the ", table->level, " library");
}

void check_weight(const at::Tensor& w, const TypeKernels& k, int64_t cols) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "weight blocks must be a 2-D uint8 tensor");
  TORCH_CHECK(cols % k.block_size == 0, "cols ", cols, " is not a multiple of the block size ", k.block_size);
  TORCH_CHECK(w.size(1) == cols / k.block_size * k.block_bytes, "weight rows hold ", w.size(1),
              " bytes; ", cols, " columns need ", cols / k.block_size * k.block_bytes);
  TORCH_CHECK(w.stride(1) == 1, "weight rows must be contiguous bytes");
}

void register_table(int64_t level, int64_t address) {
  TORCH_CHECK(level >= 0 && level < kMaxLevels, "ggml kernel level index ", level, " out of range");
  auto table = reinterpret_cast<const KernelTable*>(address);
  TORCH_CHECK(table != nullptr && table->abi_version == kAbiVersion, "ggml kernel table has ABI version ",
              table ? table->abi_version : -1, ", this op expects ", kAbiVersion, ": rebuild the ggml kernels");
  tables[level].store(table);
}

// Prefill: the vec_dot loop is compute-bound at a flat rate, while a float32 GEMM gains with rows (measured
// crossover 24-64 rows on AVX2, docs/kernels.md). Each thread dequantizes a tile of weight rows (L2-sized, so
// no dense copy of the matrix ever exists) and multiplies all activation rows by it with BLAS.
at::Tensor gemm_over_dequantized_tiles(const at::Tensor& x2, const at::Tensor& w, const TypeKernels& k, int64_t out_features) {
  const int64_t cols = x2.size(1);
  at::Tensor out = at::empty({x2.size(0), out_features}, x2.options());
  const int64_t tile_rows = std::clamp<int64_t>(kGemmTileBytes / (cols * 4) / 8 * 8, 8, 512);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t w_stride = w.stride(0);
  at::parallel_for(0, out_features, tile_rows, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({tile_rows, cols}, x2.options());
    float* tp = tile.data_ptr<float>();
    for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
      const int64_t n = std::min(end, r0 + tile_rows) - r0;
      for (int64_t r = 0; r < n; ++r) k.dequantize(wp + (r0 + r) * w_stride, tp + r * cols, cols);
      at::Tensor out_tile = out.narrow(1, r0, n);
      at::mm_out(out_tile, x2, tile.narrow(0, 0, n).t());
    }
  });
  return out;
}

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t out_features, int64_t level) {
  const TypeKernels& k = kernels_for(level, qtype);
  const int64_t cols = x.size(-1);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16, got ", x.scalar_type());
  check_weight(w, k, cols);
  TORCH_CHECK(w.size(0) == out_features, "weight has ", w.size(0), " rows, out_features is ", out_features);
  TORCH_CHECK(cols % k.vd_block_size == 0, "cols ", cols, " is not a multiple of ", k.vd_block_size);

  const at::Tensor x2 = x.reshape({-1, cols}).to(at::kFloat).contiguous();
  const int64_t m_rows = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  if (m_rows >= kGemmMinRows) {
    at::Tensor out = gemm_over_dequantized_tiles(x2, w, k, out_features).view(shape);
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
  }
  const int64_t xq_row_bytes = cols / k.vd_block_size * k.vd_block_bytes;
  std::vector<uint8_t> xq(static_cast<size_t>(m_rows * xq_row_bytes));
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, m_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) k.quantize_vd(xp + m * cols, xq.data() + m * xq_row_bytes, cols);
  });

  at::Tensor out = at::empty({m_rows, out_features}, x2.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t w_stride = w.stride(0);
  const int64_t w_row_bytes = w.size(1);
  const int n = static_cast<int>(cols);
  // Blocking (measured: without it, past ~32 rows the quantized activations spill L1 and the vec_dot loop
  // slows 2-3x): activation panels of <= kL2Bytes stay in L2 across a thread's weight rows; inside, tiles of
  // <= kL1Bytes activation rows and weight rows pair up in L1.
  const int64_t panel_rows = std::max<int64_t>(1, kL2Bytes / xq_row_bytes);
  const int64_t m_tile = std::max<int64_t>(1, kL1Bytes / xq_row_bytes);
  const int64_t w_tile = std::clamp<int64_t>(kL1Bytes / w_row_bytes, 1, kTileRows);
  for (int64_t panel = 0; panel < m_rows; panel += panel_rows) {
    const int64_t panel_end = std::min(m_rows, panel + panel_rows);
    at::parallel_for(0, out_features, w_tile, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; tile += w_tile) {
        const int64_t tile_end = std::min(end, tile + w_tile);
        for (int64_t m0 = panel; m0 < panel_end; m0 += m_tile) {
          const int64_t m1 = std::min(panel_end, m0 + m_tile);
          for (int64_t m = m0; m < m1; ++m) {
            const uint8_t* xrow = xq.data() + m * xq_row_bytes;
            float* orow = op + m * out_features;
            for (int64_t r = tile; r < tile_end; ++r) k.vec_dot(n, orow + r, 0, wp + r * w_stride, 0, xrow, 0, 1);
          }
        }
      }
    });
  }
  out = out.view(shape);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor dequantize(const at::Tensor& w, const std::optional<at::Tensor>& rows, int64_t qtype, int64_t cols, int64_t level) {
  const TypeKernels& k = kernels_for(level, qtype);
  check_weight(w, k, cols);
  at::Tensor index;
  if (rows.has_value()) {
    index = rows->reshape({-1}).to(at::kLong).contiguous();
  }
  const int64_t n_out = rows.has_value() ? index.size(0) : w.size(0);
  const int64_t* ip = rows.has_value() ? index.data_ptr<int64_t>() : nullptr;
  const int64_t n_rows = w.size(0);
  for (int64_t i = 0; ip && i < n_out; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n_rows, "row index ", ip[i], " out of range for ", n_rows, " rows");
  }
  at::Tensor out = at::empty({n_out, cols}, w.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t w_stride = w.stride(0);
  at::parallel_for(0, n_out, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) k.dequantize(wp + (ip ? ip[i] : i) * w_stride, op + i * cols, cols);
  });
  return out;
}

at::Tensor quantize_ref(const at::Tensor& x, int64_t qtype, int64_t level) {
  const TypeKernels& k = kernels_for(level, qtype);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "quantize_ref takes a 2-D float32 tensor");
  const int64_t cols = x.size(1);
  TORCH_CHECK(cols % k.block_size == 0, "cols ", cols, " is not a multiple of the block size ", k.block_size);
  const at::Tensor xc = x.contiguous();
  const int64_t row_bytes = cols / k.block_size * k.block_bytes;
  at::Tensor out = at::empty({x.size(0), row_bytes}, x.options().dtype(at::kByte));
  for (int64_t r = 0; r < x.size(0); ++r) {
    k.quantize_ref(xc.data_ptr<float>() + r * cols, out.data_ptr<uint8_t>() + r * row_bytes, cols);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sglite, CPU, m) {
  m.impl("ggml_quant_matmul", &quant_matmul);
  m.impl("ggml_dequantize", &dequantize);
  m.impl("ggml_quantize_ref", &quantize_ref);
}

TORCH_LIBRARY_FRAGMENT(sglite_ggml, m) {
  m.def("register_table(int level, int address) -> ()", &register_table);
}
