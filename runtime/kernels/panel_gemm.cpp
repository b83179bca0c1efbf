// bfloat16 linear layers over weights packed in 32-column panels (CPU, AVX512-BF16): see panel_gemm.py.
//
// Weights are laid out [panels, in/2, 32, 2]: for each pair of inputs (k, k+1), the 32 columns of a panel
// sit together as 32 pairs, the operand layout of vdpbf16ps. A tile keeps up to 12 activation rows by
// 32 columns of float32 sums in registers (24 of the 32 vector registers) and walks the panel once,
// broadcasting each row's (k, k+1) pair against two weight vectors. Every weight byte brought from
// memory is used for up to 12 rows at once, and while a panel is worked through with 6 rows or more, the
// next one is prefetched a line or two per step, so the weight stream is spread over the arithmetic
// instead of arriving in bursts (what oneDNN's blocking does for decode-sized row counts).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

// x86-64 compilers with the AVX512-BF16 intrinsics (GCC 10, clang 11 and later); elsewhere the op exists, says
// it is unavailable, and every layer stays on oneDNN.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define SGLITE_PANELS 1
#include <immintrin.h>
#else
#define SGLITE_PANELS 0
#endif

#if SGLITE_PANELS
namespace {

constexpr int64_t kPanelColumns = 32;  // two float32 vectors of sums per row
constexpr int kMaxRows = 12;           // 24 accumulators; the rest hold the weight pair and a broadcast
// Below this many rows a step is too short to hide prefetch instructions: the tile runs at the memory's
// pace and the hardware prefetchers alone keep ahead (measured on SmolLM2's layers, one thread: 1-4 rows
// 25-40% faster without them, 6-32 rows 5-10% faster with them).
constexpr int64_t kPrefetchRows = 6;
// Up to this many row blocks (48 rows) a panel goes through all of them at once; past it, panels go in groups
// of kGroupBytes (half of a 1 MiB L2 cache) so the activations are not read again for every panel.
constexpr int64_t kPanelOrderBlocks = 4;
constexpr int64_t kGroupBytes = 512 * 1024;

#define SGLITE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

struct Prefetch {
  const char* next;  // the next panel of this thread's range, or nullptr
  int64_t first;     // its first line this tile asks for
  int64_t per_step;  // lines per step of the k loop
  int64_t lines;     // its line count
};

inline __mmask16 lanes_below(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// rows x up to 32 columns of out = x W^T (+ bias), over the whole reduction; x rows are `ldx` apart,
// out rows `ldo` apart; `columns` (<= 32) of the panel are real.
template <int Rows>
SGLITE_BF16_TARGET void tile(const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs, const float* bias,
                             uint16_t* out, int64_t ldo, int64_t columns, Prefetch prefetch) {
  __m512 low[Rows], high[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) low[r] = high[r] = _mm512_setzero_ps();
  int64_t line = prefetch.first;
  for (int64_t kk = 0; kk < pairs; ++kk) {
    const __m512bh w_low = (__m512bh)_mm512_loadu_si512(panel + kk * 2 * kPanelColumns);
    const __m512bh w_high = (__m512bh)_mm512_loadu_si512(panel + kk * 2 * kPanelColumns + kPanelColumns);
    if (prefetch.next != nullptr) {
      for (int64_t i = 0; i < prefetch.per_step && line < prefetch.lines; ++i, ++line)
        _mm_prefetch(prefetch.next + line * 64, _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x + r * ldx + 2 * kk, sizeof(pair));
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      low[r] = _mm512_dpbf16_ps(low[r], b, w_low);
      high[r] = _mm512_dpbf16_ps(high[r], b, w_high);
    }
  }
  const __mmask16 mask_low = lanes_below(columns), mask_high = lanes_below(columns - 16);
  __m512 bias_low = _mm512_setzero_ps(), bias_high = _mm512_setzero_ps();
  if (bias != nullptr) {
    bias_low = _mm512_maskz_loadu_ps(mask_low, bias);
    if (columns > 16) bias_high = _mm512_maskz_loadu_ps(mask_high, bias + 16);
  }
  for (int r = 0; r < Rows; ++r) {
    // one rounding to bfloat16 (to nearest even) of the float32 sum, as torch's bfloat16 linear does
    const __m256i out_low = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(low[r], bias_low));
    const __m256i out_high = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(high[r], bias_high));
    uint16_t* o = out + r * ldo;
    if (columns == kPanelColumns) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), out_low);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), out_high);
    } else {
      _mm256_mask_storeu_epi16(o, mask_low, out_low);
      if (columns > 16) _mm256_mask_storeu_epi16(o + 16, mask_high, out_high);
    }
  }
}

