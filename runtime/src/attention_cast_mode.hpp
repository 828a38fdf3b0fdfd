// The clustered mode with clusters = surrogate (CAST; DESIGN.md §4.1-4.2, ALGORITHMS.md §5,
// docs/clustered-design.md "Surrogate clusters"): bidirectional, contiguous placement, CPU and CUDA.
// SurrogateMode is what both combines share (attention_cast.cpp): per rank, element and KV head, the
// caller's surrogates S [h_kv, c, d] score the local tokens (A_q = Q Sᵀ per query head, A_k = K Sᵀ),
// assign them to c clusters of at most page_size members and summarise every cluster by its
// softmax(A_k)-weighted means (kernels/cast.hpp); in the backward, the gradients of the affinities
// reach Q, K and S (the assignment is hard; dS is this rank's part, added into the caller's buffer).
// The combines derive from it:
//  - joint (attention_cast_joint.cpp): clusters are the pages of the clustered mode; one softmax over
//    a row's own clusters, the clusters its unit selected and summaries of every other cluster.
//  - cast (attention_cast_mix.cpp): CAST's mix of intra-cluster attention and every surrogate's
//    summary, weighted by softmax_c(A_q).
// Memory: activations, summaries and pools live on the session's device and are touched only by
// kernels (fp32; bf16 / fp16 inputs converted once per call); the attention reads storage-dtype
// copies. The host holds the cluster metadata: members and counts, downloaded after the assignment.
#pragma once

#include "attention_internal.hpp"

#include <ringcast/kernels/cast.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace ringcast {

// The inputs as the CAST kernels read them: fp32, on the session's device.
struct Fp32Inputs {
  const float* q;  // [B, n_loc, heads, d]
  const float* k;  // [B, n_loc, kv_heads, d]
  const float* v;
  const float* s;  // [kv_heads, c, d]
};

class SurrogateMode : public DistributedAttention::Mode {
 public:
  SurrogateMode(const Session& s, const LayerShape& sh, const AttentionOptions& o);
  void forward(const AttentionForwardArgs& a) final;
  void backward(const AttentionBackwardArgs& a) final;
  std::vector<std::int32_t> cluster_members() const final;

 protected:
  // The combine's part of forward(), after the assignment and the cluster summaries; and of
  // backward(), which must leave dA_q, dA_k and d_q_ (every row) and add into d_k() and d_v().
  virtual void combine_forward(const AttentionForwardArgs& a, const Fp32Inputs& in) = 0;
  virtual void combine_backward(const AttentionBackwardArgs& a, const Fp32Inputs& in) = 0;
  // Whether a forward() has run (the queries of the results need one).
  virtual bool has_forward() const = 0;
  void check_forward(const char* what) const;

  // ---- Addressing (layouts in kernels/cast.hpp). ----
  std::int64_t unit(int b, int g) const { return std::int64_t{b} * shape.kv_heads + g; }
  // Host copies of members [B, kv_heads, c, page_size] and counts [B, kv_heads, c].
  const std::int32_t* members(int b, int g) const { return members_host_.data() + unit(b, g) * c_ * options.page_size; }
  const std::int32_t* counts(int b, int g) const { return counts_host_.data() + unit(b, g) * c_; }
  // The same on the device: element b's members, every KV head, as a gather index [kv_heads][c ps].
  const std::int32_t* device_members(int b) const {
    return members_.as<const std::int32_t>() + unit(b, 0) * c_ * options.page_size;
  }
  const std::int32_t* device_counts(int b, int g) const { return counts_.as<const std::int32_t>() + unit(b, g) * c_; }
  // Cluster cl of (b, g) in a [kv_heads, summary_rows, d] summary buffer: row (g, b * c + cl).
  float* sums(const DeviceBuffer& buf, int b, int g) const {
    return buf.as<float>() + (g * cast_.summary_rows() + std::int64_t{b} * c_) * shape.head_dim;
  }
  std::int64_t kv_elems_per_element() const { return shape.local_len() * shape.kv_heads * shape.head_dim; }
  std::int64_t q_elems_per_element() const { return shape.local_len() * shape.heads * shape.head_dim; }
  // The K and V gradients [B, n_loc, kv_heads, d] in fp32.
  float* d_k() const { return d_kv_.as<float>(); }
  float* d_v() const { return d_k() + shape.batch * kv_elems_per_element(); }
  // The members' gradients from the cluster summaries' (d_key_sums_, d_value_sums_): into d_k(),
  // d_v() and dA_k.
  void summaries_backward(const Fp32Inputs& in);

  // Synchronous host <-> device copies of whole buffers in stream order (plain copies on the CPU backend).
  template <typename T>
  void download(std::vector<T>& dst, const DeviceBuffer& src) const {
    dst.resize(src.bytes() / sizeof(T));
    src.download(std::span<T>(dst), ctx.stream);
  }
  template <typename T>
  void upload(DeviceBuffer& dst, const std::vector<T>& src) const {
    dst.upload(std::span<const T>(src), ctx.stream);
  }

  const int c_;  // clusters per rank and KV head
  kernels::CastShape cast_;
  DeviceBuffer a_q_, a_k_, d_a_q_, d_a_k_, members_, counts_, key_sums_, value_sums_, d_key_sums_, d_value_sums_, d_q_,
      d_kv_, q_pos_;
  std::vector<std::int32_t> members_host_, counts_host_;

 private:
  // The inputs in fp32: the caller's with an fp32 storage dtype, converted copies otherwise.
  Fp32Inputs fp32_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& s) const;

  DeviceBuffer q32_, kv32_, s32_;  // fp32 copies of the inputs (storage dtype other than fp32)
};

std::unique_ptr<DistributedAttention::Mode> make_surrogate_joint_mode(const Session& s, const LayerShape& sh,
                                                                      const AttentionOptions& o);
std::unique_ptr<DistributedAttention::Mode> make_surrogate_mix_mode(const Session& s, const LayerShape& sh,
                                                                    const AttentionOptions& o);

}  // namespace ringcast
