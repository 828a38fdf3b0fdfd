// Exact attention by source blocks: `ring` (K/V shards travel P-1 ring steps; in the backward the
// fp32 dK/dV accumulators travel with them and take one last step home) and `allgather` (all K/V
// shards gathered at once; dK/dV reduce-scattered back). Both attend to one source rank's page pool
// at a time with the table of that source (causal positions from the placement, zigzag when causal
// by default) and merge the partial results by LSE in fp32.
#include "attention_internal.hpp"
#include "overlap.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

#include <cmath>
#include <utility>

namespace ringcast {
namespace {

class SourceBlockMode final : public DistributedAttention::Mode {
 public:
  SourceBlockMode(const Session& s, const LayerShape& sh, const AttentionOptions& o) : Mode(s, sh, o), overlap_(s) {
    p_ = sh.ranks;
    r_ = s.rank();
    gather_ = o.mode == AttentionMode::kAllGather;
    local_ = shard_segments(sh, o, r_, kExactPageSize);
    const std::int64_t n = sh.local_len();
    kshape_ = {1, n, sh.heads, sh.kv_heads, sh.head_dim, kExactPageSize, local_.pages()};
    head_pool_ = local_.pages() * kExactPageSize * sh.head_dim;
    block_elems_ = 2 * sh.batch * sh.kv_heads * head_pool_;
    elt_ = dtype_size(sh.dtype);

    q_pos_ = allocate(positions.size() * sizeof(std::int32_t));
    q_pos_.copy_from_host(positions.data(), positions.size() * sizeof(std::int32_t), 0, ctx.stream);
    for (int src = 0; src < p_; ++src) {
      const Segments seg = shard_segments(sh, o, src, kExactPageSize);
      tables_.emplace_back(kernels::dense_table(kshape_, seg.ranges(), positions, sh.causal), kshape_, s.device(),
                           ctx.stream);
      workspace_bytes += tables_.back().bytes();
    }
    const int blocks = gather_ ? p_ : 2;  // all shards, or the ring's double buffer
    kv_ = allocate(blocks * block_elems_ * elt_);
    dkv_ = allocate(blocks * block_elems_ * sizeof(float));
    if (gather_) {
      send_ = allocate(block_elems_ * elt_);
      dkv_mine_ = allocate(block_elems_ * sizeof(float));
      kernels::fill_zero(send_.data(), send_.bytes(), ctx);
    }
    kernels::fill_zero(kv_.data(), kv_.bytes(), ctx);  // padding slots stay zero
    const std::int64_t rows = std::int64_t{sh.batch} * n * sh.heads;
    o_acc_ = allocate(rows * sh.head_dim * sizeof(float));
    o_part_ = allocate(rows * sh.head_dim * sizeof(float));
    lse_acc_ = allocate(rows * sizeof(float));
    lse_part_ = allocate(rows * sizeof(float));
    dq_acc_ = allocate(rows * sh.head_dim * sizeof(float));
    fwd_ws_ = allocate(kernels::attention_forward_workspace_bytes(kshape_, ctx));
    bwd_ws_ = allocate(kernels::attention_backward_workspace_bytes(kshape_, ctx));
  }

  void forward(const AttentionForwardArgs& a) override {
    pack_local(a.k, a.v, gather_ ? send_.data() : block(kv_, 0, elt_));
    if (gather_) {
      session.comm().all_gather({send_.data(), static_cast<std::size_t>(block_elems_), shape.dtype},
                                {kv_.data(), static_cast<std::size_t>(block_elems_ * p_), shape.dtype}, ctx.stream);
      for (int src = 0; src < p_; ++src) attend(a, src, block(kv_, src, elt_), src == 0);
    } else {
      // The next step's K/V travel while this step's block computes.
      int cur = 0;
      for (int step = 0; step < p_; ++step) {
        const bool more = step + 1 < p_;
        if (more) overlap_.start([this, cur](Stream s) { shift_kv(cur, s); });
        attend(a, (r_ - step + p_) % p_, block(kv_, cur, elt_), step == 0);
        if (more) {
          overlap_.wait();
          cur = 1 - cur;
        }
      }
    }
    const std::int64_t rows = std::int64_t{shape.batch} * shape.local_len() * shape.heads;
    kernels::copy_strided(kernels::StridedCopy::flat(o_acc_.data(), DType::kF32, a.o.data, shape.dtype, rows * shape.head_dim), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(lse_acc_.data(), DType::kF32, a.lse.data, DType::kF32, rows), ctx);
  }

