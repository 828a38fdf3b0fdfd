// What both combines of surrogate (CAST) clusters share (attention_cast_mode.hpp): the fp32 inputs,
// the affinities, the assignment and the cluster summaries in the forward; their gradients, the
// affinities' backward and the gradients' conversion to the storage dtype in the backward. Host waits:
// the members and counts, downloaded after the assignment.
#include "attention_cast_mode.hpp"
#include "clustered_internal.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

#include <algorithm>

namespace ringcast {

SurrogateMode::SurrogateMode(const Session& s, const LayerShape& sh, const AttentionOptions& o)
    : Mode(s, sh, o), c_(o.resolved_surrogate_clusters(sh)) {
  check_clustered_support(sh, o);
  const std::int64_t d = sh.head_dim, n = sh.local_len(), ps = o.page_size;
  cast_ = {sh.batch, n, sh.heads, sh.kv_heads, sh.head_dim, c_, o.page_size};
  const std::int64_t q_elems = sh.batch * n * sh.heads * d, kv_elems = sh.batch * n * sh.kv_heads * d;
  a_q_ = allocate(sh.batch * sh.heads * n * c_ * sizeof(float));
  a_k_ = allocate(sh.batch * sh.kv_heads * n * c_ * sizeof(float));
  d_a_q_ = allocate(a_q_.bytes());
  d_a_k_ = allocate(a_k_.bytes());
  members_ = allocate(sh.batch * sh.kv_heads * c_ * ps * sizeof(std::int32_t));
  counts_ = allocate(sh.batch * sh.kv_heads * c_ * sizeof(std::int32_t));
  const std::int64_t sums = sh.kv_heads * cast_.summary_rows() * d;
  for (DeviceBuffer* b : {&key_sums_, &value_sums_, &d_key_sums_, &d_value_sums_}) *b = allocate(sums * sizeof(float));
  d_q_ = allocate(q_elems * sizeof(float));
  d_kv_ = allocate(2 * kv_elems * sizeof(float));
  if (sh.dtype != DType::kF32) {
    q32_ = allocate(q_elems * sizeof(float));
    kv32_ = allocate(2 * kv_elems * sizeof(float));
    s32_ = allocate(sh.kv_heads * c_ * d * sizeof(float));
  }
  // No entry is causal, so the kernel reads no query position: one zero buffer serves every call.
  q_pos_ = allocate(std::max<std::int64_t>(n, cast_.member_rows()) * sizeof(std::int32_t));
  kernels::fill_zero(q_pos_.data(), q_pos_.bytes(), ctx);
}

void SurrogateMode::forward(const AttentionForwardArgs& a) {
  const Fp32Inputs in = fp32_inputs(a.q, a.k, a.v, a.surrogates);
  kernels::cast_affinities({cast_, in.q, in.k, in.s, a_q_.as<float>(), a_k_.as<float>()}, ctx);
  kernels::cast_assign({cast_,
                        options.assignment == SurrogateAssignment::kTopK ? kernels::CastAssignment::kTopK
                                                                         : kernels::CastAssignment::kSingleTopK,
                        a_q_.as<const float>(), a_k_.as<const float>(), members_.as<std::int32_t>(),
                        counts_.as<std::int32_t>()},
                       ctx);
  kernels::cast_summaries({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                           a_k_.as<const float>(), in.k, in.v, key_sums_.as<float>(), value_sums_.as<float>()},
                          ctx);
  download(members_host_, members_);
  download(counts_host_, counts_);
  combine_forward(a, in);
}

void SurrogateMode::backward(const AttentionBackwardArgs& a) {
  check_forward("backward");
  const Fp32Inputs in = fp32_inputs(a.q, a.k, a.v, a.surrogates);
  kernels::fill_zero(d_kv_.data(), d_kv_.bytes(), ctx);
  kernels::fill_zero(d_a_k_.data(), d_a_k_.bytes(), ctx);
  combine_backward(a, in);
  kernels::cast_affinities_backward({cast_, in.q, in.k, in.s, d_a_q_.as<const float>(), d_a_k_.as<const float>(),
                                     d_q_.as<float>(), d_k(), a.d_surrogates.as<float>()},
                                    ctx);
  const std::int64_t q_elems = shape.batch * q_elems_per_element(), kv_elems = shape.batch * kv_elems_per_element();
  kernels::copy_strided(kernels::StridedCopy::flat(d_q_.data(), DType::kF32, a.d_q.data, shape.dtype, q_elems), ctx);
  kernels::copy_strided(kernels::StridedCopy::flat(d_k(), DType::kF32, a.d_k.data, shape.dtype, kv_elems), ctx);
  kernels::copy_strided(kernels::StridedCopy::flat(d_v(), DType::kF32, a.d_v.data, shape.dtype, kv_elems), ctx);
}

std::vector<std::int32_t> SurrogateMode::cluster_members() const {
  check_forward("cluster_members");
  std::vector<std::int32_t> out = members_host_;
  for (std::int32_t& j : out)
    if (j >= 0) j = positions[static_cast<std::size_t>(j)];
  return out;
}

void SurrogateMode::check_forward(const char* what) const {
  RINGCAST_CHECK(has_forward(), "clustered mode: {}() needs a forward() first", what);
}

void SurrogateMode::summaries_backward(const Fp32Inputs& in) {
  kernels::cast_summaries_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                                    a_k_.as<const float>(), in.k, in.v, d_key_sums_.as<const float>(),
                                    d_value_sums_.as<const float>(), d_a_k_.as<float>(), d_k(), d_v()},
                                   ctx);
}

Fp32Inputs SurrogateMode::fp32_inputs(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& s) const {
  if (shape.dtype == DType::kF32) return {q.as<const float>(), k.as<const float>(), v.as<const float>(), s.as<const float>()};
  const std::int64_t q_elems = shape.batch * q_elems_per_element(), kv_elems = shape.batch * kv_elems_per_element();
  float* q32 = q32_.as<float>();
  float* k32 = kv32_.as<float>();
  float* v32 = k32 + kv_elems;
  float* s32 = s32_.as<float>();
  kernels::copy_strided(kernels::StridedCopy::flat(q.data, shape.dtype, q32, DType::kF32, q_elems), ctx);
  kernels::copy_strided(kernels::StridedCopy::flat(k.data, shape.dtype, k32, DType::kF32, kv_elems), ctx);
  kernels::copy_strided(kernels::StridedCopy::flat(v.data, shape.dtype, v32, DType::kF32, kv_elems), ctx);
  kernels::copy_strided(kernels::StridedCopy::flat(s.data, shape.dtype, s32, DType::kF32,
                                                   std::int64_t{shape.kv_heads} * c_ * shape.head_dim),
                        ctx);
  return {q32, k32, v32, s32};
}

std::unique_ptr<DistributedAttention::Mode> make_surrogate_mode(const Session& s, const LayerShape& sh,
                                                                const AttentionOptions& o) {
  if (o.combine == ClusterCombine::kJoint) return make_surrogate_joint_mode(s, sh, o);
  return make_surrogate_mix_mode(s, sh, o);
}

}  // namespace ringcast