using Tile = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, uint16_t*, int64_t, int64_t,
                      Prefetch);

template <int... Index>
constexpr std::array<Tile, sizeof...(Index)> tiles_by_rows(std::integer_sequence<int, Index...>) {
  return {&tile<Index + 1>...};
}

const std::array<Tile, kMaxRows> kTiles = tiles_by_rows(std::make_integer_sequence<int, kMaxRows>{});

}  // namespace

static bool cpu_has_bf16_dot() {
  static const bool found = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl");
  return found;
}

at::Tensor panel_linear(const at::Tensor& x_in, const at::Tensor& panels, int64_t out_features,
                        const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(cpu_has_bf16_dot(), "panel_linear needs a CPU with AVX512-BF16");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && panels.scalar_type() == at::kBFloat16,
              "panel_linear: x and panels must be bfloat16");
  TORCH_CHECK(panels.dim() == 4 && panels.size(2) == kPanelColumns && panels.size(3) == 2 && panels.is_contiguous(),
              "panels must be a contiguous [panels, in/2, 32, 2] tensor");
  const int64_t pairs = panels.size(1), in_features = 2 * pairs;
  TORCH_CHECK(pairs > 0, "panels hold no inputs");
  TORCH_CHECK(x_in.size(-1) == in_features, "x has ", x_in.size(-1), " features, the panels ", in_features);
  TORCH_CHECK(out_features > 0 && out_features <= panels.size(0) * kPanelColumns &&
                  out_features > (panels.size(0) - 1) * kPanelColumns,
              "out_features ", out_features, " does not fit ", panels.size(0), " panels");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.numel() / in_features;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());
  if (rows == 0) return out;
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == out_features, "bias must hold out_features values");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(panels.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  // rows in equal blocks of at most kMaxRows (32 rows: 11 + 11 + 10, not 12 + 12 + 8)
  const int64_t blocks = (rows + kMaxRows - 1) / kMaxRows, rows_per_block = (rows + blocks - 1) / blocks;
  const int64_t panel_elements = pairs * 2 * kPanelColumns, panel_lines = panel_elements * 2 / 64;
  const bool prefetching = rows_per_block >= kPrefetchRows;
  const auto run_tile = [&](int64_t p, int64_t first, Prefetch prefetch) {
    kTiles[std::min(rows_per_block, rows - first) - 1](
        xp + first * in_features, in_features, wp + p * panel_elements, pairs, b ? b + p * kPanelColumns : nullptr,
        op + first * out_features + p * kPanelColumns, out_features, std::min(kPanelColumns, out_features - p * kPanelColumns),
        prefetch);
  };
  const auto next_panel = [&](int64_t p, int64_t end) {
    return p + 1 < end && prefetching ? reinterpret_cast<const char*>(wp + (p + 1) * panel_elements) : nullptr;
  };
  if (blocks <= kPanelOrderBlocks) {
    // decode: each panel through every row block in turn, the next panel's lines spread over all their steps
    const int64_t per_step = (panel_lines + blocks * pairs - 1) / (blocks * pairs);
    at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t block = 0;
        for (int64_t first = 0; first < rows; first += rows_per_block, ++block)
          run_tile(p, first, Prefetch{next_panel(p, end), block * pairs * per_step, per_step, panel_lines});
      }
    });
  } else {
    // many rows (prefill): a group of panels that fits half the L2 cache, each row block through the whole
    // group while its rows sit in L1, so the activations are read once per group rather than once per panel;
    // the first row block streams the group in from memory, prefetching one panel ahead
    const int64_t group = std::max<int64_t>(1, kGroupBytes / (panel_elements * 2));
    const int64_t per_step = (panel_lines + pairs - 1) / pairs;
    at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t start = begin; start < end; start += group) {
        const int64_t stop = std::min(end, start + group);
        for (int64_t first = 0; first < rows; first += rows_per_block)
          for (int64_t p = start; p < stop; ++p)
            run_tile(p, first, Prefetch{first == 0 ? next_panel(p, end) : nullptr, 0, per_step, panel_lines});
      }
    });
  }
  return out;
}

#else  // no AVX512-BF16 intrinsics for this target

static bool cpu_has_bf16_dot() { return false; }

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "panel_linear needs an x86-64 build with AVX512-BF16 intrinsics");
  return x;
}

#endif

bool panel_linear_available() { return cpu_has_bf16_dot(); }

TORCH_LIBRARY_IMPL(sglite, CPU, m) { m.impl("panel_linear", &panel_linear); }
// no tensor to dispatch on: one kernel for every backend, defined here with its schema
TORCH_LIBRARY_FRAGMENT(sglite, m) { m.def("panel_linear_available() -> bool", &panel_linear_available); }