  void backward(const AttentionBackwardArgs& a) override {
    kernels::fill_zero(dq_acc_.data(), dq_acc_.bytes(), ctx);
    kernels::fill_zero(dkv_.data(), dkv_.bytes(), ctx);
    int cur = 0;
    if (gather_) {
      for (int src = 0; src < p_; ++src)
        attend_backward(a, src, block(kv_, src, elt_), block(dkv_, src, sizeof(float)));
      session.comm().reduce_scatter({dkv_.data(), static_cast<std::size_t>(block_elems_ * p_), DType::kF32},
                                    {dkv_mine_.data(), static_cast<std::size_t>(block_elems_), DType::kF32},
                                    comm::ReduceOp::kSum, ctx.stream);
    } else {
      // K/V travel while this step computes; the accumulators it wrote follow once it is done.
      pack_local(a.k, a.v, block(kv_, 0, elt_));
      for (int step = 0; step < p_; ++step) {
        const bool more = step + 1 < p_;
        if (more) overlap_.start([this, cur](Stream s) { shift_kv(cur, s); });
        attend_backward(a, (r_ - step + p_) % p_, block(kv_, cur, elt_), block(dkv_, cur, sizeof(float)));
        if (more) overlap_.wait();
        if (p_ > 1) {  // after the last step, the accumulators held belong to rank r+1: that shift takes them home
          shift(block(dkv_, cur, sizeof(float)), block(dkv_, 1 - cur, sizeof(float)), DType::kF32, ctx.stream);
          cur = 1 - cur;
        }
      }
    }
    const auto* dkv = static_cast<const float*>(gather_ ? dkv_mine_.data() : block(dkv_, cur, sizeof(float)));
    const std::int64_t half = block_elems_ / 2;
    unpack_from_pool(dkv, a.d_k.data, shape.dtype, shape.batch, shape.kv_heads, shape.head_dim, local_, kExactPageSize, ctx);
    unpack_from_pool(dkv + half, a.d_v.data, shape.dtype, shape.batch, shape.kv_heads, shape.head_dim, local_,
                     kExactPageSize, ctx);
    const std::int64_t elems = std::int64_t{shape.batch} * shape.local_len() * shape.heads * shape.head_dim;
    kernels::copy_strided(kernels::StridedCopy::flat(dq_acc_.data(), DType::kF32, a.d_q.data, shape.dtype, elems), ctx);
  }

 private:
  // Block i of a buffer of blocks of block_elems_ elements of `elt` bytes.
  void* block(const DeviceBuffer& buf, int i, std::size_t elt) const {
    return static_cast<char*>(buf.data()) + static_cast<std::size_t>(i) * block_elems_ * elt;
  }

  // K then V of this rank into a block: [2][B][h_kv][pages][ps][d].
  void pack_local(const TensorView& k, const TensorView& v, void* dst) {
    auto* base = static_cast<char*>(dst);
    const std::size_t half = static_cast<std::size_t>(block_elems_ / 2) * elt_;
    pack_to_pool(k.data, shape.dtype, base, shape.batch, shape.kv_heads, shape.head_dim, local_, kExactPageSize, ctx);
    pack_to_pool(v.data, shape.dtype, base + half, shape.batch, shape.kv_heads, shape.head_dim, local_, kExactPageSize,
                 ctx);
  }

  // Ring step 1: send `send` to rank r+1, receive the same number of elements from rank r-1.
  void shift(const void* send, void* recv, DType dtype, Stream stream) {
    const auto n = static_cast<std::size_t>(block_elems_);
    session.comm().ring_shift({send, n, dtype}, {recv, n, dtype}, 1, stream);
  }
  void shift_kv(int cur, Stream stream) { shift(block(kv_, cur, elt_), block(kv_, 1 - cur, elt_), shape.dtype, stream); }

