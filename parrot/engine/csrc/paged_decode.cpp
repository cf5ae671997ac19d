// Decode attention over the paged KV cache, read in place (no gather), for the CPU.
//
// One query row per sequence attends to the sequence's first context_len KV entries, found
// through its block table. Work is split into (sequence, KV head, partition of the context)
// tasks; each task reads its blocks once for all G query heads of its KV head and keeps an
// unnormalized output with its max score and sum of exponentials, and a second pass merges a
// row's partitions. Caches in float32 or bfloat16 (a float32 one read in place); math in float32; the result of a row depends
// only on that row (batch-invariant, so greedy decoding repeats).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16.h"

namespace {

// Built with -ffast-math, which lets the compiler assume no infinities: empty partitions and
// rows are told by their zero sums, never by comparing with -inf (only stored, for callers).
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr int64_t kPartitionTokens = 512;

using parrot_kernels::widen;

// Walks the entries lo..hi of one KV head of a sequence, block by block through its table,
// calling visit(row, entry - lo) with the entry's D values in float32: read in place from a
// float32 cache, widened into `scratch` from a bfloat16 one.
template <typename KV, int D, typename Visit>
inline void for_each_row(const KV* head, const int64_t* table, int64_t lo, int64_t hi, int64_t bs, float* scratch, Visit&& visit) {
  for (int64_t start = lo, blk = lo / bs; start < hi; start += bs, ++blk) {
    const int64_t count = std::min(bs, hi - start);
    const KV* rows = head + table[blk] * bs * D;
    // The hardware prefetcher stops at page edges and the next block is elsewhere: its rows are
    // asked for a row at a time as this block's are read. A whole block asked for at once
    // overflowed the core's outstanding misses (2x slower: 3.7 against 1.8 ms a layer for 32
    // rows of 576 tokens on a 2-core Xeon, 8 against 16 GB/s)
    const char* next = start + bs < hi ? reinterpret_cast<const char*>(head + table[blk + 1] * bs * D) : nullptr;
    constexpr int64_t row_bytes = D * int64_t(sizeof(KV));
    for (int64_t i = 0; i < count; ++i) {
      if (next != nullptr)
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(next + i * row_bytes + off);
      if constexpr (std::is_same_v<KV, float>) {
        visit(rows + i * D, start - lo + i);
      } else {
        for (int d = 0; d < D; ++d) scratch[d] = widen(rows[i * D + d]);
        visit(static_cast<const float*>(scratch), start - lo + i);
      }
    }
  }
}

struct Shape {
  int64_t B, H, Hkv, NB, bs, W, P, span;
  float scale;
};

// part: [B, Hkv, P, G, D + 2] floats: the unnormalized output, then max score, then sum of exp.
// G is a compile-time constant so that a task's G query rows and G output rows stay in registers.
template <typename KV, int D, int G>
void attend_partitions(const float* __restrict q, const KV* __restrict kc, const KV* __restrict vc, const int64_t* tables,
                       const int64_t* lens, float* __restrict part, const Shape& s) {
  at::parallel_for(0, s.B * s.Hkv * s.P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    alignas(64) float scratch[D];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (s.Hkv * s.P), h = (task / s.P) % s.Hkv, p = task % s.P;
      const int64_t lo = p * s.span, hi = std::min(lens[b], lo + s.span);
      float* slot = part + task * G * (D + 2);
      if (lo >= hi) {
        for (int64_t g = 0; g < G; ++g) {
          slot[g * (D + 2) + D] = kLowest;
          slot[g * (D + 2) + D + 1] = 0.f;
        }
        continue;
      }
      const int64_t n = hi - lo;
      scores.resize(G * n);
      float* __restrict sc = scores.data();
      alignas(64) float qs[G][D];
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) qs[g][d] = q[(b * s.H + h * G + g) * D + d] * s.scale;
      const KV* kh = kc + h * s.NB * s.bs * D;
      const KV* vh = vc + h * s.NB * s.bs * D;
      const int64_t* table = tables + b * s.W;
      for_each_row<KV, D>(kh, table, lo, hi, s.bs, scratch, [&](const float* __restrict row, int64_t i) {
        for (int g = 0; g < G; ++g) {
          float dot = 0.f;
          for (int d = 0; d < D; ++d) dot += qs[g][d] * row[d];
          sc[g * n + i] = dot;
        }
      });
      for (int g = 0; g < G; ++g) {
        float* sg = sc + g * n;
        const float top = *std::max_element(sg, sg + n);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          sg[i] = std::exp(sg[i] - top);
          sum += sg[i];
        }
        slot[g * (D + 2) + D] = top;
        slot[g * (D + 2) + D + 1] = sum;
      }
      alignas(64) float acc[G][D] = {};
      for_each_row<KV, D>(vh, table, lo, hi, s.bs, scratch, [&](const float* __restrict row, int64_t i) {
        for (int g = 0; g < G; ++g) {
          const float w = sc[g * n + i];
          for (int d = 0; d < D; ++d) acc[g][d] += w * row[d];
        }
      });
      for (int g = 0; g < G; ++g) std::memcpy(slot + g * (D + 2), acc[g], D * sizeof(float));
    }
  });
}

