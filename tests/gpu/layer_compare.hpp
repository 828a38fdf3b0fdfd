// Helpers of the GPU tests that run one distributed attention layer on a CUDA session and on the CPU
// backend with the same global inputs: a layer tensor in the session's memory and storage dtype
// (uploaded from fp32, read back as fp32), this rank's rows of a global tensor, a rank's tensors of one
// layer run (inputs uploaded, outputs poisoned), and the comparisons of the two runs (attended entries
// identical; O, LSE and the input gradients within bf16 bounds).
#pragma once

#include <ringcast/attention.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/plan.hpp>
#include <ringcast/session.hpp>
#include <ringcast/storage_bits.hpp>

#include "test_util.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <span>
#include <string_view>
#include <vector>

namespace ringcast::test {

inline int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

// One tensor of the layer on the session's device, in its storage dtype; read back as fp32.
class Tensor {
 public:
  Tensor(const Session& s, DType dtype, const std::vector<float>& host, std::initializer_list<std::int64_t> shape)
      : dtype_(dtype), count_(host.size()), buf_(host.size() * dtype_size(dtype), s.device()),
        view_(TensorView::contiguous(buf_.data(), dtype, shape, s.device())) {
    if (dtype == DType::kF32) {
      buf_.copy_from_host(host.data(), host.size() * sizeof(float));
      return;
    }
    std::vector<std::uint16_t> b(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) b[i] = storage_bits(host[i], dtype);
    buf_.copy_from_host(b.data(), b.size() * sizeof(std::uint16_t));
  }
  const TensorView& view() const { return view_; }
  std::vector<float> read(Stream stream) const {
    std::vector<float> out(count_);
    if (dtype_ == DType::kF32) {
      buf_.copy_to_host(out.data(), out.size() * sizeof(float), 0, stream);
      return out;
    }
    std::vector<std::uint16_t> b(count_);
    buf_.copy_to_host(b.data(), b.size() * sizeof(std::uint16_t), 0, stream);
    for (std::size_t i = 0; i < count_; ++i) out[i] = storage_value(b[i], dtype_);
    return out;
  }

 private:
  DType dtype_;
  std::size_t count_;
  DeviceBuffer buf_;
  TensorView view_;
};

// One layer's problem, the same on every rank: its shape (B = 2, this world's ranks), options, and the
// global inputs [B, n, heads, head_dim].
struct LayerProblem {
  LayerShape shape;
  AttentionOptions options;
  std::vector<float> q, k, v, d_o;

  LayerProblem(std::int64_t seq_len, int heads, int kv_heads, int head_dim, bool causal) {
    shape.seq_len = seq_len;
    shape.ranks = world_size();
    shape.batch = 2;
    shape.heads = heads;
    shape.kv_heads = kv_heads;
    shape.head_dim = head_dim;
    shape.causal = causal;
  }
  // `count` values, multiples of 1/16 in [-1/4, 1/4]: exact in bf16 (both backends start from the same
  // values), and sums of their products are exact in fp32 whatever the order.
  static std::vector<float> grid_values(std::size_t count, std::mt19937_64& rng) {
    std::uniform_int_distribution<int> grid(-4, 4);
    std::vector<float> x(count);
    for (float& e : x) e = static_cast<float>(grid(rng)) / 16.0f;
    return x;
  }
  std::size_t tokens(int heads) const {
    return static_cast<std::size_t>(shape.batch) * shape.seq_len * heads * shape.head_dim;
  }
  // q, k, v, d_o all grid values.
  void draw_grid(std::mt19937_64& rng) {
    q = grid_values(tokens(shape.heads), rng);
    k = grid_values(tokens(shape.kv_heads), rng);
    v = grid_values(tokens(shape.kv_heads), rng);
    d_o = grid_values(tokens(shape.heads), rng);
  }
};

// This rank's rows of a global [B, n, width] tensor, at the layer's positions.
inline std::vector<float> rows(const std::vector<float>& x, const LayerShape& s, int heads,
                               std::span<const std::int32_t> pos) {
  const std::int64_t width = std::int64_t{heads} * s.head_dim;
  std::vector<float> out;
  for (int b = 0; b < s.batch; ++b)
    for (const std::int32_t t : pos) {
      const float* row = x.data() + (std::int64_t{b} * s.seq_len + t) * width;
      out.insert(out.end(), row, row + width);
    }
  return out;
}

inline bool same_entry(const AttendedEntry& a, const AttendedEntry& b) {
  return a.batch == b.batch && a.tile == b.tile && a.first_row_pos == b.first_row_pos && a.kv_head == b.kv_head &&
         a.kind == b.kind && a.global_id == b.global_id && a.row_mask[0] == b.row_mask[0] &&
         a.row_mask[1] == b.row_mask[1] && a.causal == b.causal;
}

// This rank's tensors of one run of `layer` (shape s, s.dtype the storage dtype) on global q, k, v and
// d_o: the inputs its rows, the outputs (o, lse, d_q, d_k, d_v) NaN until the layer writes them.
struct LayerTensors {
  LayerTensors(const Session& session, const LayerShape& s, std::span<const std::int32_t> pos,
               const std::vector<float>& q_all, const std::vector<float>& k_all, const std::vector<float>& v_all,
               const std::vector<float>& d_o_all)
      : q(tokens(session, s, rows(q_all, s, s.heads, pos), s.heads)),
        k(tokens(session, s, rows(k_all, s, s.kv_heads, pos), s.kv_heads)),
        v(tokens(session, s, rows(v_all, s, s.kv_heads, pos), s.kv_heads)),
        d_o(tokens(session, s, rows(d_o_all, s, s.heads, pos), s.heads)),
        o(tokens(session, s, poison(s, s.heads), s.heads)),
        d_q(tokens(session, s, poison(s, s.heads), s.heads)),
        d_k(tokens(session, s, poison(s, s.kv_heads), s.kv_heads)),
        d_v(tokens(session, s, poison(s, s.kv_heads), s.kv_heads)),
        lse(session, DType::kF32,
            std::vector<float>(static_cast<std::size_t>(s.batch) * s.heads * s.local_len(), NAN),
            {s.batch, s.heads, s.local_len()}) {}

