// Greedy picks over float32 logits on a CPU: each row's first maximum (the token argmax returns) from one
// vectorized pass for the maximum and a vectorized scan for its first position, or -1 where the row's
// maximum is not finite (a NaN in the row, a +inf, or every entry -inf). Registered with the dispatcher
// as the CPU kernel of sglite::greedy_pick; the schema and the fake kernel are in greedy_pick.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace sglite_greedy_pick {

using Vec = at::vec::Vectorized<float>;

// The row's maximum with NaN propagated (at::vec::maximum keeps a NaN operand).
float row_max(const float* x, int64_t n) {
  const int64_t whole = n / Vec::size() * Vec::size();
  Vec top(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < whole; i += Vec::size()) top = at::vec::maximum(top, Vec::loadu(x + i));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, top);
  for (int64_t i = whole; i < n; ++i) m = (std::isnan(x[i]) || x[i] > m) ? x[i] : m;
  return m;
}

// The first position holding `m`, whose presence is known.
int64_t first_of(const float* x, int64_t n, float m) {
  const int64_t whole = n / Vec::size() * Vec::size();
  const Vec target(m);
  const int all_differ = (1 << Vec::size()) - 1;  // zero_mask(): one bit per lane whose compare was false
  for (int64_t i = 0; i < whole; i += Vec::size()) {
    if ((Vec::loadu(x + i) == target).zero_mask() != all_differ) {
      for (int64_t j = i;; ++j)
        if (x[j] == m) return j;
    }
  }
  for (int64_t i = whole; i < n; ++i)
    if (x[i] == m) return i;
  return -1;  // unreachable for a finite maximum of the row
}

at::Tensor greedy_pick(at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "greedy_pick: float32 logits [rows, vocab]");
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* base = logits.data_ptr<float>();
  int64_t* picks = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = base + r * vocab;
      const float m = vocab > 0 ? row_max(x, vocab) : -std::numeric_limits<float>::infinity();
      picks[r] = std::isfinite(m) ? first_of(x, vocab, m) : -1;
    }
  });
  return out;
}

}  // namespace sglite_greedy_pick

TORCH_LIBRARY_IMPL(sglite, CPU, m) { m.impl("greedy_pick", &sglite_greedy_pick::greedy_pick); }
