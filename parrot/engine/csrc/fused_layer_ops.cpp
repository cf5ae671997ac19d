// Element-wise parts of a decoder layer, fused, for CPUs where the matmuls run in bf16 on
// oneDNN's packed weights. Each op reads a matmul's bf16 output, computes in float32 and
// writes the next matmul's bf16 input, in one pass: in PyTorch operators the same work is
// ~25 small kernels a layer (conversions, the norm's five steps, RoPE's four), which at one
// row cost as much as a fifth of the step. Rows are independent (batch-invariant).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "bf16.h"

namespace {

using parrot_kernels::narrow;
using parrot_kernels::widen;

constexpr int64_t kRowsGrain = 8;

void check_rows(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && t.is_contiguous(), name, ": contiguous 2-d ", dtype);
}

// out[r] = bf16(hidden[r] / rms(hidden[r]) * weight), after hidden[r] += delta[r] when delta is given
at::Tensor rms_norm_bf16(const at::Tensor& hidden, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps) {
  check_rows(hidden, at::kFloat, "hidden");
  const int64_t N = hidden.size(0), C = hidden.size(1);
  TORCH_CHECK(weight.numel() == C && weight.scalar_type() == at::kFloat && weight.is_contiguous(), "weight: float32 [C]");
  const at::BFloat16* add = nullptr;
  if (delta.has_value()) {
    check_rows(*delta, at::kBFloat16, "delta");
    TORCH_CHECK(delta->size(0) == N && delta->size(1) == C, "delta: the shape of hidden");
    add = delta->data_ptr<at::BFloat16>();
  }
  auto out = at::empty({N, C}, hidden.options().dtype(at::kBFloat16));
  float* h = hidden.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, kRowsGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = h + r * C;
      if (add != nullptr)
        for (int64_t c = 0; c < C; ++c) row[c] += widen(add[r * C + c]);
      float squares = 0.f;
      for (int64_t c = 0; c < C; ++c) squares += row[c] * row[c];
      const float scale = 1.f / std::sqrt(squares / float(C) + float(eps));
      for (int64_t c = 0; c < C; ++c) o[r * C + c] = narrow(row[c] * scale * w[c]);
    }
  });
  return out;
}

// qkv [N, (H + 2 Hkv) * D] bf16 -> q [N, H, D], k [N, Hkv, D] rotated (rotate-half RoPE at each
// row's position) and v [N, Hkv, D], all float32. cos/sin: [P, D/2] float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                                       const at::Tensor& positions, int64_t H, int64_t Hkv) {
  check_rows(qkv, at::kBFloat16, "qkv");
  check_rows(cos, at::kFloat, "cos");
  check_rows(sin, at::kFloat, "sin");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions: int64 [N]");
  const int64_t N = qkv.size(0), half = cos.size(1), D = 2 * half, P = cos.size(0);
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && positions.size(0) == N, "qkv: [N, (H + 2 Hkv) * D]");
  auto opts = qkv.options().dtype(at::kFloat);
  auto q = at::empty({N, H, D}, opts), k = at::empty({N, Hkv, D}, opts), v = at::empty({N, Hkv, D}, opts);
  const at::BFloat16* in = qkv.data_ptr<at::BFloat16>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  float *qo = q.data_ptr<float>(), *ko = k.data_ptr<float>(), *vo = v.data_ptr<float>();
  at::parallel_for(0, N, kRowsGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      TORCH_CHECK(pos[r] >= 0 && pos[r] < P, "position ", pos[r], " outside the RoPE table");
      const float* c = cs + pos[r] * half;
      const float* s = sn + pos[r] * half;
      const at::BFloat16* row = in + r * (H + 2 * Hkv) * D;
      for (int64_t head = 0; head < H + Hkv; ++head) {
        const at::BFloat16* x = row + head * D;
        float* y = head < H ? qo + (r * H + head) * D : ko + (r * Hkv + head - H) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = widen(x[i]), x2 = widen(x[i + half]);
          y[i] = x1 * c[i] - x2 * s[i];
          y[i + half] = x2 * c[i] + x1 * s[i];
        }
      }
      const at::BFloat16* vin = row + (H + Hkv) * D;
      for (int64_t i = 0; i < Hkv * D; ++i) vo[r * Hkv * D + i] = widen(vin[i]);
    }
  });
  return {q, k, v};
}

// gate_up [N, 2I] bf16 -> bf16(silu(gate) * up) [N, I]
at::Tensor silu_mul_bf16(const at::Tensor& gate_up) {
  check_rows(gate_up, at::kBFloat16, "gate_up");
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({N, I}, gate_up.options());
  const at::BFloat16* in = gate_up.data_ptr<at::BFloat16>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, kRowsGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; ++i) {
        const float g = widen(in[r * 2 * I + i]), u = widen(in[r * 2 * I + I + i]);
        o[r * I + i] = narrow(g / (1.f + std::exp(-g)) * u);
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(parrot_kernels, m) {
  m.def("rms_norm_bf16(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm_bf16", c10::DispatchKey::CPU, TORCH_FN(rms_norm_bf16));
  m.def("rope_qkv(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, int H, int Hkv) -> (Tensor, Tensor, Tensor)");
  m.impl("rope_qkv", c10::DispatchKey::CPU, TORCH_FN(rope_qkv));
  m.def("silu_mul_bf16(Tensor gate_up) -> Tensor");
  m.impl("silu_mul_bf16", c10::DispatchKey::CPU, TORCH_FN(silu_mul_bf16));
}
