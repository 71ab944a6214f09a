// How every operator runs (docs/ARCHITECTURE.md): its entry in
// csrc/<family>/front.h is the op's front. It validates every argument (the
// messages of csrc/checks.h), builds the tables, computes the output geometry,
// allocates the output and fills a plan; then `run(plan)` hands the plan to
// the backend of its device: `run_cpu(plan)` (csrc/<family>/cpu.cpp) or
// `run_cuda(plan)` (csrc/<family>/cuda.cu). The backends never check
// arguments, so CPU and CUDA check the same things in the same order by
// construction. What only a kernel can see (the values: invalid codes,
// non-finite inputs) comes back from `run` as a flag, and the front raises
// the one message for it.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace dnateq {

// run_cpu / run_cuda are overloads on the plan type, found by ADL (plans
// live in namespace dnateq).
template <class Plan>
auto run(const Plan& p) -> decltype(run_cpu(p)) {
#ifdef DNATEQ_WITH_CUDA
  if (p.device.is_cuda()) return run_cuda(p);
#endif
  TORCH_CHECK(p.device.is_cpu(), "dnateq: no kernel for tensors on ", p.device);
  return run_cpu(p);
}

}  // namespace dnateq
