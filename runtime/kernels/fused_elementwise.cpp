// A decoder layer's elementwise steps in one pass each (CPU): see fused_elementwise.py for the contract.
//
// Each op computes what the torch formulation computes, rounding where it rounds: float32 in ATen's own
// vector functions (the same Sleef exp as torch's silu), and for bfloat16 every intermediate the torch
// form stores is rounded to bfloat16 here too. The library is built with -ffp-contract=off, so a
// multiply and an add stay two roundings as in the separate torch ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace sglite_fused {

using Vec = at::vec::Vectorized<float>;

// x / (1 + exp(-x)): torch's silu, vector and scalar forms.
inline Vec silu(const Vec& x) { return x / (Vec(1.f) + x.neg().exp()); }
inline float silu(float x) { return x / (1.f + std::exp(-x)); }

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// One row: out[i] = silu(gate[i]) * up[i]. Like torch's elementwise loop over a row of a strided view, the
// vector form runs over blocks of two vectors and the scalar form (std::exp) over the rest, so each element
// takes the same exp as in torch (at one thread: torch's own split across threads can move the boundary).
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t kLanes = Vec::size();
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      (silu(Vec::loadu(gate + i)) * Vec::loadu(up + i)).store(out + i);
      (silu(Vec::loadu(gate + i + kLanes)) * Vec::loadu(up + i + kLanes)).store(out + i + kLanes);
    }
    for (; i < n; ++i) out[i] = silu(gate[i]) * up[i];
  } else {
    using Narrow = at::vec::Vectorized<T>;
    auto one = [&](int64_t j) {
      auto [g0, g1] = at::vec::convert_to_float<T>(Narrow::loadu(gate + j));
      auto [u0, u1] = at::vec::convert_to_float<T>(Narrow::loadu(up + j));
      // silu's output is stored in T before the multiply reads it
      auto [s0, s1] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(silu(g0), silu(g1)));
      at::vec::convert_from_float<T>(s0 * u0, s1 * u1).store(out + j);
    };
    for (; i + 2 * Narrow::size() <= n; i += 2 * Narrow::size()) {
      one(i);
      one(i + Narrow::size());
    }
    for (; i < n; ++i) out[i] = static_cast<T>(to_float(static_cast<T>(silu(to_float(gate[i])))) * to_float(up[i]));
  }
}

// The float32 and bfloat16 instantiation of `body` (a generic lambda taking a T* tag); other dtypes are refused.
template <typename Body>
void dispatch_float_or_bfloat16(at::ScalarType dtype, const char* op, const Body& body) {
  if (dtype == at::kFloat) {
    body(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(dtype == at::kBFloat16, op, ": float32 or bfloat16, got ", dtype);
    body(static_cast<at::BFloat16*>(nullptr));
  }
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "silu_and_mul: the last dimension holds gate then up (even size)");
  const at::Tensor x = gate_up.contiguous();
  const int64_t width = x.size(-1) / 2, rows = width ? x.numel() / (2 * width) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  at::Tensor out = at::empty(shape, x.options());
  dispatch_float_or_bfloat16(x.scalar_type(), "silu_and_mul", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* src = x.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(src + 2 * r * width, src + (2 * r + 1) * width, dst + r * width, width);
    });
  });
  return out;
}

// One head of one token, half-split layout: out = x * cos + cat(-x2, x1) * sin.
template <typename T>
void rotate_head(const T* x, const T* cos, const T* sin, T* out, int64_t dim) {
  const int64_t half = dim / 2;
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    for (; i + Vec::size() <= half; i += Vec::size()) {
      const Vec x1 = Vec::loadu(x + i), x2 = Vec::loadu(x + half + i);
      (x1 * Vec::loadu(cos + i) + x2.neg() * Vec::loadu(sin + i)).store(out + i);
      (x2 * Vec::loadu(cos + half + i) + x1 * Vec::loadu(sin + half + i)).store(out + half + i);
    }
    for (; i < half; ++i) {
      out[i] = x[i] * cos[i] + (-x[half + i]) * sin[i];
      out[half + i] = x[half + i] * cos[half + i] + x[i] * sin[half + i];
    }
  } else {
    // each product and the sum are rounded to T, as three bfloat16 ops would
    using Narrow = at::vec::Vectorized<T>;
    auto round = [](float v) { return to_float(static_cast<T>(v)); };
    auto round_vec = [](const Vec& a, const Vec& b) { return at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b)); };
    int64_t i = 0;
    for (; i + Narrow::size() <= half; i += Narrow::size()) {
      auto [x1a, x1b] = at::vec::convert_to_float<T>(Narrow::loadu(x + i));
      auto [x2a, x2b] = at::vec::convert_to_float<T>(Narrow::loadu(x + half + i));
      auto [c1a, c1b] = at::vec::convert_to_float<T>(Narrow::loadu(cos + i));
      auto [c2a, c2b] = at::vec::convert_to_float<T>(Narrow::loadu(cos + half + i));
      auto [s1a, s1b] = at::vec::convert_to_float<T>(Narrow::loadu(sin + i));
      auto [s2a, s2b] = at::vec::convert_to_float<T>(Narrow::loadu(sin + half + i));
      auto [p1a, p1b] = round_vec(x1a * c1a, x1b * c1b);
      auto [q1a, q1b] = round_vec(x2a.neg() * s1a, x2b.neg() * s1b);
      at::vec::convert_from_float<T>(p1a + q1a, p1b + q1b).store(out + i);
      auto [p2a, p2b] = round_vec(x2a * c2a, x2b * c2b);
      auto [q2a, q2b] = round_vec(x1a * s2a, x1b * s2b);
      at::vec::convert_from_float<T>(p2a + q2a, p2b + q2b).store(out + half + i);
    }
    for (; i < half; ++i) {
      const float x1 = to_float(x[i]), x2 = to_float(x[half + i]);
      out[i] = static_cast<T>(round(x1 * to_float(cos[i])) + round(-x2 * to_float(sin[i])));
      out[half + i] = static_cast<T>(round(x2 * to_float(cos[half + i])) + round(x1 * to_float(sin[half + i])));
    }
  }
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos_t, const at::Tensor& sin_t) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotary: x [tokens, heads, dim] with whole rows per head");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0, "rotary: an even head size");
  const at::Tensor cos = cos_t.contiguous(), sin = sin_t.contiguous();
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({tokens, dim}) && sin.sizes() == cos.sizes(), "rotary: cos/sin [tokens, dim]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rotary: cos/sin in x's dtype");
  at::Tensor out = at::empty({tokens, heads, dim}, x.options());
  const int64_t row_stride = x.stride(0);
  dispatch_float_or_bfloat16(x.scalar_type(), "rotary", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *src = x.data_ptr<T>(), *c = cos.data_ptr<T>(), *s = sin.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h)
          rotate_head(src + t * row_stride + h * dim, c + t * dim, s + t * dim, dst + (t * heads + h) * dim, dim);
    });
  });
  return out;
}

}  // namespace sglite_fused

TORCH_LIBRARY_IMPL(sglite, CPU, m) {
  m.impl("silu_and_mul", &sglite_fused::silu_and_mul);
  m.impl("rotary", &sglite_fused::rotary);
}
