// Exact attention by head shards (`ulysses`, DeepSpeed-Ulysses): all-to-alls turn the sequence shards
// of Q, K, V into head shards (rank j: query heads [j h/P, (j+1) h/P) and the matching KV heads, all n
// tokens), local attention runs over the whole sequence, and all-to-alls bring O and the LSE back to
// sequence shards. The backward sends dO the same way and returns fp32 dQ, dK, dV. A rank's heads are
// split into G groups (whole GQA groups) pipelined through one CommOverlap: while group g computes,
// group g+1's inputs and group g-1's results travel. Group g owns region g of send_/recv_ and its part
// of every group-major head-shard buffer, so a transfer never touches what the compute reads; each head
// gets the same math for every G. The head-shard Q, K/V pool, O and LSE are kept for the backward.
#include "attention_internal.hpp"
#include "overlap.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

#include <cmath>
#include <functional>

namespace ringcast {
namespace {

// Element `i` of a buffer of `elt`-byte elements.
void* at(const DeviceBuffer& buf, std::int64_t i, std::size_t elt) { return static_cast<char*>(buf.data()) + i * elt; }

class UlyssesMode final : public DistributedAttention::Mode {
 public:
  UlyssesMode(const Session& s, const LayerShape& sh, const AttentionOptions& o) : Mode(s, sh, o), overlap_(s) {
    p_ = sh.ranks;
    g_ = o.resolved_pipeline_groups(sh);
    hq_ = sh.heads / p_;
    hkq_ = sh.kv_heads / p_;
    hqg_ = hq_ / g_;
    hkqg_ = hkq_ / g_;
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
    kshape_ = {1, n_, hqg_, hkqg_, d_, kExactPageSize, all_.pages()};  // one group of one batch element
    q_pos_ = allocate(all_pos.size() * sizeof(std::int32_t));
    q_pos_.copy_from_host(all_pos.data(), all_pos.size() * sizeof(std::int32_t), 0, ctx.stream);
    tables_ = std::make_unique<DeviceTables>(kernels::dense_table(kshape_, all_.ranges(), all_pos, sh.causal), kshape_,
                                             s.device(), ctx.stream);
    workspace_bytes += tables_->bytes();

    q_slice_ = std::int64_t{b_} * n_loc_ * hqg_ * d_;
    kv_slice_ = std::int64_t{b_} * n_loc_ * hkqg_ * d_;
    block_ = q_slice_ + 2 * kv_slice_;  // per peer and group: Q | K | V slices
    head_pool_ = all_.pages() * kExactPageSize * d_;
    q_group_ = std::int64_t{b_} * n_ * hqg_ * d_;
    lse_group_ = std::int64_t{b_} * hqg_ * n_;
    pool_group_ = std::int64_t{b_} * hkqg_ * head_pool_;
    pool_ = g_ * pool_group_;
    // Region g of send_/recv_ holds p_ * block_ elements of up to 4 bytes: the f32 gradients going back.
    send_ = allocate(g_ * p_ * block_ * sizeof(float));
    recv_ = allocate(g_ * p_ * block_ * sizeof(float));
    q_hs_ = allocate(g_ * q_group_ * elt_);
    o_hs_ = allocate(g_ * q_group_ * elt_);
    do_hs_ = allocate(g_ * q_group_ * elt_);
    lse_hs_ = allocate(g_ * lse_group_ * sizeof(float));
    lse_send_ = allocate(g_ * lse_group_ * sizeof(float));
    lse_recv_ = allocate(g_ * lse_group_ * sizeof(float));
    kv_pool_ = allocate(2 * pool_ * elt_);
    dq_hs_ = allocate(g_ * q_group_ * sizeof(float));
    dkv_pool_ = allocate(2 * pool_ * sizeof(float));
    kernels::fill_zero(kv_pool_.data(), kv_pool_.bytes(), ctx);
    fwd_ws_ = allocate(kernels::attention_forward_workspace_bytes(kshape_, ctx));
    bwd_ws_ = allocate(kernels::attention_backward_workspace_bytes(kshape_, ctx));
  }

