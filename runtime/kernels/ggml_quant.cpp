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
#include <cstring>
#include <cstdint>
#include <vector>

namespace {

// mirrors sg_ggml_type_kernels / sg_ggml_kernels_table in ggml_shim.c (abi_version 2)
using vec_dot_t = void (*)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
using from_float_t = void (*)(const float*, void*, int64_t);
using to_float_t = void (*)(const void*, float*, int64_t);
using gemx_t = void (*)(int, float*, size_t, const void*, const void*, int, int);

struct TypeKernels {
  int32_t qtype, vec_dot_type, block_size, block_bytes, vd_block_size, vd_block_bytes;
  vec_dot_t vec_dot;
  from_float_t quantize_vd;
  to_float_t dequantize;
  from_float_t quantize_ref;
  int32_t packed_rows;
  gemx_t gemv_packed;
  gemx_t gemm_packed;
  from_float_t quantize_mat;
};

constexpr int kMaxTypes = 16;
constexpr int kAbiVersion = 2;

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
  // the workers write their products into `out` through its pointer: a worker thread does not share the
  // caller's inference mode, and an in-place op on an output made under torch.inference_mode() would be refused
  float* op = out.data_ptr<float>();
  const int64_t m_rows = x2.size(0);
  at::parallel_for(0, out_features, tile_rows, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({tile_rows, cols}, x2.options());
    float* tp = tile.data_ptr<float>();
    for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
      const int64_t n = std::min(end, r0 + tile_rows) - r0;
      for (int64_t r = 0; r < n; ++r) k.dequantize(wp + (r0 + r) * w_stride, tp + r * cols, cols);
      const at::Tensor product = at::mm(x2, tile.narrow(0, 0, n).t()).contiguous();
      const float* pp = product.data_ptr<float>();
      for (int64_t i = 0; i < m_rows; ++i) std::memcpy(op + i * out_features + r0, pp + i * n, n * sizeof(float));
    }
  });
  return out;
}

// Weights repacked as llama.cpp's CPU backend does for its gemv/gemm kernels (same byte count): each block
// index of 8 consecutive rows becomes one 8-row block, quants interleaved 8 bytes at a time, so a 4 x 8 output
// tile per step unpacks each weight block once for 4 activation rows.
//   Q4_0 -> block_q4_0x8: d[8] fp16, qs[128] (nibbles xor 0x88: signed, as the kernels read them)
//   Q4_K -> block_q4_Kx8: d[8], dmin[8] fp16, scales[96] (per sub-block, the 8 rows' 6-bit scale/min pairs
//           in Q4_K's own 12-byte encoding), qs[1024]
void interleave_quants(const uint8_t* const rows[8], int64_t qs_offset, int64_t qs_bytes, uint8_t* out, uint64_t mask) {
  for (int64_t i = 0; i < qs_bytes; ++i) {  // 8 rows x qs_bytes = qs_bytes chunks of 8: row i % 8, chunk i / 8
    uint64_t chunk;
    std::memcpy(&chunk, rows[i % 8] + qs_offset + (i / 8) * 8, 8);
    chunk ^= mask;
    std::memcpy(out + i * 8, &chunk, 8);
  }
}

// Q4_K's 12 scale bytes: 8 sub-blocks' 6-bit (scale, min), the high bits of 4-7 in the top bits of 0-3
void decode_scales_k4(const uint8_t* q, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      sc[j] = q[j] & 63;
      mn[j] = q[j + 4] & 63;
    } else {
      sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
  }
}

void encode_scales_k4(const uint8_t sc[8], const uint8_t mn[8], uint8_t* q) {
  for (int j = 0; j < 4; ++j) {
    q[j] = (sc[j] & 63) | ((sc[j + 4] & 48) << 2);
    q[j + 4] = (mn[j] & 63) | ((mn[j + 4] & 48) << 2);
    q[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
  }
}

void repack_block_group(int64_t qtype, const uint8_t* const rows[8], uint8_t* out) {
  if (qtype == 2) {  // Q4_0: fp16 d, qs[16]
    for (int i = 0; i < 8; ++i) std::memcpy(out + 2 * i, rows[i], 2);
    interleave_quants(rows, 2, 16, out + 16, 0x8888888888888888ULL);
    return;
  }
  // Q4_K: fp16 d, fp16 dmin, scales[12], qs[128]
  for (int i = 0; i < 8; ++i) {
    std::memcpy(out + 2 * i, rows[i], 2);
    std::memcpy(out + 16 + 2 * i, rows[i] + 2, 2);
  }
  uint8_t sc[8][8], mn[8][8];  // [row][sub-block]
  for (int r = 0; r < 8; ++r) decode_scales_k4(rows[r] + 4, sc[r], mn[r]);
  for (int sb = 0; sb < 8; ++sb) {
    uint8_t s8[8], m8[8];
    for (int r = 0; r < 8; ++r) {
      s8[r] = sc[r][sb];
      m8[r] = mn[r][sb];
    }
    encode_scales_k4(s8, m8, out + 32 + sb * 12);
  }
  interleave_quants(rows, 16, 128, out + 128, 0);
}

at::Tensor repack(const at::Tensor& w, int64_t qtype, int64_t cols, int64_t level) {
  const TypeKernels& k = kernels_for(level, qtype);
  check_weight(w, k, cols);
  const int64_t rows = w.size(0);
  if (k.packed_rows != 8 || rows % 8) return at::empty({0}, w.options());
  TORCH_CHECK(qtype == 2 || qtype == 12, "no repacking for ggml type ", qtype);
  const int64_t nb = cols / k.block_size;
  at::Tensor out = at::empty({rows, w.size(1)}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t w_stride = w.stride(0);
  at::parallel_for(0, rows / 8, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* group[8];
        for (int i = 0; i < 8; ++i) group[i] = src + (g * 8 + i) * w_stride + b * k.block_bytes;
        repack_block_group(qtype, group, dst + (g * nb + b) * 8 * k.block_bytes);
      }
    }
  });
  return out;
}

