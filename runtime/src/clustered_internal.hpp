// What the clustered mode moves between ranks (DESIGN.md §4.1 steps 3-4, §4.2): halo blocks and
// fetched coarse blocks into the page pools, and their fp32 gradients back to the owners. A block
// travels as two messages (K then V, page_size * coarse_pages * head_dim f32 each) straight from and
// into pool pages; requests travel the ring-shift pattern: at step s a rank sends to r + s what it
// wants from that rank and answers r - s. Contiguous placement: rank q owns blocks
// [q * local_blocks, (q + 1) * local_blocks). Host memory (the MPI communicator).
#pragma once

#include <ringcast/comm/communicator.hpp>
#include <ringcast/kernels/selection.hpp>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <span>
#include <vector>

namespace ringcast {

struct ClusterGeometry {
  int p = 1, r = 0;  // ranks, this rank
  int batch = 1, kv_heads = 1;
  int coarse_pages = 1;
  bool causal = true;
  std::int64_t local_blocks = 0, first_block = 0;
  std::int64_t page_elems = 0;   // page_size * head_dim
  std::int64_t block_elems = 0;  // coarse_pages * page_elems: one block of one head's K (or V)
  std::int64_t pool_elems = 0;   // one element's K (or V) pool at the largest fetch capacity
  int owner(std::int64_t block) const { return static_cast<int>(block / local_blocks); }
};

// The first K (kv = 0) or V (kv = 1) page of KV head g's pool of batch element b.
using PoolView = std::function<float*(int b, int g, int kv)>;

// The blocks one requester fetched from this rank: per (element, KV head) counts [batch * kv_heads],
// then the global block ids in the requester's fetch order.
struct ServedRequests {
  std::vector<std::int32_t> counts;
  std::vector<std::int32_t> ids;
};

// layouts[b][g]: the pool layout of element b, KV head g.
using ElementLayouts = std::vector<std::span<const kernels::ClusteredLayout>>;

class ClusteredTransfer {
 public:
  ClusteredTransfer(comm::Communicator& comm, const ClusterGeometry& geometry, PoolView pools)
      : comm_(comm), g_(geometry), pools_(std::move(pools)) {}

  // Forward: the previous rank's last block (and, bidirectional, the next rank's first) into the halo.
  void exchange_halo(const ElementLayouts& layouts);
  // Forward: P - 1 steps of request counts (a ring shift), request ids and the blocks themselves;
  // served[s - 1] keeps what rank r - s fetched from this rank, for the backward.
  void fetch_blocks(const ElementLayouts& layouts, std::vector<ServedRequests>& served);
  // Backward, on gradient pools: the reverse of each, received gradients added to the local pages.
  // `stage` holds 2 * block_elems per block received in one step.
  void return_halo_gradients(const ElementLayouts& layouts, std::span<float> stage, const kernels::ExecContext& ctx);
  void return_fetched_gradients(const ElementLayouts& layouts, const std::vector<ServedRequests>& served,
                                std::span<float> stage, const kernels::ExecContext& ctx);

 private:
  struct Landing {  // a received block's gradient: stage slot -> element, head, first local pool page
    int b, g;
    std::int64_t page;
  };
  void send_block(std::vector<comm::SendOp>& ops, int peer, int b, int g, std::int64_t page) const;
  void recv_block(std::vector<comm::RecvOp>& ops, int peer, int b, int g, std::int64_t page) const;
  void recv_to_stage(std::vector<comm::RecvOp>& ops, std::vector<Landing>& landings, std::span<float> stage, int peer,
                     int b, int g, std::int64_t page) const;
  void add_landed(const std::vector<Landing>& landings, std::span<const float> stage,
                  const kernels::ExecContext& ctx) const;

  comm::Communicator& comm_;
  const ClusterGeometry& g_;
  PoolView pools_;
};

// One dimension of a strided f32 copy: size, source stride, destination stride (elements).
struct CopyDim {
  std::int64_t size, src_stride, dst_stride;
};
// dst = src (or dst += src) over the index space of `dims` (outermost first).
void strided_copy(const kernels::ExecContext& ctx, const float* src, float* dst, std::initializer_list<CopyDim> dims,
                  bool accumulate = false);

}  // namespace ringcast
