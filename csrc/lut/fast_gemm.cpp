// The LUT fast path for 9..kFastMaxRows activation rows (issue 13): the
// AVX-512 GEMV kernels of fast_avx512.cpp (weight levels in registers, fp32
// FMA, flushed to double every 4096 inputs) on blocks of 8 activation rows.
// A task takes a block of weight rows sized for L2 and runs every row block
// of x against it, so the packed weights are read from memory once per call
// and each 8-row block of x stays in L1/L2 while it is reused; no float copy
// of the weights is made. Each output gets the arithmetic of the GEMV path
// for a block of that many rows.
#include <ATen/Parallel.h>

#include <algorithm>

#include "lut/fast_layout.h"
#include "lut/fast_lut.h"

namespace dnateq {
namespace cpu {

void gemm_rows_avx512(const fast::GemvArgs& a_in, int64_t M, int64_t N) {
  // Weight rows per cache block: about 192 KiB of layout bytes, a multiple of
  // 4 (the kernels' largest row block).
  const int64_t rows = std::clamp<int64_t>((int64_t{192} << 10) / std::max<int64_t>(a_in.row_bytes, 1)
                                               / 4 * 4, 4, 1024);
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(rows, (N / (2 * threads) + 3) / 4 * 4);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t c0 = n0; c0 < n1; c0 += rows) {
      const int64_t c1 = std::min(n1, c0 + rows);
      for (int64_t m0 = 0; m0 < M; m0 += fast::kGemvRows) {
        fast::GemvArgs a = a_in;
        a.M = static_cast<int>(std::min<int64_t>(fast::kGemvRows, M - m0));
        a.x = a_in.x + m0 * a_in.Kp;
        a.y = a_in.y + m0 * a_in.ldy;
        fast::gemv_avx512(a, c0, c1);
      }
    }
  });
}

}  // namespace cpu
}  // namespace dnateq
