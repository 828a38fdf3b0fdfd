// Exact attention by head shards (`ulysses`, DeepSpeed-Ulysses): one all-to-all turns the sequence
// shards of Q, K, V into head shards (rank j: query heads [j h/P, (j+1) h/P) and the matching KV
// heads, all n tokens), local attention runs over the whole sequence, and a second all-to-all brings
// O (and the LSE) back to sequence shards. The backward sends dO the same way and returns fp32
// dQ, dK, dV. The head-sharded Q, K/V pool, O and LSE are kept from the forward for the backward.
#include "attention_internal.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

#include <cmath>

namespace ringcast {
namespace {

class UlyssesMode final : public DistributedAttention::Mode {
 public:
  UlyssesMode(const Session& s, const LayerShape& sh, const AttentionOptions& o) : Mode(s, sh, o) {
    p_ = sh.ranks;
    hq_ = sh.heads / p_;
    hkq_ = sh.kv_heads / p_;
    n_loc_ = sh.local_len();
    n_ = sh.seq_len;
    d_ = sh.head_dim;
    b_ = sh.batch;
    elt_ = dtype_size(sh.dtype);
    // Every rank's segments, in rank order: the head shard holds the whole sequence in that order.
    std::vector<std::int32_t> all_pos;
    for (int src = 0; src < p_; ++src) {
      const Segments seg = shard_segments(sh, o, src, kExactPageSize);
      if (src == 0) all_ = seg, all_.count = 0, all_.pos0.clear();
      all_.count += seg.count;
      all_.pos0.insert(all_.pos0.end(), seg.pos0.begin(), seg.pos0.end());
      const auto pos = shard_positions(sh, o, src);
      all_pos.insert(all_pos.end(), pos.begin(), pos.end());
    }
    local_ = shard_segments(sh, o, s.rank(), kExactPageSize);
    kshape_ = {1, n_, hq_, hkq_, d_, kExactPageSize, all_.pages()};
    q_pos_ = allocate(all_pos.size() * sizeof(std::int32_t));
    q_pos_.copy_from_host(all_pos.data(), all_pos.size() * sizeof(std::int32_t), 0, ctx.stream);
    tables_ = std::make_unique<DeviceTables>(kernels::dense_table(kshape_, all_.ranges(), all_pos, sh.causal), kshape_,
                                             s.device(), ctx.stream);
    workspace_bytes += tables_->bytes();

    block_in_ = std::int64_t{b_} * n_loc_ * (hq_ + 2 * hkq_) * d_;  // per peer: Q | K | V slices
    head_pool_ = all_.pages() * kExactPageSize * d_;
    const std::int64_t q_hs = std::int64_t{b_} * n_ * hq_ * d_, pool = std::int64_t{b_} * hkq_ * head_pool_;
    send_ = allocate(p_ * block_in_ * sizeof(float));  // large enough for the f32 gradients going back
    recv_ = allocate(p_ * block_in_ * sizeof(float));
    q_hs_ = allocate(q_hs * elt_);
    o_hs_ = allocate(q_hs * elt_);
    do_hs_ = allocate(q_hs * elt_);
    lse_hs_ = allocate(std::int64_t{b_} * hq_ * n_ * sizeof(float));
    lse_send_ = allocate(std::int64_t{b_} * hq_ * n_ * sizeof(float));
    lse_recv_ = allocate(std::int64_t{b_} * hq_ * n_ * sizeof(float));
    kv_pool_ = allocate(2 * pool * elt_);
    dq_hs_ = allocate(q_hs * sizeof(float));
    dkv_pool_ = allocate(2 * pool * sizeof(float));
    kernels::fill_zero(kv_pool_.data(), kv_pool_.bytes(), ctx);
    fwd_ws_ = allocate(kernels::attention_forward_workspace_bytes(kshape_, ctx));
    bwd_ws_ = allocate(kernels::attention_backward_workspace_bytes(kshape_, ctx));
  }