  void forward(const AttentionForwardArgs& a) override {
    const DType t = shape.dtype;
    Stages st;
    // Sequence shard -> per-peer slices [Q heads | K heads | V heads] of group g of peer j.
    st.pack_in = [&](int g) {
      to_peers(a.q.data, send(g), t, shape.heads, hq_, g, 0, block_);
      to_peers(a.k.data, send(g), t, shape.kv_heads, hkq_, g, q_slice_, block_);
      to_peers(a.v.data, send(g), t, shape.kv_heads, hkq_, g, q_slice_ + kv_slice_, block_);
    };
    st.move_in = [&](int g, Stream s) {
      session.comm().all_to_all({send(g), static_cast<std::size_t>(p_ * block_), t},
                                {recv(g), static_cast<std::size_t>(p_ * block_), t}, s);
    };
    // Slices from every rank -> the head shard: Q tokens in rank order, K and V into the page pool.
    st.compute = [&](int g) {
      from_peers_tokens(recv(g), at(q_hs_, g * q_group_, elt_), t, block_);
      for (int src = 0; src < p_; ++src) {
        const char* base = static_cast<const char*>(recv(g)) + src * block_ * elt_;
        const PoolSpan span{all_.pages(), src * local_.pages()};
        pack_to_pool(base + q_slice_ * elt_, t, at(kv_pool_, g * pool_group_, elt_), b_, hkqg_, d_, local_,
                     kExactPageSize, ctx, span);
        pack_to_pool(base + (q_slice_ + kv_slice_) * elt_, t, at(kv_pool_, pool_ + g * pool_group_, elt_), b_, hkqg_,
                     d_, local_, kExactPageSize, ctx, span);
      }
      for (int b = 0; b < b_; ++b) {
        kernels::AttentionForwardParams p = params(g, b);
        p.workspace = fwd_ws_.data();
        p.workspace_bytes = fwd_ws_.bytes();
        kernels::attention_forward(p, ctx);
      }
    };
    // Head shard -> sequence shards: O slices, and the LSE [B][hqg][P][n_loc] -> per peer [P][B][hqg][n_loc].
    st.pack_out = [&](int g) {
      back_tokens(at(o_hs_, g * q_group_, elt_), send(g), t, q_slice_);
      kernels::StridedCopy c;
      c.ndim = 4;
      c.shape = {p_, b_, hqg_, n_loc_, 1, 1};
      c.src_strides = {n_loc_, hqg_ * n_, n_, 1, 0, 0};
      c.dst_strides = {std::int64_t{b_} * hqg_ * n_loc_, hqg_ * n_loc_, n_loc_, 1, 0, 0};
      c.src = at(lse_hs_, g * lse_group_, sizeof(float));
      c.dst = at(lse_send_, g * lse_group_, sizeof(float));
      kernels::copy_strided(c, ctx);
    };
    st.move_out = [&](int g, Stream s) {
      session.comm().all_to_all({send(g), static_cast<std::size_t>(p_ * q_slice_), t},
                                {recv(g), static_cast<std::size_t>(p_ * q_slice_), t}, s);
      session.comm().all_to_all(
          {at(lse_send_, g * lse_group_, sizeof(float)), static_cast<std::size_t>(lse_group_), DType::kF32},
          {at(lse_recv_, g * lse_group_, sizeof(float)), static_cast<std::size_t>(lse_group_), DType::kF32}, s);
    };
    st.unpack_out = [&](int g) {
      to_heads(recv(g), t, a.o.data, t, hq_, shape.heads, g, 0, q_slice_);
      kernels::StridedCopy c;  // [P][B][hqg][n_loc] -> lse [B][h][n_loc], heads i hq + g hqg + k
      c.ndim = 4;
      c.shape = {p_, b_, hqg_, n_loc_, 1, 1};
      c.src_strides = {std::int64_t{b_} * hqg_ * n_loc_, hqg_ * n_loc_, n_loc_, 1, 0, 0};
      c.dst_strides = {hq_ * n_loc_, std::int64_t{shape.heads} * n_loc_, n_loc_, 1, 0, 0};
      c.src = at(lse_recv_, g * lse_group_, sizeof(float));
      c.dst = static_cast<float*>(a.lse.data) + g * hqg_ * n_loc_;
      kernels::copy_strided(c, ctx);
    };
    pipeline(st);
  }

