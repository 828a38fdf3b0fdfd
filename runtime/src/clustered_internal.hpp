// What the clustered mode moves between ranks (DESIGN.md §4.1 steps 3-4, §4.2): halo blocks and
// fetched coarse blocks into the page pools, and their fp32 gradients back to the owners. A block
// travels as two messages (K then V, page_size * coarse_pages * head_dim f32 each) straight from and
// into pool pages; requests travel the ring-shift pattern: at step s a rank sends to r + s what it
// wants from that rank and answers r - s. Contiguous placement: rank q owns blocks
// [q * local_blocks, (q + 1) * local_blocks). Buffers live in the communicator's memory (host for MPI,
// device for NCCL) and every call is ordered on the mode's stream; request lists are built on the host
// and staged through a small scratch buffer in that memory. With surrogate
// clusters a block also carries its page summaries (K then V, one key per page, from the pool's
// page-summary region) and its pages' member counts; their gradients travel back with the block's.
#pragma once

#include "attention_internal.hpp"
#include "overlap.hpp"

#include <ringcast/comm/communicator.hpp>
#include <ringcast/kernels/selection.hpp>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
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
  int head_dim = 0;
  bool block_summaries = false;  // surrogate clusters: page summaries and counts travel with a block
  bool halo = false;             // blocks: each rank holds its neighbours' edge blocks (exchange_halo)
  int owner(std::int64_t block) const { return static_cast<int>(block / local_blocks); }
  // f32 values of one block's page summaries (K or V): none in blocks mode (recomputed on arrival).
  std::int64_t summary_elems() const { return block_summaries ? std::int64_t{coarse_pages} * head_dim : 0; }
  // A block's gradient as staged on its owner: dK, dV pages, then dK, dV page summaries.
  std::int64_t stage_elems() const { return 2 * block_elems + 2 * summary_elems(); }
  // Stage (f32 elements) for the gradients one (element, KV head) receives in return_gradients(), when
  // requesters fetch at most fetch_limit blocks per (element, KV head): the halo's two and at most
  // min(fetch_limit, local_blocks) from each peer.
  std::int64_t unit_stage_elems(std::int64_t fetch_limit) const {
    if (p == 1) return 0;
    return ((halo ? 2 : 0) + (p - 1) * std::min(fetch_limit, local_blocks)) * stage_elems();
  }
};

// The first K (kv = 0) or V (kv = 1) page of KV head g's pool of batch element b (elements of the
// transfer's pool dtype).
using PoolView = std::function<void*(int b, int g, int kv)>;
// Member counts of the resident pages of (b, g), in pool order (surrogate clusters).
using CountView = std::function<std::int32_t*(int b, int g)>;

// The blocks one requester fetched from this rank: per (element, KV head) counts [batch * kv_heads],
// then the global block ids in the requester's fetch order; unit u's ids are [first[u], first[u + 1]).
struct ServedRequests {
  std::vector<std::int32_t> counts;
  std::vector<std::int32_t> ids;
  std::vector<std::int64_t> first;
};

// layouts[b][g]: the pool layout of element b, KV head g.
using ElementLayouts = std::vector<std::span<const kernels::ClusteredLayout>>;

// Request scratch (int32 elements) for fetches of at most fetch_limit blocks per (element, KV head).
inline std::int64_t request_scratch_ints(const ClusterGeometry& g, std::int64_t fetch_limit) {
  return 2 * std::int64_t{g.batch} * g.kv_heads * (1 + fetch_limit);
}

class ClusteredTransfer {
 public:
  // requests: request_scratch_ints() elements in the communicator's memory (request exchanges only).
  // counts: required when geometry.block_summaries (forward), unused otherwise. pool_dtype: the
  // forward's pages may travel in the storage dtype (bf16 / fp16 on CUDA: the halo and fetched blocks
  // then cost half); page summaries and every gradient are fp32.
  ClusteredTransfer(comm::Communicator& comm, const kernels::ExecContext& ctx, const ClusterGeometry& geometry,
                    PoolView pools, std::span<std::int32_t> requests = {}, CountView counts = {},
                    DType pool_dtype = DType::kF32);