  kernels::AttentionForwardParams params(const TensorView& q, int src, const void* kv, int b) const {
    const std::int64_t n = shape.local_len();
    kernels::AttentionForwardParams p;
    p.shape = kshape_;
    p.dtype = shape.dtype;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    p.q = static_cast<const char*>(q.data) + static_cast<std::size_t>(b) * n * shape.heads * shape.head_dim * elt_;
    const auto* base = static_cast<const char*>(kv);
    p.k_pages = base + static_cast<std::size_t>(b) * shape.kv_heads * head_pool_ * elt_;
    p.v_pages = base + static_cast<std::size_t>(shape.batch + b) * shape.kv_heads * head_pool_ * elt_;
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.table = tables_[src].table();
    return p;
  }

  void attend(const AttentionForwardArgs& a, int src, const void* kv, bool first) {
    const std::int64_t n = shape.local_len(), rows = n * shape.heads;
    for (int b = 0; b < shape.batch; ++b) {
      kernels::AttentionForwardParams p = params(a.q, src, kv, b);
      p.o_dtype = DType::kF32;
      p.o = (first ? o_acc_ : o_part_).as<float>() + b * rows * shape.head_dim;
      p.lse = (first ? lse_acc_ : lse_part_).as<float>() + b * rows;
      p.workspace = fwd_ws_.data();
      p.workspace_bytes = fwd_ws_.bytes();
      kernels::attention_forward(p, ctx);
    }
    if (!first) {
      kernels::MergeParams m{shape.batch, n, shape.heads, shape.head_dim, o_acc_.as<float>(), lse_acc_.as<float>(),
                             o_part_.as<const float>(), lse_part_.as<const float>()};
      kernels::merge_by_lse(m, ctx);
    }
  }

  void attend_backward(const AttentionBackwardArgs& a, int src, const void* kv, void* dkv) {
    const std::int64_t n = shape.local_len(), rows = n * shape.heads;
    for (int b = 0; b < shape.batch; ++b) {
      kernels::AttentionBackwardParams p;
      p.fwd = params(a.q, src, kv, b);
      p.fwd.o_dtype = shape.dtype;
      p.fwd.o = static_cast<char*>(a.o.data) + static_cast<std::size_t>(b) * rows * shape.head_dim * elt_;
      p.fwd.lse = a.lse.as<float>() + b * rows;
      p.d_o = static_cast<const char*>(a.d_o.data) + static_cast<std::size_t>(b) * rows * shape.head_dim * elt_;
      p.transposed = tables_[src].transposed();
      p.d_q = dq_acc_.as<float>() + b * rows * shape.head_dim;
      auto* d = static_cast<float*>(dkv);
      p.d_k_pages = d + static_cast<std::int64_t>(b) * shape.kv_heads * head_pool_;
      p.d_v_pages = d + static_cast<std::int64_t>(shape.batch + b) * shape.kv_heads * head_pool_;
      p.accumulate = true;
      p.workspace = bwd_ws_.data();
      p.workspace_bytes = bwd_ws_.bytes();
      kernels::attention_backward(p, ctx);
    }
  }

  int p_ = 1, r_ = 0;
  bool gather_ = false;
  Segments local_;
  kernels::AttentionShape kshape_;
  std::int64_t head_pool_ = 0, block_elems_ = 0;
  std::size_t elt_ = 4;
  DeviceBuffer q_pos_, send_, kv_, dkv_, dkv_mine_, o_acc_, o_part_, lse_acc_, lse_part_, dq_acc_, fwd_ws_, bwd_ws_;
  std::vector<DeviceTables> tables_;
  CommOverlap overlap_;
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_ring_mode(const Session& s, const LayerShape& sh,
                                                           const AttentionOptions& o) {
  return std::make_unique<SourceBlockMode>(s, sh, o);
}

}  // namespace ringcast