at::Tensor packed_matmul(const at::Tensor& x2, const at::Tensor& packed, const TypeKernels& k, int64_t out_features) {
  const int64_t cols = x2.size(1), m_rows = x2.size(0);
  const int64_t xq_row_bytes = cols / k.vd_block_size * k.vd_block_bytes;
  const int64_t m4 = m_rows - m_rows % 4;
  std::vector<uint8_t> xq(static_cast<size_t>(m_rows * xq_row_bytes));
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, m_rows, 16, [&](int64_t begin, int64_t end) {  // groups of 4 rows interleaved, the rest plain
    for (int64_t m = begin; m < end; ++m) {
      if (m < m4 && m % 4 == 0) k.quantize_mat(xp + m * cols, xq.data() + m * xq_row_bytes, cols);
      else if (m >= m4) k.quantize_vd(xp + m * cols, xq.data() + m * xq_row_bytes, cols);
    }
  });
  at::Tensor out = at::empty({m_rows, out_features}, x2.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t group_bytes = packed.size(1) * k.packed_rows;  // one block_q4_0x8 row group
  const int n = static_cast<int>(cols);
  // column chunks of <= kL2Bytes of weights: reused from cache by every activation row group
  const int64_t chunk_groups = std::max<int64_t>(1, kL2Bytes / group_bytes);
  const int64_t groups = out_features / k.packed_rows;
  // grain 1: a small matrix (a K/V projection is a few dozen groups) still spreads over every thread
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g0 = begin; g0 < end; g0 += chunk_groups) {
      const int64_t g1 = std::min(end, g0 + chunk_groups);
      const int nc = static_cast<int>((g1 - g0) * k.packed_rows);
      const uint8_t* vx = wp + g0 * group_bytes;
      float* o = op + g0 * k.packed_rows;
      if (m4) k.gemm_packed(n, o, out_features, vx, xq.data(), static_cast<int>(m4), nc);
      for (int64_t m = m4; m < m_rows; ++m) {
        k.gemv_packed(n, o + m * out_features, out_features, vx, xq.data() + m * xq_row_bytes, 1, nc);
      }
    }
  });
  return out;
}

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t out_features, int64_t level,
                        const std::optional<at::Tensor>& packed) {
  const TypeKernels& k = kernels_for(level, qtype);
  const int64_t cols = x.size(-1);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16, got ", x.scalar_type());
  check_weight(w, k, cols);
  TORCH_CHECK(w.size(0) == out_features, "weight has ", w.size(0), " rows, out_features is ", out_features);
  TORCH_CHECK(cols % k.vd_block_size == 0, "cols ", cols, " is not a multiple of ", k.vd_block_size);

  at::Tensor x2 = x.reshape({-1, cols});  // each conversion only where needed: a decode call is a few microseconds
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  if (!x2.is_contiguous()) x2 = x2.contiguous();
  const int64_t m_rows = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  // Prefill first: float32 GEMM over dequantized tiles of the plain blocks is exact in the activations, where
  // the packed gemm quantizes them to 8 bits (a prompt's logits then match the dense model's, as for every
  // format without a packed layout); decode rows take the packed kernels.
  if (m_rows >= kGemmMinRows) {
    at::Tensor out = gemm_over_dequantized_tiles(x2, w, k, out_features).view(shape);
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
  }
  if (packed.has_value() && packed->numel()) {
    TORCH_CHECK(k.packed_rows && packed->sizes() == w.sizes() && packed->is_contiguous(),
                "packed weights do not match this level's packed layout (repack them with ggml_repack)");
    at::Tensor out = packed_matmul(x2, *packed, k, out_features).view(shape);
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
  m.impl("ggml_repack", &repack);
}

TORCH_LIBRARY_FRAGMENT(sglite_ggml, m) {
  m.def("register_table(int level, int address) -> ()", &register_table);
}
