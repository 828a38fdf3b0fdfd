// The clustered mode's transfers (clustered_internal.hpp). Messages between two ranks match in the
// order both sides list them: (element, KV head) order, then fetch order, K before V (pages, then
// page summaries and counts when they travel); a requester's fetch order is the layout's, and the
// owner answers in the order the request ids arrived.
#include "clustered_internal.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/memory.hpp>

#include <numeric>

namespace ringcast {

void strided_copy(const kernels::ExecContext& ctx, const float* src, float* dst, std::initializer_list<CopyDim> dims,
                  bool accumulate) {
  kernels::StridedCopy c;
  RINGCAST_CHECK(dims.size() <= kernels::StridedCopy::kMaxDims, "strided_copy: {} dimensions", dims.size());
  for (const CopyDim& dim : dims) {
    c.shape[c.ndim] = dim.size;
    c.src_strides[c.ndim] = dim.src_stride;
    c.dst_strides[c.ndim] = dim.dst_stride;
    ++c.ndim;
  }
  c.src = src;
  c.dst = dst;
  c.accumulate = accumulate;
  kernels::copy_strided(c, ctx);
}

void all_gather_coarse(comm::Communicator& comm, Stream stream, const ClusterGeometry& geo, int fields, int g0, int g1,
                       const float* send, float* recv) {
  const std::int64_t per_head = fields * geo.batch * geo.local_blocks * geo.head_dim;
  const auto count = static_cast<std::size_t>((g1 - g0) * per_head);
  comm.all_gather({send + g0 * per_head, count, DType::kF32},
                  {recv + g0 * geo.p * per_head, geo.p * count, DType::kF32}, stream);
}

void unpack_coarse(const kernels::ExecContext& ctx, const ClusterGeometry& geo, int fields, int g0, int g1,
                   const float* recv, const std::function<float*(int b, int g)>& dst) {
  const std::int64_t d = geo.head_dim, lb = geo.local_blocks, rows = geo.batch * lb;
  const std::int64_t per_head = fields * rows * d, per_rank = (g1 - g0) * per_head;
  const float* group = recv + g0 * geo.p * per_head;
  for (int b = 0; b < geo.batch; ++b)
    for (int g = g0; g < g1; ++g)
      strided_copy(ctx, group + (g - g0) * per_head + b * lb * d, dst(b, g),
                   {{fields, rows * d, geo.p * lb * d}, {geo.p, per_rank, lb * d}, {lb * d, 1, 1}});
}

void pack_coarse_gradients(const kernels::ExecContext& ctx, const ClusterGeometry& geo,
                           const std::function<const float*(int b, int g, int kv)>& src, float* send) {
  const std::int64_t d = geo.head_dim, lb = geo.local_blocks, rows = geo.batch * lb;
  const std::int64_t part = 2 * geo.kv_heads * rows * d;  // one rank's part: [2][kv_heads][rows][d]
  for (int b = 0; b < geo.batch; ++b)
    for (int g = 0; g < geo.kv_heads; ++g)
      for (int kv = 0; kv < 2; ++kv)
        strided_copy(ctx, src(b, g, kv), send + ((kv * geo.kv_heads + g) * rows + b * lb) * d,
                     {{geo.p, lb * d, part}, {lb * d, 1, 1}});
}

void reduce_scatter_coarse(comm::Communicator& comm, Stream stream, const ClusterGeometry& geo, const float* send,
                           float* recv) {
  const std::int64_t part = 2 * geo.kv_heads * geo.batch * geo.local_blocks * geo.head_dim;
  comm.reduce_scatter({send, static_cast<std::size_t>(geo.p * part), DType::kF32},
                      {recv, static_cast<std::size_t>(part), DType::kF32}, comm::ReduceOp::kSum, stream);
}

ClusteredTransfer::ClusteredTransfer(comm::Communicator& comm, const kernels::ExecContext& ctx,
                                     const ClusterGeometry& geometry, PoolView pools, std::span<std::int32_t> requests,
                                     CountView counts, DType pool_dtype)
    : comm_(comm), ctx_(ctx), g_(geometry), pools_(std::move(pools)), requests_(requests),
      counts_(std::move(counts)), dtype_(pool_dtype) {
  RINGCAST_CHECK(dtype_ == DType::kF32 || !g_.block_summaries,
                 "clustered mode: blocks that carry their page summaries travel as fp32 (got {})", dtype_name(dtype_));
}

void* ClusteredTransfer::page_data(int b, int g, int kv, std::int64_t page) const {
  return static_cast<char*>(pools_(b, g, kv)) + page * g_.page_elems * dtype_size(dtype_);
}

float* ClusteredTransfer::summary(int b, int g, int kv, const kernels::ClusteredLayout& L, std::int64_t page) const {
  return static_cast<float*>(page_data(b, g, kv, L.page_summary_first_page())) + page * g_.head_dim;
}

void ClusteredTransfer::send_block(std::vector<comm::SendOp>& ops, int peer, int b, int g,
                                   const kernels::ClusteredLayout& L, std::int64_t page, bool with_counts) const {
  const auto n = static_cast<std::size_t>(g_.block_elems);
  for (int kv = 0; kv < 2; ++kv) ops.push_back({peer, {page_data(b, g, kv, page), n, dtype_}});
  if (!g_.block_summaries) return;
  const auto m = static_cast<std::size_t>(g_.summary_elems());
  for (int kv = 0; kv < 2; ++kv) ops.push_back({peer, {summary(b, g, kv, L, page), m, DType::kF32}});
  if (with_counts)
    ops.push_back({peer, {counts_(b, g) + page, static_cast<std::size_t>(g_.coarse_pages), DType::kI32}});
}

void ClusteredTransfer::recv_block(std::vector<comm::RecvOp>& ops, int peer, int b, int g,
                                   const kernels::ClusteredLayout& L, std::int64_t page) const {
  const auto n = static_cast<std::size_t>(g_.block_elems);
  for (int kv = 0; kv < 2; ++kv) ops.push_back({peer, {page_data(b, g, kv, page), n, dtype_}});
  if (!g_.block_summaries) return;
  const auto m = static_cast<std::size_t>(g_.summary_elems());
  for (int kv = 0; kv < 2; ++kv) ops.push_back({peer, {summary(b, g, kv, L, page), m, DType::kF32}});
  ops.push_back({peer, {counts_(b, g) + page, static_cast<std::size_t>(g_.coarse_pages), DType::kI32}});
}

void ClusteredTransfer::recv_to_stage(std::vector<comm::RecvOp>& ops, std::vector<Landing>& landings,
                                      std::span<float> stage, int peer, int b, int g,
                                      const kernels::ClusteredLayout& L, std::int64_t page) const {
  const std::size_t slot = landings.size() * static_cast<std::size_t>(g_.stage_elems());
  RINGCAST_CHECK(slot + g_.stage_elems() <= stage.size(), "clustered mode: gradient stage too small ({} floats)",
                 stage.size());
  const auto n = static_cast<std::size_t>(g_.block_elems), m = static_cast<std::size_t>(g_.summary_elems());
  for (int kv = 0; kv < 2; ++kv) ops.push_back({peer, {stage.data() + slot + kv * n, n, DType::kF32}});
  for (int kv = 0; m > 0 && kv < 2; ++kv) ops.push_back({peer, {stage.data() + slot + 2 * n + kv * m, m, DType::kF32}});
  landings.push_back({b, g, &L, page});
}

void ClusteredTransfer::add_landed(const std::vector<Landing>& landings, std::span<const float> stage) const {
  RINGCAST_CHECK(dtype_ == DType::kF32, "clustered mode: gradients land in fp32 pools (got {})", dtype_name(dtype_));
  const std::int64_t n = g_.block_elems, m = g_.summary_elems();
  for (std::size_t i = 0; i < landings.size(); ++i) {
    const Landing& l = landings[i];
    const float* slot = stage.data() + i * g_.stage_elems();
    for (int kv = 0; kv < 2; ++kv) {
      strided_copy(ctx_, slot + kv * n, static_cast<float*>(page_data(l.b, l.g, kv, l.page)), {{n, 1, 1}},
                   /*accumulate=*/true);
      if (m > 0)
        strided_copy(ctx_, slot + 2 * n + kv * m, summary(l.b, l.g, kv, *l.layout, l.page), {{m, 1, 1}},
                     /*accumulate=*/true);
    }
  }
}

void ClusteredTransfer::shift_ints(std::span<const std::int32_t> send, std::span<std::int32_t> recv, int step) {
  RINGCAST_CHECK(send.size() + recv.size() <= requests_.size(),
                 "clustered mode: request scratch of {} ints cannot hold {} + {}", requests_.size(), send.size(),
                 recv.size());
  std::int32_t* out = requests_.data();
  std::int32_t* in = out + send.size();
  copy_from_host(out, send.data(), send.size_bytes(), ctx_.device, ctx_.stream);
  const comm::SendOp request{(g_.r + step) % g_.p, {out, send.size(), DType::kI32}};
  const comm::RecvOp incoming{(g_.r - step + g_.p) % g_.p, {in, recv.size(), DType::kI32}};
  comm_.exchange({&request, 1}, {&incoming, 1}, ctx_.stream);
  copy_to_host(recv.data(), in, recv.size_bytes(), ctx_.device, ctx_.stream);
}

std::int64_t halo_stage_elems(const ClusterGeometry& geo) {
  return geo.p > 1 ? halo_stage_block(geo, geo.causal ? 1 : 2, 0, 0) : 0;
}

std::int64_t halo_stage_block(const ClusterGeometry& geo, int side, int b, int kv) {
  return ((std::int64_t{side} * geo.batch + b) * 2 + kv) * geo.kv_heads * geo.block_elems;
}

void exchange_halo(comm::Communicator& comm, Stream stream, const ClusterGeometry& geo, DType dtype, const void* k,
                   const void* v, void* stage) {
  RINGCAST_CHECK(geo.halo, "clustered mode: exchange_halo() with a geometry that has no halo");
  const std::int64_t block = geo.kv_heads * geo.block_elems;  // one coarse block, every KV head
  const std::int64_t element = geo.local_blocks * block;
  const std::size_t elt = dtype_size(dtype);
  const bool before = geo.r > 0, after = !geo.causal && geo.r + 1 < geo.p;
  std::vector<comm::SendOp> sends;
  std::vector<comm::RecvOp> recvs;
  for (int b = 0; b < geo.batch; ++b)
    for (int kv = 0; kv < 2; ++kv) {
      const char* tokens = static_cast<const char*>(kv ? v : k) + b * element * elt;
      const auto slot = [&](int side) { return static_cast<char*>(stage) + halo_stage_block(geo, side, b, kv) * elt; };
      const auto n = static_cast<std::size_t>(block);
      if (geo.r + 1 < geo.p) sends.push_back({geo.r + 1, {tokens + (element - block) * elt, n, dtype}});
      if (!geo.causal && geo.r > 0) sends.push_back({geo.r - 1, {tokens, n, dtype}});
      if (before) recvs.push_back({geo.r - 1, {slot(0), n, dtype}});
      if (after) recvs.push_back({geo.r + 1, {slot(1), n, dtype}});
    }
  comm.exchange(sends, recvs, stream);
}

void ClusteredTransfer::exchange_requests(const ElementLayouts& layouts, std::vector<ServedRequests>& served) {
  served.assign(static_cast<std::size_t>(g_.p - 1), {});
  const std::size_t units = static_cast<std::size_t>(g_.batch) * g_.kv_heads;
  for (int s = 1; s < g_.p; ++s) {
    const int to = (g_.r + s) % g_.p;
    std::vector<std::int32_t> want_counts(units, 0), want_ids;
    for (int b = 0; b < g_.batch; ++b)
      for (int g = 0; g < g_.kv_heads; ++g)
        for (const std::int64_t id : layouts[b][g].fetched)
          if (g_.owner(id) == to) {
            ++want_counts[b * g_.kv_heads + g];
            want_ids.push_back(static_cast<std::int32_t>(id));
          }
    ServedRequests& sv = served[s - 1];
    sv.counts.assign(units, 0);
    shift_ints(want_counts, sv.counts, s);
    sv.ids.assign(static_cast<std::size_t>(std::accumulate(sv.counts.begin(), sv.counts.end(), std::int64_t{0})), 0);
    shift_ints(want_ids, sv.ids, s);
    sv.first.assign(units + 1, 0);
    std::partial_sum(sv.counts.begin(), sv.counts.end(), sv.first.begin() + 1);
  }
}

void ClusteredTransfer::transfer_blocks(const ElementLayouts& layouts, const std::vector<ServedRequests>& served,
                                        int b, int g) {
  const kernels::ClusteredLayout& L = layouts[b][g];
  const std::size_t unit = static_cast<std::size_t>(b) * g_.kv_heads + g;
  std::vector<comm::SendOp> sends;
  std::vector<comm::RecvOp> recvs;
  for (int s = 1; s < g_.p; ++s) {
    const int to = (g_.r + s) % g_.p, from = (g_.r - s + g_.p) % g_.p;
    const ServedRequests& sv = served[s - 1];
    for (std::int64_t i = sv.first[unit]; i < sv.first[unit + 1]; ++i) {
      const std::int64_t local = sv.ids[i] - g_.first_block;
      RINGCAST_CHECK(local >= 0 && local < g_.local_blocks,
                     "clustered mode: rank {} asked rank {} for block {}, which it does not hold", from, g_.r,
                     local + g_.first_block);
      send_block(sends, from, b, g, L, local * g_.coarse_pages, true);
    }
    for (const std::int64_t id : L.fetched)
      if (g_.owner(id) == to) recv_block(recvs, to, b, g, L, L.block_pool_page(id));
  }
  comm_.exchange(sends, recvs, ctx_.stream);
}

std::vector<ClusteredTransfer::Landing> ClusteredTransfer::return_gradients(const ElementLayouts& layouts,
                                                                           const std::vector<ServedRequests>& served,
                                                                           int b, int g, std::span<float> stage) {
  const kernels::ClusteredLayout& L = layouts[b][g];
  const std::size_t unit = static_cast<std::size_t>(b) * g_.kv_heads + g;
  std::vector<comm::SendOp> sends;
  std::vector<comm::RecvOp> recvs;
  std::vector<Landing> landings;
  if (g_.halo) {
    if (L.halo_before >= 0) send_block(sends, g_.r - 1, b, g, L, L.block_pool_page(L.halo_before), false);
    if (L.halo_after >= 0) send_block(sends, g_.r + 1, b, g, L, L.block_pool_page(L.halo_after), false);
    if (g_.r + 1 < g_.p)
      recv_to_stage(recvs, landings, stage, g_.r + 1, b, g, L, (g_.local_blocks - 1) * g_.coarse_pages);
    if (!g_.causal && g_.r > 0) recv_to_stage(recvs, landings, stage, g_.r - 1, b, g, L, 0);
  }
  for (int s = 1; s < g_.p; ++s) {
    const int to = (g_.r + s) % g_.p, from = (g_.r - s + g_.p) % g_.p;
    const ServedRequests& sv = served[s - 1];
    for (const std::int64_t id : L.fetched)
      if (g_.owner(id) == to) send_block(sends, to, b, g, L, L.block_pool_page(id), false);
    for (std::int64_t i = sv.first[unit]; i < sv.first[unit + 1]; ++i)
      recv_to_stage(recvs, landings, stage, from, b, g, L, (sv.ids[i] - g_.first_block) * g_.coarse_pages);
  }
  comm_.exchange(sends, recvs, ctx_.stream);
  return landings;
}

void fetch_overlapped(CommOverlap& overlap, const TransferOn& transfer, const kernels::ExecContext& ctx,
                      const ElementLayouts& layouts, const std::vector<ServedRequests>& served,
                      const std::function<void(int b, int g)>& compute) {
  const int heads = static_cast<int>(layouts.front().size());
  const int units = static_cast<int>(layouts.size()) * heads;
  const auto fetch = [&](int u) {
    overlap.start([&transfer, &ctx, &layouts, &served, heads, u](Stream stream) {
      const kernels::ExecContext comm_ctx{ctx.device, stream};
      transfer(comm_ctx).transfer_blocks(layouts, served, u / heads, u % heads);
    });
  };
  fetch(0);
  for (int u = 0; u < units; ++u) {
    overlap.wait();
    if (u + 1 < units) fetch(u + 1);
    compute(u / heads, u % heads);
  }
}

void return_overlapped(CommOverlap& overlap, const TransferOn& transfer, const kernels::ExecContext& ctx,
                       const ElementLayouts& layouts, const std::vector<ServedRequests>& served,
                       std::span<float> stage, const std::function<void(Stream)>& first,
                       const std::function<void(int b, int g)>& prepare) {
  const int heads = static_cast<int>(layouts.front().size());
  const int units = static_cast<int>(layouts.size()) * heads;
  const std::size_t slot = stage.size() / 2;
  const auto slot_of = [&](int u) { return stage.subspan((u % 2) * slot, slot); };
  std::vector<ClusteredTransfer::Landing> landed[2];
  const auto send_back = [&](int u) {
    overlap.start([&, u](Stream stream) {
      if (u == 0) first(stream);
      const kernels::ExecContext comm_ctx{ctx.device, stream};
      landed[u % 2] = transfer(comm_ctx).return_gradients(layouts, served, u / heads, u % heads, slot_of(u));
    });
  };
  const ClusteredTransfer local = transfer(ctx);
  prepare(0, 0);
  send_back(0);
  for (int u = 0; u < units; ++u) {
    if (u + 1 < units) prepare((u + 1) / heads, (u + 1) % heads);
    overlap.wait();
    if (u + 1 < units) send_back(u + 1);
    local.add_landed(landed[u % 2], slot_of(u));
  }
}

}  // namespace ringcast