  void backward(const AttentionBackwardArgs& a) override {
    const DType t = shape.dtype;
    Stages st;
    st.pack_in = [&](int g) { to_peers(a.d_o.data, send(g), t, shape.heads, hq_, g, 0, q_slice_); };
    st.move_in = [&](int g, Stream s) {
      session.comm().all_to_all({send(g), static_cast<std::size_t>(p_ * q_slice_), t},
                                {recv(g), static_cast<std::size_t>(p_ * q_slice_), t}, s);
    };
    st.compute = [&](int g) {
      from_peers_tokens(recv(g), at(do_hs_, g * q_group_, elt_), t, q_slice_);
      for (int b = 0; b < b_; ++b) {
        kernels::AttentionBackwardParams p;
        p.fwd = params(g, b);
        p.d_o = at(do_hs_, g * q_group_ + b * n_ * hqg_ * d_, elt_);
        p.transposed = tables_->transposed();
        const std::int64_t kv = g * pool_group_ + b * hkqg_ * head_pool_;
        p.d_q = static_cast<float*>(at(dq_hs_, g * q_group_ + b * n_ * hqg_ * d_, sizeof(float)));
        p.d_k_pages = static_cast<float*>(at(dkv_pool_, kv, sizeof(float)));
        p.d_v_pages = static_cast<float*>(at(dkv_pool_, pool_ + kv, sizeof(float)));
        p.accumulate = false;
        p.workspace = bwd_ws_.data();
        p.workspace_bytes = bwd_ws_.bytes();
        kernels::attention_backward(p, ctx);
      }
    };
    // fp32 [dQ | dK | dV] slices of each source rank's tokens go back to it.
    st.pack_out = [&](int g) {
      back_tokens(at(dq_hs_, g * q_group_, sizeof(float)), send(g), DType::kF32, block_);
      for (int dst = 0; dst < p_; ++dst) {
        float* base = static_cast<float*>(send(g)) + dst * block_;
        const PoolSpan span{all_.pages(), dst * local_.pages()};
        unpack_from_pool(static_cast<const float*>(at(dkv_pool_, g * pool_group_, sizeof(float))), base + q_slice_,
                         DType::kF32, b_, hkqg_, d_, local_, kExactPageSize, ctx, span);
        unpack_from_pool(static_cast<const float*>(at(dkv_pool_, pool_ + g * pool_group_, sizeof(float))),
                         base + q_slice_ + kv_slice_, DType::kF32, b_, hkqg_, d_, local_, kExactPageSize, ctx, span);
      }
    };
    st.move_out = [&](int g, Stream s) {
      session.comm().all_to_all({send(g), static_cast<std::size_t>(p_ * block_), DType::kF32},
                                {recv(g), static_cast<std::size_t>(p_ * block_), DType::kF32}, s);
    };
    st.unpack_out = [&](int g) {
      to_heads(recv(g), DType::kF32, a.d_q.data, t, hq_, shape.heads, g, 0, block_);
      to_heads(recv(g), DType::kF32, a.d_k.data, t, hkq_, shape.kv_heads, g, q_slice_, block_);
      to_heads(recv(g), DType::kF32, a.d_v.data, t, hkq_, shape.kv_heads, g, q_slice_ + kv_slice_, block_);
    };
    pipeline(st);
  }