  void forward(const AttentionForwardArgs& a) override {
    const DType t = shape.dtype;
    // Sequence shard -> per-peer slices [Q heads of j | K heads of j | V heads of j].
    to_peers(a.q.data, t, send_.data(), t, shape.heads, hq_, 0);
    to_peers(a.k.data, t, send_.data(), t, shape.kv_heads, hkq_, std::int64_t{b_} * n_loc_ * hq_ * d_);
    to_peers(a.v.data, t, send_.data(), t, shape.kv_heads, hkq_, std::int64_t{b_} * n_loc_ * (hq_ + hkq_) * d_);
    session.comm().all_to_all({send_.data(), static_cast<std::size_t>(p_ * block_in_), t},
                              {recv_.data(), static_cast<std::size_t>(p_ * block_in_), t}, ctx.stream);
    // Slices from every rank -> the head shard: Q tokens in rank order, K and V into the page pool.
    from_peers_tokens(recv_.data(), t, q_hs_.data(), t, block_in_, 0);
    const std::int64_t pool = std::int64_t{b_} * hkq_ * head_pool_;
    for (int src = 0; src < p_; ++src) {
      const char* base = static_cast<const char*>(recv_.data()) + src * block_in_ * elt_;
      const PoolSpan span{all_.pages(), src * local_.pages()};
      pack_to_pool(base + std::int64_t{b_} * n_loc_ * hq_ * d_ * elt_, t, kv_pool_.data(), b_, hkq_, d_, local_,
                   kExactPageSize, ctx, span);
      pack_to_pool(base + std::int64_t{b_} * n_loc_ * (hq_ + hkq_) * d_ * elt_, t,
                   static_cast<char*>(kv_pool_.data()) + pool * elt_, b_, hkq_, d_, local_, kExactPageSize, ctx, span);
    }
    for (int b = 0; b < b_; ++b) {
      kernels::AttentionForwardParams p = params(b);
      p.o = static_cast<char*>(o_hs_.data()) + b * n_ * hq_ * d_ * elt_;
      p.o_dtype = t;
      p.lse = lse_hs_.as<float>() + b * hq_ * n_;
      p.workspace = fwd_ws_.data();
      p.workspace_bytes = fwd_ws_.bytes();
      kernels::attention_forward(p, ctx);
    }
    // Head shard -> sequence shards: O and LSE.
    back_tokens(o_hs_.data(), t, send_.data(), t, hq_);
    session.comm().all_to_all({send_.data(), static_cast<std::size_t>(b_ * n_ * hq_ * d_), t},
                              {recv_.data(), static_cast<std::size_t>(b_ * n_ * hq_ * d_), t}, ctx.stream);
    to_heads(recv_.data(), t, a.o.data, t, hq_, shape.heads, 0);
    kernels::StridedCopy c;  // lse_hs [B][hq][P][n_loc] -> per peer [P][B][hq][n_loc]
    c.ndim = 4;
    c.shape = {p_, b_, hq_, n_loc_, 1, 1};
    c.src_strides = {n_loc_, hq_ * n_, n_, 1, 0, 0};
    c.dst_strides = {std::int64_t{b_} * hq_ * n_loc_, hq_ * n_loc_, n_loc_, 1, 0, 0};
    c.src = lse_hs_.data();
    c.dst = lse_send_.data();
    kernels::copy_strided(c, ctx);
    session.comm().all_to_all({lse_send_.data(), static_cast<std::size_t>(b_ * hq_ * n_), DType::kF32},
                              {lse_recv_.data(), static_cast<std::size_t>(b_ * hq_ * n_), DType::kF32}, ctx.stream);
    c.shape = {p_, b_, hq_, n_loc_, 1, 1};  // [P][B][hq][n_loc] -> lse [B][P hq][n_loc]
    c.src_strides = {std::int64_t{b_} * hq_ * n_loc_, hq_ * n_loc_, n_loc_, 1, 0, 0};
    c.dst_strides = {hq_ * n_loc_, std::int64_t{shape.heads} * n_loc_, n_loc_, 1, 0, 0};
    c.src = lse_recv_.data();
    c.dst = a.lse.data;
    kernels::copy_strided(c, ctx);
  }

