// Routes each kernel call to the backend of the device it runs on. Validation happens here, once,
// so both backends see only well-formed parameters.
#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/checks.hpp>
#include <ringcast/kernels/layout.hpp>

#include <cstring>

#include "dispatch_checks.hpp"
#include "cpu/attention_cpu.hpp"
#include "cpu/checks_cpu.hpp"
#include "cpu/layout_cpu.hpp"
#if RINGCAST_WITH_CUDA
#include "cuda/attention_cuda.hpp"
#include "cuda/checks_cuda.hpp"
#include "cuda/layout_cuda.hpp"
#endif

namespace ringcast::kernels {
std::size_t attention_forward_workspace_bytes(const AttentionShape& shape, const ExecContext& ctx) {
  RINGCAST_ROUTE(ctx, attention_forward_workspace_bytes, (shape), (shape));
}

std::size_t attention_backward_workspace_bytes(const AttentionShape& shape, const ExecContext& ctx) {
  RINGCAST_ROUTE(ctx, attention_backward_workspace_bytes, (shape), (shape));
}

void attention_forward(const AttentionForwardParams& p, const ExecContext& ctx) {
  validate(p, ctx.device.kind);
  RINGCAST_CHECK(p.workspace_bytes >= attention_forward_workspace_bytes(p.shape, ctx),
                 "attention forward: workspace of {} bytes is smaller than the {} bytes required",
                 p.workspace_bytes, attention_forward_workspace_bytes(p.shape, ctx));
  RINGCAST_ROUTE(ctx, attention_forward, (p), (p, ctx.stream));
}

void attention_backward(const AttentionBackwardParams& p, const ExecContext& ctx) {
  validate(p.fwd, ctx.device.kind);
  RINGCAST_CHECK(p.d_o && p.d_q && p.d_k_pages && p.d_v_pages && p.transposed.offsets,
                 "attention backward: d_o, d_q, d_k_pages, d_v_pages and the transposed table are required");
  RINGCAST_CHECK(p.workspace_bytes >= attention_backward_workspace_bytes(p.fwd.shape, ctx),
                 "attention backward: workspace of {} bytes is smaller than the {} bytes required",
                 p.workspace_bytes, attention_backward_workspace_bytes(p.fwd.shape, ctx));
  RINGCAST_ROUTE(ctx, attention_backward, (p), (p, ctx.stream));
}

void merge_by_lse(const MergeParams& p, const ExecContext& ctx) {
  RINGCAST_CHECK(p.o_acc && p.lse_acc && p.o_part && p.lse_part, "merge_by_lse: null buffer");
  RINGCAST_ROUTE(ctx, merge_by_lse, (p), (p, ctx.stream));
}

void copy_strided(const StridedCopy& c, const ExecContext& ctx) {
  RINGCAST_CHECK(c.src && c.dst, "copy_strided: null buffer");
  RINGCAST_ROUTE(ctx, copy_strided, (c), (c, ctx.stream));
}

void fill_zero(void* dst, std::size_t bytes, const ExecContext& ctx) {
  if (bytes == 0) return;
  if (ctx.device.kind == DeviceKind::kCpu) {
    std::memset(dst, 0, bytes);
    return;
  }
  RINGCAST_ON_CUDA(fill_zero, (dst, bytes, ctx.stream));
}

void count_nonfinite(const void* x, DType dtype, std::int64_t n, std::int64_t* counter, const ExecContext& ctx) {
  RINGCAST_CHECK(counter && (x || n == 0), "count_nonfinite: null buffer");
  RINGCAST_ROUTE(ctx, count_nonfinite, (x, dtype, n, counter), (x, dtype, n, counter, ctx.stream));
}

}  // namespace ringcast::kernels