 private:
  // One direction of the layer, per head group g: the caller's tokens -> send region g (pack_in), the
  // all-to-all into recv region g (move_in), the local attention of the group (compute), its results
  // -> send region g (pack_out), the all-to-all back (move_out), recv region g -> the caller (unpack_out).
  // The packs and unpacks run on the compute stream; the moves on the stream they are given.
  struct Stages {
    std::function<void(int)> pack_in, compute, pack_out, unpack_out;
    std::function<void(int, Stream)> move_in, move_out;
  };

  // While group g computes, group g+1's inputs and group g-1's results travel in one overlapped step;
  // with G = 1 this is in, compute, out in sequence. Every rank issues the same all-to-alls in the same
  // order, and the compute stream orders the first and the last around the overlapped ones.
  void pipeline(const Stages& st) {
    st.pack_in(0);
    st.move_in(0, ctx.stream);
    for (int g = 0; g < g_; ++g) {
      const bool next = g + 1 < g_, prev = g > 0;
      if (next) st.pack_in(g + 1);
      if (prev) st.pack_out(g - 1);
      if (next || prev) overlap_.start([&st, g, next, prev](Stream s) {
        if (next) st.move_in(g + 1, s);
        if (prev) st.move_out(g - 1, s);
      });
      st.compute(g);
      if (next || prev) overlap_.wait();
      if (prev) st.unpack_out(g - 1);
    }
    st.pack_out(g_ - 1);
    st.move_out(g_ - 1, ctx.stream);
    st.unpack_out(g_ - 1);
  }

  void* send(int g) const { return at(send_, g * p_ * block_, sizeof(float)); }
  void* recv(int g) const { return at(recv_, g * p_ * block_, sizeof(float)); }

  // Batch element b of group g of the head shard.
  kernels::AttentionForwardParams params(int g, int b) const {
    kernels::AttentionForwardParams p;
    p.shape = kshape_;
    p.dtype = shape.dtype;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(d_));
    const std::int64_t q = g * q_group_ + b * n_ * hqg_ * d_, kv = g * pool_group_ + b * hkqg_ * head_pool_;
    p.q = at(q_hs_, q, elt_);
    p.k_pages = at(kv_pool_, kv, elt_);
    p.v_pages = at(kv_pool_, pool_ + kv, elt_);
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.table = tables_->table();
    p.o = at(o_hs_, q, elt_);
    p.o_dtype = shape.dtype;
    p.lse = static_cast<float*>(at(lse_hs_, g * lse_group_ + b * hqg_ * n_, sizeof(float)));
    return p;
  }

  // tokens [B][n_loc][heads][d] -> slices [P][block] at offset `off` of each: [B][n_loc][per/G][d], the
  // heads j per + g per/G + k of peer j.
  void to_peers(const void* src, void* dst, DType t, int heads, int per, int g, std::int64_t off, std::int64_t block) {
    const int per_g = per / g_;
    kernels::StridedCopy c;
    c.ndim = 4;
    c.shape = {p_, b_, n_loc_, std::int64_t{per_g} * d_, 1, 1};
    c.src_strides = {std::int64_t{per} * d_, n_loc_ * heads * d_, std::int64_t{heads} * d_, 1, 0, 0};
    c.dst_strides = {block, n_loc_ * per_g * d_, std::int64_t{per_g} * d_, 1, 0, 0};
    c.src = static_cast<const char*>(src) + std::int64_t{g} * per_g * d_ * dtype_size(t);
    c.src_dtype = t;
    c.dst = static_cast<char*>(dst) + off * dtype_size(t);
    c.dst_dtype = t;
    kernels::copy_strided(c, ctx);
  }