  void backward(const AttentionBackwardArgs& a) override {
    const DType t = shape.dtype;
    const std::int64_t slice = std::int64_t{b_} * n_loc_ * hq_ * d_;
    to_peers(a.d_o.data, t, send_.data(), t, shape.heads, hq_, 0, slice);
    session.comm().all_to_all({send_.data(), static_cast<std::size_t>(p_ * slice), t},
                              {recv_.data(), static_cast<std::size_t>(p_ * slice), t}, ctx.stream);
    from_peers_tokens(recv_.data(), t, do_hs_.data(), t, slice, 0);
    const std::int64_t pool = std::int64_t{b_} * hkq_ * head_pool_;
    for (int b = 0; b < b_; ++b) {
      kernels::AttentionBackwardParams p;
      p.fwd = params(b);
      p.fwd.o = static_cast<char*>(o_hs_.data()) + b * n_ * hq_ * d_ * elt_;
      p.fwd.o_dtype = t;
      p.fwd.lse = lse_hs_.as<float>() + b * hq_ * n_;
      p.d_o = static_cast<const char*>(do_hs_.data()) + b * n_ * hq_ * d_ * elt_;
      p.transposed = tables_->transposed();
      p.d_q = dq_hs_.as<float>() + b * n_ * hq_ * d_;
      p.d_k_pages = dkv_pool_.as<float>() + b * hkq_ * head_pool_;
      p.d_v_pages = dkv_pool_.as<float>() + pool + b * hkq_ * head_pool_;
      p.accumulate = false;
      p.workspace = bwd_ws_.data();
      p.workspace_bytes = bwd_ws_.bytes();
      kernels::attention_backward(p, ctx);
    }
    // fp32 [dQ | dK | dV] slices of each source rank's tokens go back to it.
    back_tokens(dq_hs_.data(), DType::kF32, send_.data(), DType::kF32, hq_, block_in_);
    for (int dst = 0; dst < p_; ++dst) {
      float* base = send_.as<float>() + dst * block_in_;
      const PoolSpan span{all_.pages(), dst * local_.pages()};
      unpack_from_pool(dkv_pool_.as<float>(), base + slice, DType::kF32, b_, hkq_, d_, local_, kExactPageSize, ctx, span);
      unpack_from_pool(dkv_pool_.as<float>() + pool, base + std::int64_t{b_} * n_loc_ * (hq_ + hkq_) * d_, DType::kF32,
                       b_, hkq_, d_, local_, kExactPageSize, ctx, span);
    }
    session.comm().all_to_all({send_.data(), static_cast<std::size_t>(p_ * block_in_), DType::kF32},
                              {recv_.data(), static_cast<std::size_t>(p_ * block_in_), DType::kF32}, ctx.stream);
    to_heads(recv_.data(), DType::kF32, a.d_q.data, t, hq_, shape.heads, 0, block_in_);
    to_heads(recv_.data(), DType::kF32, a.d_k.data, t, hkq_, shape.kv_heads, slice, block_in_);
    to_heads(recv_.data(), DType::kF32, a.d_v.data, t, hkq_, shape.kv_heads, std::int64_t{b_} * n_loc_ * (hq_ + hkq_) * d_,
             block_in_);
  }

 private:
  kernels::AttentionForwardParams params(int b) const {
    kernels::AttentionForwardParams p;
    p.shape = kshape_;
    p.dtype = shape.dtype;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(d_));
    p.q = static_cast<const char*>(q_hs_.data()) + b * n_ * hq_ * d_ * elt_;
    const std::int64_t pool = std::int64_t{b_} * hkq_ * head_pool_;
    p.k_pages = static_cast<const char*>(kv_pool_.data()) + b * hkq_ * head_pool_ * elt_;
    p.v_pages = static_cast<const char*>(kv_pool_.data()) + (pool + b * hkq_ * head_pool_) * elt_;
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.table = tables_->table();
    return p;
  }

