// Decode attention that reads the KV pool in place (CPU): see paged_decode.py for the contract.
//
// One task per sequence: each query head is scored against each
// cached key row the pool holds for the sequence (rows are found through kv_index, never gathered
// into a copy), plus the new token's own key; softmax in float32; each value row is read once and
// accumulated in float32. Rows of head_dim 64 and 128 are held in registers (a template per size).
// Registered with the dispatcher as the CPU kernel of sglite::paged_decode_attention (its schema and
// fake kernel are defined in paged_decode.py), so calls skip Python entirely.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// One row of `kDim` values as float vectors (kDim a multiple of the float vector width).
template <typename T, int64_t kDim>
inline void load_row(const T* src, Vec* dst) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < kDim / kLanes; ++i) dst[i] = Vec::loadu(src + i * kLanes);
  } else {
    using Narrow = at::vec::Vectorized<T>;
    for (int64_t i = 0; i < kDim / Narrow::size(); ++i) {
      auto [lo, hi] = at::vec::convert_to_float<T>(Narrow::loadu(src + i * Narrow::size()));
      dst[2 * i] = lo;
      dst[2 * i + 1] = hi;
    }
  }
}

struct Problem {
  int64_t batch, heads, kv_heads, group, dim, width, slots;
  float scale;
  int64_t q_stride, k_new_stride, v_new_stride;  // between sequences (heads are `dim` apart in every row)
};

// Softmax over each query head's `keys` scores in place, whole vectors only: rows are `stride` apart (a
// multiple of the vector width) and the tail past `keys` is overwritten. totals[g]: head g's sum of exponentials.
inline void softmax_rows(float* scores, int64_t group, int64_t keys, int64_t stride, float* totals) {
  for (int64_t g = 0; g < group; ++g) {
    float* x = scores + g * stride;
    std::fill(x + keys, x + stride, -std::numeric_limits<float>::infinity());  // exp(-inf - top) = 0
    Vec top_v(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s < stride; s += kLanes) top_v = at::vec::maximum(top_v, Vec::loadu(x + s));
    const Vec top(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, top_v));
    Vec sum(0.f);
    for (int64_t s = 0; s < stride; s += kLanes) {
      Vec e = (Vec::loadu(x + s) - top).exp();
      e.store(x + s);
      sum = sum + e;
    }
    totals[g] = hsum(sum);
  }
}

// Pool rows are scattered (slots are handed out as requests come and go), so each row's cache lines
// are requested a few keys ahead of use; a task takes one sequence and reads whole slot rows (every
// KV head), which keeps the reads of a row together.
constexpr int64_t kPrefetchAhead = 16;

template <typename T>
inline void prefetch_row(const Problem& p, const int64_t* rows, int64_t s, int64_t cached, const T* cache) {
  if (s >= cached) return;
  const int64_t slot = rows[s];
  if (slot < 0 || slot >= p.slots) return;
  const char* line = reinterpret_cast<const char*>(cache + slot * p.kv_heads * p.dim);
  const int64_t bytes = p.kv_heads * p.dim * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(line + offset);
}

// Key (or value) row `s` of sequence `b`: a pool row, or past the cached ones the new token's own.
template <typename T>
inline const T* row_of(const Problem& p, const int64_t* rows, int64_t s, int64_t cached, const T* cache,
                       const T* fresh, int64_t fresh_stride, int64_t b) {
  if (s == cached) return fresh + b * fresh_stride;
  const int64_t slot = rows[s];
  TORCH_CHECK(slot >= 0 && slot < p.slots, "kv_index holds slot ", slot, " outside the pool of ", p.slots);
  return cache + slot * p.kv_heads * p.dim;
}

