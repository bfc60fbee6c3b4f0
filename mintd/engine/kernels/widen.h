// Shared by mintd's CPU kernels: a bfloat16 read as float32 (its 16 bits are float32's high half).
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <cstring>

namespace mintd {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace mintd