  // tokens [B][n_loc][heads][d] -> slices [P][block] at offset `at` of each: [B][n_loc][heads/P][d] of peer j.
  void to_peers(const void* src, DType st, void* dst, DType dt, int heads, int per, std::int64_t at,
                std::int64_t block = -1) {
    kernels::StridedCopy c;
    c.ndim = 4;
    c.shape = {p_, b_, n_loc_, std::int64_t{per} * d_, 1, 1};
    c.src_strides = {std::int64_t{per} * d_, n_loc_ * heads * d_, std::int64_t{heads} * d_, 1, 0, 0};
    c.dst_strides = {block < 0 ? block_in_ : block, n_loc_ * per * d_, std::int64_t{per} * d_, 1, 0, 0};
    c.src = src;
    c.src_dtype = st;
    c.dst = static_cast<char*>(dst) + at * dtype_size(dt);
    c.dst_dtype = dt;
    kernels::copy_strided(c, ctx);
  }

  // slices [P][block] (offset `at`: [B][n_loc][hq][d] of source i) -> head-shard tokens [B][P n_loc][hq][d].
  void from_peers_tokens(const void* src, DType st, void* dst, DType dt, std::int64_t block, std::int64_t at) {
    kernels::StridedCopy c;
    c.ndim = 3;
    c.shape = {p_, b_, n_loc_ * hq_ * d_, 1, 1, 1};
    c.src_strides = {block, n_loc_ * hq_ * d_, 1, 0, 0, 0};
    c.dst_strides = {n_loc_ * hq_ * d_, n_ * hq_ * d_, 1, 0, 0, 0};
    c.src = static_cast<const char*>(src) + at * dtype_size(st);
    c.src_dtype = st;
    c.dst = dst;
    c.dst_dtype = dt;
    kernels::copy_strided(c, ctx);
  }

  // head-shard tokens [B][P n_loc][per][d] -> slices [P][block] holding [B][n_loc][per][d] of rank j.
  void back_tokens(const void* src, DType st, void* dst, DType dt, int per, std::int64_t block = -1) {
    const std::int64_t slice = std::int64_t{b_} * n_loc_ * per * d_;
    kernels::StridedCopy c;
    c.ndim = 3;
    c.shape = {p_, b_, n_loc_ * per * d_, 1, 1, 1};
    c.src_strides = {n_loc_ * per * d_, n_ * per * d_, 1, 0, 0, 0};
    c.dst_strides = {block < 0 ? slice : block, n_loc_ * per * d_, 1, 0, 0, 0};
    c.src = src;
    c.src_dtype = st;
    c.dst = dst;
    c.dst_dtype = dt;
    kernels::copy_strided(c, ctx);
  }

  // slices [P][block] (offset `at`: [B][n_loc][per][d] from rank i, heads i*per...) -> tokens [B][n_loc][heads][d].
  void to_heads(const void* src, DType st, void* dst, DType dt, int per, int heads, std::int64_t at,
                std::int64_t block = -1) {
    const std::int64_t slice = std::int64_t{b_} * n_loc_ * per * d_;
    kernels::StridedCopy c;
    c.ndim = 4;
    c.shape = {p_, b_, n_loc_, std::int64_t{per} * d_, 1, 1};
    c.src_strides = {block < 0 ? slice : block, n_loc_ * per * d_, std::int64_t{per} * d_, 1, 0, 0};
    c.dst_strides = {std::int64_t{per} * d_, n_loc_ * heads * d_, std::int64_t{heads} * d_, 1, 0, 0};
    c.src = static_cast<const char*>(src) + at * dtype_size(st);
    c.src_dtype = st;
    c.dst = dst;
    c.dst_dtype = dt;
    kernels::copy_strided(c, ctx);
  }

  int p_ = 1, hq_ = 1, hkq_ = 1, b_ = 1, d_ = 64;
  std::int64_t n_loc_ = 0, n_ = 0, block_in_ = 0, head_pool_ = 0;
  std::size_t elt_ = 4;
  Segments all_, local_;
  kernels::AttentionShape kshape_;
  std::unique_ptr<DeviceTables> tables_;
  DeviceBuffer q_pos_, send_, recv_, q_hs_, o_hs_, do_hs_, lse_hs_, lse_send_, lse_recv_, kv_pool_, dq_hs_, dkv_pool_,
      fwd_ws_, bwd_ws_;
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_ulysses_mode(const Session& s, const LayerShape& sh,
                                                              const AttentionOptions& o) {
  return std::make_unique<UlyssesMode>(s, sh, o);
}

}  // namespace ringcast