  // slices [P][block] (at offset 0: [B][n_loc][hqg][d] of source i) -> one group's head-shard tokens
  // [B][P n_loc][hqg][d].
  void from_peers_tokens(const void* src, void* dst, DType t, std::int64_t block) {
    kernels::StridedCopy c;
    c.ndim = 3;
    c.shape = {p_, b_, n_loc_ * hqg_ * d_, 1, 1, 1};
    c.src_strides = {block, n_loc_ * hqg_ * d_, 1, 0, 0, 0};
    c.dst_strides = {n_loc_ * hqg_ * d_, n_ * hqg_ * d_, 1, 0, 0, 0};
    c.src = src;
    c.src_dtype = t;
    c.dst = dst;
    c.dst_dtype = t;
    kernels::copy_strided(c, ctx);
  }

  // one group's head-shard tokens [B][P n_loc][hqg][d] -> slices [P][block] holding [B][n_loc][hqg][d] of rank j.
  void back_tokens(const void* src, void* dst, DType t, std::int64_t block) {
    kernels::StridedCopy c;
    c.ndim = 3;
    c.shape = {p_, b_, n_loc_ * hqg_ * d_, 1, 1, 1};
    c.src_strides = {n_loc_ * hqg_ * d_, n_ * hqg_ * d_, 1, 0, 0, 0};
    c.dst_strides = {block, n_loc_ * hqg_ * d_, 1, 0, 0, 0};
    c.src = src;
    c.src_dtype = t;
    c.dst = dst;
    c.dst_dtype = t;
    kernels::copy_strided(c, ctx);
  }

  // slices [P][block] (offset `off`: [B][n_loc][per/G][d] from rank i) -> tokens [B][n_loc][heads][d],
  // heads i per + g per/G + k.
  void to_heads(const void* src, DType st, void* dst, DType dt, int per, int heads, int g, std::int64_t off,
                std::int64_t block) {
    const int per_g = per / g_;
    kernels::StridedCopy c;
    c.ndim = 4;
    c.shape = {p_, b_, n_loc_, std::int64_t{per_g} * d_, 1, 1};
    c.src_strides = {block, n_loc_ * per_g * d_, std::int64_t{per_g} * d_, 1, 0, 0};
    c.dst_strides = {std::int64_t{per} * d_, n_loc_ * heads * d_, std::int64_t{heads} * d_, 1, 0, 0};
    c.src = static_cast<const char*>(src) + off * dtype_size(st);
    c.src_dtype = st;
    c.dst = static_cast<char*>(dst) + std::int64_t{g} * per_g * d_ * dtype_size(dt);
    c.dst_dtype = dt;
    kernels::copy_strided(c, ctx);
  }

  int p_ = 1, g_ = 1, hq_ = 1, hkq_ = 1, hqg_ = 1, hkqg_ = 1, b_ = 1, d_ = 64;
  std::int64_t n_loc_ = 0, n_ = 0, head_pool_ = 0;
  // Elements: per peer and group (q_slice_, kv_slice_, block_), per group of a head-shard buffer
  // (q_group_, lse_group_, pool_group_), and one of the K, V halves of the pools (pool_).
  std::int64_t q_slice_ = 0, kv_slice_ = 0, block_ = 0, q_group_ = 0, lse_group_ = 0, pool_group_ = 0, pool_ = 0;
  std::size_t elt_ = 4;
  Segments all_, local_;
  kernels::AttentionShape kshape_;
  std::unique_ptr<DeviceTables> tables_;
  DeviceBuffer q_pos_, send_, recv_, q_hs_, o_hs_, do_hs_, lse_hs_, lse_send_, lse_recv_, kv_pool_, dq_hs_, dkv_pool_,
      fwd_ws_, bwd_ws_;
  CommOverlap overlap_;
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_ulysses_mode(const Session& s, const LayerShape& sh,
                                                              const AttentionOptions& o) {
  return std::make_unique<UlyssesMode>(s, sh, o);
}

}  // namespace ringcast