  // Forward, before any block moves: P - 1 ring-shift steps of request counts and request ids
  // (synchronous); served[s - 1] keeps what rank r - s asks of this rank, also for the backward.
  void exchange_requests(const ElementLayouts& layouts, std::vector<ServedRequests>& served);
  // Forward, for element b and KV head g: the blocks it fetches from every peer and this rank's
  // answers to what the peers asked for (b, g), in one grouped exchange. Units are independent, so a
  // caller may move one while it computes on another.
  void transfer_blocks(const ElementLayouts& layouts, const std::vector<ServedRequests>& served, int b, int g);
  // A received block's gradient: stage slot -> element, head, first local pool page.
  struct Landing {
    int b, g;
    const kernels::ClusteredLayout* layout;
    std::int64_t page;
  };
  // Backward, on gradient pools, for element b and KV head g: the reverse of the forward's transfers in
  // one grouped exchange -- the gradients of its halo (with geometry.halo) and fetched blocks to their
  // owners, and into `stage` (geometry.unit_stage_elems()) those the peers return for this rank's own
  // blocks. add_landed() then adds them to the local pages. Units are independent, as in the forward.
  std::vector<Landing> return_gradients(const ElementLayouts& layouts, const std::vector<ServedRequests>& served,
                                        int b, int g, std::span<float> stage);
  void add_landed(const std::vector<Landing>& landings, std::span<const float> stage) const;

 private:
  // The block at pool page `page` of (b, g): its K, V pages and, with block_summaries, its page
  // summaries (K, V) and (forward only, `with_counts`) their counts.
  void send_block(std::vector<comm::SendOp>& ops, int peer, int b, int g, const kernels::ClusteredLayout& L,
                  std::int64_t page, bool with_counts) const;
  void recv_block(std::vector<comm::RecvOp>& ops, int peer, int b, int g, const kernels::ClusteredLayout& L,
                  std::int64_t page) const;
  void recv_to_stage(std::vector<comm::RecvOp>& ops, std::vector<Landing>& landings, std::span<float> stage, int peer,
                     int b, int g, const kernels::ClusteredLayout& L, std::int64_t page) const;
  // Ring shift step s (1 <= s < P) of host int32 lists through the request scratch: `send` to r + s,
  // `recv` (sized by the caller; the counts may differ) from r - s; synchronous.
  void shift_ints(std::span<const std::int32_t> send, std::span<std::int32_t> recv, int step);
  // Pool page `page` of (b, g), K or V.
  void* page_data(int b, int g, int kv, std::int64_t page) const;
  // The page-summary key of pool page `page` (K or V) of (b, g).
  float* summary(int b, int g, int kv, const kernels::ClusteredLayout& L, std::int64_t page) const;

  comm::Communicator& comm_;
  const kernels::ExecContext& ctx_;
  const ClusterGeometry& g_;
  PoolView pools_;
  std::span<std::int32_t> requests_;
  CountView counts_;
  DType dtype_;
};

// Forward, blocks mode: every element's halo -- the previous rank's last coarse block (and,
// bidirectional, the next rank's first), K and V of every KV head -- in one grouped exchange on `stream`,
// sent straight from the caller's k, v ([B, n_loc, kv_heads, head_dim] in `dtype`, where a block of all
// KV heads is contiguous) into `stage`, halo_stage_elems() elements of `dtype` (none on one rank):
// [sides (before; bidirectional: after)][B][2 (K, V)][coarse block][kv_heads][head_dim].
// halo_stage_block() finds one.
std::int64_t halo_stage_elems(const ClusterGeometry& geo);
std::int64_t halo_stage_block(const ClusterGeometry& geo, int side, int b, int kv);  // element offset
void exchange_halo(comm::Communicator& comm, Stream stream, const ClusterGeometry& geo, DType dtype, const void* k,
                   const void* v, void* stage);