// out [B, H, D], lse [B, H]: a row with no KV gets zeros and -inf
template <int D>
void merge_partitions(const float* part, float* out, float* lse, const Shape& s) {
  const int64_t G = s.H / s.Hkv, stride = G * (D + 2);
  at::parallel_for(0, s.B * s.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / s.H, head = r % s.H, h = head / G, g = head % G;
      const float* base = part + (b * s.Hkv + h) * s.P * stride + g * (D + 2);
      float top = kLowest;
      bool empty = true;
      for (int64_t p = 0; p < s.P; ++p) {
        if (base[p * stride + D + 1] == 0.f) continue;
        top = std::max(top, base[p * stride + D]);
        empty = false;
      }
      float* o = out + r * D;
      std::fill(o, o + D, 0.f);
      if (empty) {
        lse[r] = kNegInf;
        continue;
      }
      float total = 0.f;
      for (int64_t p = 0; p < s.P; ++p) {
        const float* slot = base + p * stride;
        if (slot[D + 1] == 0.f) continue;
        const float w = std::exp(slot[D] - top);
        total += w * slot[D + 1];
        for (int d = 0; d < D; ++d) o[d] += w * slot[d];
      }
      const float inv = 1.f / total;
      for (int d = 0; d < D; ++d) o[d] *= inv;
      lse[r] = top + std::log(total);
    }
  });
}

template <typename KV, int D>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
         const at::Tensor& lens, at::Tensor& part, at::Tensor& out, at::Tensor& lse, const Shape& s) {
  auto attend = [&](auto group) {
    attend_partitions<KV, D, decltype(group)::value>(q.data_ptr<float>(), k_cache.data_ptr<KV>(), v_cache.data_ptr<KV>(),
                                                     tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), part.data_ptr<float>(), s);
  };
  switch (s.H / s.Hkv) {
    case 1: attend(std::integral_constant<int, 1>{}); break;
    case 2: attend(std::integral_constant<int, 2>{}); break;
    case 3: attend(std::integral_constant<int, 3>{}); break;
    case 4: attend(std::integral_constant<int, 4>{}); break;
    case 5: attend(std::integral_constant<int, 5>{}); break;
    case 6: attend(std::integral_constant<int, 6>{}); break;
    case 7: attend(std::integral_constant<int, 7>{}); break;
    case 8: attend(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "paged_decode: ", s.H / s.Hkv, " query heads per KV head is not compiled in (1-8; split larger groups)");
  }
  merge_partitions<D>(part.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(), s);
}

std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                const at::Tensor& block_tables, const at::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "caches: contiguous [Hkv, num_blocks, block_size, D], K and V alike");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches of one dtype");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block tables: contiguous int64 [B, W]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == at::kLong && context_lens.is_contiguous(),
              "context lens: contiguous int64 [B]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(0), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0, "head counts or sizes of q and the caches disagree");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "one block table and length per query row");
  const int64_t longest = B ? context_lens.max().item<int64_t>() : 0;
  TORCH_CHECK(longest <= block_tables.size(1) * bs, "a context is longer than its block table");
  // Long contexts are split so that a small batch keeps every thread busy. The split points are
  // fixed positions, not a function of the batch: a row's sums then run in the same order
  // whatever else is in the step.
  const int64_t span = (kPartitionTokens + bs - 1) / bs * bs;
  const int64_t P = std::max<int64_t>(1, (longest + span - 1) / span);
  const Shape s{B, H, Hkv, k_cache.size(1), bs, block_tables.size(1), P, span, 1.f / std::sqrt(float(D))};
  auto out = at::empty({B, H, D}, q.options());
  auto lse = at::empty({B, H}, q.options());
  auto part = at::empty({B, Hkv, P, H / Hkv, D + 2}, q.options());
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || k_cache.scalar_type() == at::kFloat, "caches: float32 or bfloat16");
  switch (D) {
    case 64:
      bf16 ? run<at::BFloat16, 64>(q, k_cache, v_cache, block_tables, context_lens, part, out, lse, s)
           : run<float, 64>(q, k_cache, v_cache, block_tables, context_lens, part, out, lse, s);
      break;
    case 128:
      bf16 ? run<at::BFloat16, 128>(q, k_cache, v_cache, block_tables, context_lens, part, out, lse, s)
           : run<float, 128>(q, k_cache, v_cache, block_tables, context_lens, part, out, lse, s);
      break;
    default:
      TORCH_CHECK(false, "paged_decode: head_dim ", D, " is not compiled in (64 or 128)");
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(parrot_kernels, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens) -> (Tensor, Tensor)");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