  AttentionForwardArgs forward_args() const { return {q.view(), k.view(), v.view(), o.view(), lse.view()}; }
  AttentionBackwardArgs backward_args() const {
    return {q.view(), k.view(), v.view(), o.view(), lse.view(), d_o.view(), d_q.view(), d_k.view(), d_v.view()};
  }

  Tensor q, k, v, d_o, o, d_q, d_k, d_v, lse;

 private:
  static Tensor tokens(const Session& session, const LayerShape& s, const std::vector<float>& x, int heads) {
    return Tensor(session, s.dtype, x, {s.batch, s.local_len(), heads, s.head_dim});
  }
  static std::vector<float> poison(const LayerShape& s, int heads) {
    return std::vector<float>(static_cast<std::size_t>(s.batch) * s.local_len() * heads * s.head_dim, NAN);
  }
};

// The communicator's counters of one forward and of one backward of `layer`, each pass counted alone.
struct PassCounters {
  comm::OpCounters fwd, bwd;
};
inline PassCounters run_counted(const Session& session, DistributedAttention& layer, const AttentionForwardArgs& fwd,
                                const AttentionBackwardArgs& bwd) {
  session.comm().reset_counters();
  layer.forward(fwd);
  const comm::OpCounters sent_fwd = session.comm().counters().total();
  session.comm().reset_counters();
  layer.backward(bwd);
  return {sent_fwd, session.comm().counters().total()};
}

// What a run left in the layer's outputs, read back as fp32, and (clustered modes) what it attended.
struct LayerResults {
  std::vector<float> o, lse, d_q, d_k, d_v;
  std::vector<AttendedEntry> entries;

  LayerResults(const LayerTensors& t, Stream stream)
      : o(t.o.read(stream)), lse(t.lse.read(stream)), d_q(t.d_q.read(stream)), d_k(t.d_k.read(stream)),
        d_v(t.d_v.read(stream)) {}
  LayerResults(const LayerTensors& t, const DistributedAttention& layer, Stream stream) : LayerResults(t, stream) {
    entries = layer.attended_entries();
  }
};

// The CUDA run's outputs and gradients (bf16) within 1e-2 (O, LSE) and 2e-2 (dQ, dK, dV) of the CPU's.
inline void expect_same_outputs(const LayerResults& gpu, const LayerResults& cpu) {
  expect_close("O (bf16) vs CPU", gpu.o, to_double(cpu.o), 1e-2);
  expect_close("LSE vs CPU", gpu.lse, to_double(cpu.lse), 1e-2);
  expect_close("dQ (bf16) vs CPU", gpu.d_q, to_double(cpu.d_q), 2e-2);
  expect_close("dK (bf16) vs CPU", gpu.d_k, to_double(cpu.d_k), 2e-2);
  expect_close("dV (bf16) vs CPU", gpu.d_v, to_double(cpu.d_v), 2e-2);
}

// The CUDA run attends to exactly the CPU run's entries, and its outputs and gradients are the CPU's
// (expect_same_outputs). When the entry counts differ on any rank,
// a fatal failure on every rank: they leave the test together (a rank returning alone would leave the
// others waiting in the test's collectives).
inline void expect_same_run(const LayerResults& gpu, const LayerResults& cpu) {
  int counts_differ = gpu.entries.size() != cpu.entries.size();
  MPI_Allreduce(MPI_IN_PLACE, &counts_differ, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  ASSERT_EQ(gpu.entries.size(), cpu.entries.size()) << "the backends attend to different numbers of entries";
  ASSERT_EQ(counts_differ, 0) << "on another rank, the backends attend to different numbers of entries";
  std::size_t differ = 0;
  for (std::size_t i = 0; i < cpu.entries.size(); ++i) differ += !same_entry(gpu.entries[i], cpu.entries[i]);
  std::printf("    %zu attended entries, %zu differ\n", cpu.entries.size(), differ);
  EXPECT_EQ(differ, 0u) << "selections or tables differ between CUDA and the CPU backend";
  expect_same_outputs(gpu, cpu);
}

// The bytes a layer sent and received, forward and backward, averaged over the ranks, within
// `ringcast plan`'s figures for the same shape and storage dtype (the clustered modes' are upper
// bounds of that mean: they assume every unit fetches its cap).
inline void expect_within_plan(const LayerShape& shape, const AttentionOptions& options, const comm::OpCounters& fwd,
                               const comm::OpCounters& bwd) {
  double mean[4] = {double(fwd.bytes_sent), double(fwd.bytes_received), double(bwd.bytes_sent),
                    double(bwd.bytes_received)};
  MPI_Allreduce(MPI_IN_PLACE, mean, 4, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  const LayerPlan plan = plan_layer(shape, options);
  const std::string_view dtype = dtype_name(shape.dtype);
  EXPECT_LE(mean[0] / shape.ranks, plan.bytes_sent_fwd) << "forward bytes sent, " << dtype;
  EXPECT_LE(mean[1] / shape.ranks, plan.bytes_recv_fwd) << "forward bytes received, " << dtype;
  EXPECT_LE(mean[2] / shape.ranks, plan.bytes_sent_bwd) << "backward bytes sent, " << dtype;
  EXPECT_LE(mean[3] / shape.ranks, plan.bytes_recv_bwd) << "backward bytes received, " << dtype;
}

}  // namespace ringcast::test
