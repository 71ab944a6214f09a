// Sorted magnitudes with prefix sums: the exact O(2^n log N) error of any
// candidate (alpha, S, beta, n) (SPEC section 2). Used by exp_fit and
// exp_error on the CPU, and by the CUDA exp_fit after it sorts on the device.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "format.h"

namespace dnateq {
namespace cpu {

class SortedMagnitudes {
 public:
  // |x| of the nonzero elements of x (any supported float dtype), sorted;
  // throws naming `arg` if x has non-finite values.
  SortedMagnitudes(const at::Tensor& x, const char* arg);
  // From magnitudes already sorted ascending (all > 0, finite).
  explicit SortedMagnitudes(std::vector<float> sorted);

  int64_t size() const { return static_cast<int64_t>(m_.size()); }
  float lo() const { return m_.front(); }
  float hi() const { return m_.back(); }
  double total() const { return prefix_.back(); }
  // sum | |x| - level | over all elements for the tables' quantizer.
  double abs_error(const ExpTables& t) const;
  // RMAE = abs_error / sum |x| (0 for an all-zero tensor).
  double rmae(const ExpTables& t) const;

 private:
  void build_prefix();
  std::vector<float> m_;
  std::vector<double> prefix_;  // prefix_[i] = sum of the first i magnitudes
};

}  // namespace cpu
}  // namespace dnateq
