// The LoRA deltas of a group of several adapters' tokens: y[t] += (x[t] A[s]^T) B[s] for token t's
// adapter s, from the adapters' rows of the weight bank, read in the bank's dtype (bfloat16: half the
// bytes of the float32 products it replaces, and no per-run tensors or masks). Products accumulate in
// float32; each token's output row is written once. Registered as torch.ops.mintd.lora_rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstdint>
#include <vector>

#include "widen.h"

namespace {

using mintd::widen;

template <typename T>
void rows(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& segment,
          at::Tensor& y) {
  const int64_t tokens = x.size(0), in = x.size(1), rank = a.size(1), out = b.size(2);
  const int64_t xs = x.stride(0), ys = y.stride(0), as = a.stride(0), bs = b.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const int64_t* sp = segment.data_ptr<int64_t>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), shrunk(rank), acc(out);
    for (int64_t t = begin; t < end; ++t) {
      const T* xr = xp + t * xs;
      for (int64_t d = 0; d < in; ++d) xf[d] = widen(xr[d]);
      const T* at_ = ap + sp[t] * as;
      for (int64_t j = 0; j < rank; ++j) {
        const T* aj = at_ + j * in;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < in; ++d) dot += xf[d] * widen(aj[d]);
        shrunk[j] = dot;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const T* bt = bp + sp[t] * bs;
      for (int64_t j = 0; j < rank; ++j) {
        const float w = shrunk[j];
        const T* bj = bt + j * out;
        float* accp = acc.data();
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) accp[o] += w * widen(bj[o]);
      }
      T* yr = yp + t * ys;
      for (int64_t o = 0; o < out; ++o) yr[o] = static_cast<T>(widen(yr[o]) + acc[o]);
    }
  });
}

void lora_rows(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& segment,
               at::Tensor y) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3 && b.dim() == 3, "lora_rows: x, y [T, n]; a, b [S, r, n]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.stride(2) == 1 && a.stride(1) == a.size(2) &&
              b.stride(2) == 1 && b.stride(1) == b.size(2), "lora_rows: rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == x.scalar_type() &&
              b.scalar_type() == x.scalar_type(), "lora_rows: one dtype");
  TORCH_CHECK(x.size(0) == y.size(0) && segment.dim() == 1 && segment.size(0) == x.size(0) &&
              segment.scalar_type() == at::kLong, "lora_rows: one int64 segment per token of x and y");
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(1) == b.size(1) && a.size(2) == x.size(1) && b.size(2) == y.size(1),
              "lora_rows: a [S, r, in] and b [S, r, out] must match x [T, in] and y [T, out]");
  auto seg = segment.contiguous();
  const int64_t* sp = seg.data_ptr<int64_t>();
  for (int64_t t = 0; t < seg.size(0); ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < a.size(0), "lora_rows: a segment outside a and b");
  if (x.scalar_type() == at::kBFloat16)
    rows<at::BFloat16>(x, a, b, seg, y);
  else if (x.scalar_type() == at::kFloat)
    rows<float>(x, a, b, seg, y);
  else
    TORCH_CHECK(false, "lora_rows: float32 or bfloat16");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mintd, m) {
  m.def("lora_rows(Tensor x, Tensor a, Tensor b, Tensor segment, Tensor(a!) y) -> ()");
}
TORCH_LIBRARY_IMPL(mintd, CPU, m) { m.impl("lora_rows", &lora_rows); }
