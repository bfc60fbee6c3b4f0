// Decode attention straight over the paged KV cache, for CPU: one query per sequence (its query group
// per KV head) against the sequence's own blocks, read where they lie. The torch path gathers each
// sequence's blocks into a padded copy and runs SDPA over it, so it reads the keys three times (gather,
// write, SDPA) and pads to the longest sequence; this reads each real key and value once.
// Scores and the weighted sum accumulate in float32, as CPU SDPA does. Built at first use by
// mintd/engine/kernels/__init__.py; registered as torch.ops.mintd.paged_decode.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>
#include <vector>

#include "widen.h"

namespace {

using mintd::widen;

// One sequence at a time (threads split the sequences): each cache row is read whole and in order, all
// KV heads together, block after block, so the hardware prefetcher streams it; walking one head's slice
// of every row (a 128-byte read every 512 bytes) was 4-6x slower on keys not in cache.
template <typename T>
void decode(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
            const at::Tensor& blocks, const at::Tensor& lengths, int64_t block_size, double scale,
            at::Tensor& out) {
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), group = heads / kv_heads, dim_v = values.size(2);
  const int64_t width = blocks.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = keys.data_ptr<T>();
  const T* vp = values.data_ptr<T>();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * dim), acc(heads * dim_v), scores;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t len = lp[s];
      // the pool row of the sequence's position p
      const auto row_of = [&](int64_t p) { return bp[s * width + p / block_size] * block_size + p % block_size; };
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] = widen(qp[s * heads * dim + i]) * fscale;
      scores.resize(heads * len);  // [heads, len]
      for (int64_t p = 0; p < len; ++p) {
        const T* k = kp + row_of(p) * kv_heads * dim;  // the row: kv_heads x dim, contiguous
        for (int64_t h = 0; h < heads; ++h) {
          const float* qh = qf.data() + h * dim;
          const T* kh = k + (h / group) * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qh[d] * widen(kh[d]);
          scores[h * len + p] = dot;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* sh = scores.data() + h * len;
        float top = -INFINITY;
        for (int64_t p = 0; p < len; ++p) top = std::max(top, sh[p]);
#pragma omp simd
        for (int64_t p = 0; p < len; ++p) sh[p] = std::exp(sh[p] - top);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t p = 0; p < len; ++p) sum += sh[p];
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < len; ++p) sh[p] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < len; ++p) {
        const T* v = vp + row_of(p) * kv_heads * dim_v;
        for (int64_t h = 0; h < heads; ++h) {
          const float w = scores[h * len + p];
          const T* vh = v + (h / group) * dim_v;
          float* ah = acc.data() + h * dim_v;
#pragma omp simd
          for (int64_t d = 0; d < dim_v; ++d) ah[d] += w * widen(vh[d]);
        }
      }
      for (int64_t i = 0; i < heads * dim_v; ++i) op[s * heads * dim_v + i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& blocks, const at::Tensor& lengths, int64_t block_size,
                        double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.dim() == 3, "paged_decode: q [S, H, D], pools [rows, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type(), "paged_decode: one dtype");
  TORCH_CHECK(q.size(1) % keys.size(1) == 0, "paged_decode: heads must be a multiple of KV heads");
  TORCH_CHECK(keys.size(0) == values.size(0) && keys.size(1) == values.size(1) && q.size(2) == keys.size(2),
              "paged_decode: keys and values must be pools of the same rows, and match q");
  TORCH_CHECK(blocks.dim() == 2 && lengths.dim() == 1 && blocks.size(0) == q.size(0) && lengths.size(0) == q.size(0),
              "paged_decode: blocks [S, width], lengths [S]");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "paged_decode: int64 indices");
  auto qc = q.contiguous();
  auto kc = keys.contiguous();
  auto vc = values.contiguous();
  auto bc = blocks.contiguous();
  auto lc = lengths.contiguous();
  // every read stays inside the pools: lengths within the blocks given, blocks within the pool
  const int64_t pool_blocks = keys.size(0) / block_size, width = bc.size(1);
  const int64_t* lp = lc.data_ptr<int64_t>();
  const int64_t* bp = bc.data_ptr<int64_t>();
  for (int64_t s = 0; s < bc.size(0); ++s) {
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= width * block_size, "paged_decode: a length outside its blocks");
    for (int64_t j = 0; j < (lp[s] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(bp[s * width + j] >= 0 && bp[s * width + j] < pool_blocks, "paged_decode: a block outside the pool");
  }
  auto out = at::empty({q.size(0), q.size(1), values.size(2)}, q.options());
  if (q.scalar_type() == at::kBFloat16)
    decode<at::BFloat16>(qc, kc, vc, bc, lc, block_size, scale, out);
  else if (q.scalar_type() == at::kFloat)
    decode<float>(qc, kc, vc, bc, lc, block_size, scale, out);
  else
    TORCH_CHECK(false, "paged_decode: float32 or bfloat16");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mintd, m) {
  m.def("paged_decode(Tensor q, Tensor keys, Tensor values, Tensor blocks, Tensor lengths, int block_size, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(mintd, CPU, m) { m.impl("paged_decode", &paged_decode); }