// How a mode builds its ClusteredTransfer (over the pools and counts it moves) on a context that
// outlives the transfer.
using TransferOn = std::function<ClusteredTransfer(const kernels::ExecContext&)>;

// Forward, after exchange_requests, pipelined over (element, KV head) units through `overlap`: unit
// u + 1's blocks travel (transfer_blocks on the comm stream, or a helper thread on the CPU) while
// compute(b, g) runs for unit u, once u's blocks have landed. The first unit's transfer is exposed.
void fetch_overlapped(CommOverlap& overlap, const TransferOn& transfer, const kernels::ExecContext& ctx,
                      const ElementLayouts& layouts, const std::vector<ServedRequests>& served,
                      const std::function<void(int b, int g)>& compute);
// Backward, after the attention backward, pipelined likewise: unit u's gradients travel home
// (return_gradients; first(stream) joins the first step, e.g. the coarse summaries' reduce-scatter)
// while prepare(b, g) runs for unit u + 1 (before its step starts) and the peers' gradients that
// landed for unit u - 1 are added on ctx. stage: two slots of unit_stage_elems() (one lands while the
// next travels).
void return_overlapped(CommOverlap& overlap, const TransferOn& transfer, const kernels::ExecContext& ctx,
                       const ElementLayouts& layouts, const std::vector<ServedRequests>& served,
                       std::span<float> stage, const std::function<void(Stream)>& first,
                       const std::function<void(int b, int g)>& prepare);

// What both cluster kinds need of the options: contiguous placement, pages of at most 64 keys.
// Throws Error otherwise.
void check_clustered_support(const LayerShape& sh, const AttentionOptions& o);

// Ring all-gather of the coarse summaries (DESIGN.md §4.1 step 3), in two steps so that one KV head
// group's collective can run beside another's selection. send holds this rank's
// [kv_heads][fields][batch * local_blocks][head_dim] f32, recv p times that. all_gather_coarse moves
// KV heads [g0, g1) (communication, on `stream`): recv + g0 * p * per_head receives
// [p][g1 - g0][fields][batch * local_blocks][head_dim]. unpack_coarse then writes, for g in [g0, g1),
// dst(b, g) = [fields][num_blocks][head_dim] of the whole sequence, blocks in global order (compute,
// on ctx's stream).
void all_gather_coarse(comm::Communicator& comm, Stream stream, const ClusterGeometry& geo, int fields, int g0, int g1,
                       const float* send, float* recv);
void unpack_coarse(const kernels::ExecContext& ctx, const ClusterGeometry& geo, int fields, int g0, int g1,
                   const float* recv, const std::function<float*(int b, int g)>& dst);
// The reverse for gradients (§4.2), in two steps so that the communication can run beside other work:
// pack src(b, g, kv) [num_blocks][head_dim] (kv 0: mean key, 1: mean value) into send, p parts of
// [2][kv_heads][batch * local_blocks][head_dim] (compute, on ctx's stream); then sum the parts over the
// ranks into each block's owner: recv holds one part (communication, on `stream`).
void pack_coarse_gradients(const kernels::ExecContext& ctx, const ClusterGeometry& geo,
                           const std::function<const float*(int b, int g, int kv)>& src, float* send);
void reduce_scatter_coarse(comm::Communicator& comm, Stream stream, const ClusterGeometry& geo, const float* send,
                           float* recv);

std::unique_ptr<DistributedAttention::Mode> make_surrogate_mode(const Session& s, const LayerShape& sh,
                                                                const AttentionOptions& o);

// One dimension of a strided f32 copy: size, source stride, destination stride (elements).
struct CopyDim {
  std::int64_t size, src_stride, dst_stride;
};
// dst = src (or dst += src) over the index space of `dims` (outermost first).
void strided_copy(const kernels::ExecContext& ctx, const float* src, float* dst, std::initializer_list<CopyDim> dims,
                  bool accumulate = false);

}  // namespace ringcast