// visit(s, row) for each of sequence b's cached pool rows, then for its new token's row (s == cached),
// with the pool rows prefetched kPrefetchAhead keys ahead.
template <typename T, typename Visit>
inline void for_each_row(const Problem& p, const int64_t* rows, int64_t cached, const T* cache, const T* fresh,
                         int64_t fresh_stride, int64_t b, Visit&& visit) {
  for (int64_t s = 0; s < std::min(kPrefetchAhead, cached); ++s) prefetch_row(p, rows, s, cached, cache);
  for (int64_t s = 0; s <= cached; ++s) {
    prefetch_row(p, rows, s + kPrefetchAhead, cached, cache);
    visit(s, row_of(p, rows, s, cached, cache, fresh, fresh_stride, b));
  }
}

// Head sizes known at compile time: a head's row lives in registers. Query head `h * group + g`
// reads KV head `h`; scores are [heads, keys].
template <typename T, int64_t kDim>
void attend_sequence(const Problem& p, const T* q, const T* kn, const T* vn, const T* kc, const T* vc,
                     const int64_t* rows, int64_t cached, int64_t b, T* out, std::vector<float>& scores) {
  constexpr int64_t kVecs = kDim / kLanes;
  const int64_t heads = p.heads, group = p.group, keys = cached + 1;
  std::vector<Vec> query(heads * kVecs), acc(heads * kVecs, Vec(0.f));
  for (int64_t qh = 0; qh < heads; ++qh) {
    load_row<T, kDim>(q + b * p.q_stride + qh * kDim, query.data() + qh * kVecs);
    for (int64_t i = 0; i < kVecs; ++i) query[qh * kVecs + i] = query[qh * kVecs + i] * Vec(p.scale);
  }
  const int64_t stride = (keys + kLanes - 1) / kLanes * kLanes;
  scores.resize(heads * stride);
  Vec row[kVecs];
  for_each_row(p, rows, cached, kc, kn, p.k_new_stride, b, [&](int64_t s, const T* key) {
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      load_row<T, kDim>(key + h * kDim, row);
      for (int64_t qh = h * group; qh < (h + 1) * group; ++qh) {
        const Vec* qv = query.data() + qh * kVecs;
        Vec dot = qv[0] * row[0];
        for (int64_t i = 1; i < kVecs; ++i) dot = at::vec::fmadd(qv[i], row[i], dot);
        scores[qh * stride + s] = hsum(dot);
      }
    }
  });
  std::vector<float> totals(heads);
  softmax_rows(scores.data(), heads, keys, stride, totals.data());
  for_each_row(p, rows, cached, vc, vn, p.v_new_stride, b, [&](int64_t s, const T* value) {
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      load_row<T, kDim>(value + h * kDim, row);
      for (int64_t qh = h * group; qh < (h + 1) * group; ++qh) {
        const Vec weight(scores[qh * stride + s]);
        Vec* a = acc.data() + qh * kVecs;
        for (int64_t i = 0; i < kVecs; ++i) a[i] = at::vec::fmadd(weight, row[i], a[i]);
      }
    }
  });
  for (int64_t qh = 0; qh < heads; ++qh) {
    float values[kDim];
    const Vec inv(1.f / totals[qh]);
    for (int64_t i = 0; i < kVecs; ++i) (acc[qh * kVecs + i] * inv).store(values + i * kLanes);
    T* o = out + (b * heads + qh) * kDim;
    for (int64_t d = 0; d < kDim; ++d) o[d] = static_cast<T>(values[d]);
  }
}

