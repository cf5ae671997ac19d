// Conversions between float32 and bfloat16 that the CPU kernels share (widen is exact;
// narrow rounds to nearest even, as torch's .to(torch.bfloat16) does).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace parrot_kernels {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 -> bfloat16
inline at::BFloat16 narrow(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  at::BFloat16 out;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN (the rounding would carry it into an infinity or zero)
    out.x = uint16_t((bits >> 16) | 0x0040u);
    return out;
  }
  bits += 0x7fff + ((bits >> 16) & 1);
  out.x = uint16_t(bits >> 16);
  return out;
}

}  // namespace parrot_kernels