// Any head size: the same arithmetic through float scratch rows.
template <typename T>
void attend_sequence_any(const Problem& p, const T* q, const T* kn, const T* vn, const T* kc, const T* vc,
                         const int64_t* rows, int64_t cached, int64_t b, T* out, std::vector<float>& scores) {
  const int64_t heads = p.heads, group = p.group, dim = p.dim, keys = cached + 1;
  std::vector<float> query(heads * dim), acc(heads * dim, 0.f), totals(heads);
  for (int64_t i = 0; i < heads * dim; ++i) query[i] = static_cast<float>(q[b * p.q_stride + i]) * p.scale;
  const int64_t stride = (keys + kLanes - 1) / kLanes * kLanes;
  scores.resize(heads * stride);
  for_each_row(p, rows, cached, kc, kn, p.k_new_stride, b, [&](int64_t s, const T* key) {
    for (int64_t qh = 0; qh < heads; ++qh) {
      const T* k = key + (qh / group) * dim;
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += query[qh * dim + d] * static_cast<float>(k[d]);
      scores[qh * stride + s] = dot;
    }
  });
  softmax_rows(scores.data(), heads, keys, stride, totals.data());
  for_each_row(p, rows, cached, vc, vn, p.v_new_stride, b, [&](int64_t s, const T* value) {
    for (int64_t qh = 0; qh < heads; ++qh) {
      const T* v = value + (qh / group) * dim;
      for (int64_t d = 0; d < dim; ++d) acc[qh * dim + d] += scores[qh * stride + s] * static_cast<float>(v[d]);
    }
  });
  for (int64_t qh = 0; qh < heads; ++qh)
    for (int64_t d = 0; d < dim; ++d)
      out[(b * heads + qh) * dim + d] = static_cast<T>(acc[qh * dim + d] / totals[qh]);
}

template <typename T>
void attend(const Problem& p, const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& kv_index,
            const at::Tensor& kv_lens, at::Tensor& out) {
  const T* q_ptr = q.data_ptr<T>();
  const T* kn = k_new.data_ptr<T>();
  const T* vn = v_new.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  const int64_t* index = kv_index.data_ptr<int64_t>();
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t cached = std::min(std::max<int64_t>(lens[b], 0), p.width);
      const int64_t* rows = index + b * p.width;
      if constexpr (!std::is_same_v<T, double>) {
        if (p.dim == 64) {
          attend_sequence<T, 64>(p, q_ptr, kn, vn, kc, vc, rows, cached, b, out_ptr, scores);
          continue;
        }
        if (p.dim == 128) {
          attend_sequence<T, 128>(p, q_ptr, kn, vn, kc, vc, rows, cached, b, out_ptr, scores);
          continue;
        }
      }
      attend_sequence_any<T>(p, q_ptr, kn, vn, kc, vc, rows, cached, b, out_ptr, scores);
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_new, at::Tensor v_new, at::Tensor k_cache,
                                  at::Tensor v_cache, at::Tensor kv_index, at::Tensor kv_lens, double scaling) {
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3, "q, k_new, v_new must be [batch, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.dim() == 3, "k_cache, v_cache must be [slots, kv_heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  TORCH_CHECK(q.size(1) % k_new.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(kv_index.scalar_type() == at::kLong && kv_lens.scalar_type() == at::kLong, "kv_index, kv_lens: int64");
  TORCH_CHECK(kv_index.dim() == 2 && kv_index.size(0) == q.size(0) && kv_lens.size(0) == q.size(0),
              "one kv_index row and one length per sequence");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share one dtype");
  // rows may sit inside wider ones (q, k and v are views of the fused qkv output): only each row's heads
  // must be contiguous
  const auto rows_readable = [](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) == t.size(2); };
  if (!rows_readable(q)) q = q.contiguous();
  k_new = k_new.to(q.scalar_type());
  v_new = v_new.to(q.scalar_type());
  if (!rows_readable(k_new)) k_new = k_new.contiguous();
  if (!rows_readable(v_new)) v_new = v_new.contiguous();
  kv_index = kv_index.contiguous();
  kv_lens = kv_lens.contiguous();
  const Problem p{q.size(0),        q.size(1),       k_new.size(1),       q.size(1) / k_new.size(1),
                  q.size(2),        kv_index.size(1), k_cache.size(0),     static_cast<float>(scaling),
                  q.stride(0),      k_new.stride(0), v_new.stride(0)};
  at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    attend<scalar_t>(p, q, k_new, v_new, k_cache, v_cache, kv_index, kv_lens, out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(sglite, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
