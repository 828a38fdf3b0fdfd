// Pyramidion pooling stage (ALGORITHMS.md §2) over a sequence sharded across ranks: the scorer
// s = sigmoid(w·x + b) + 1e-5, then log2(n / pool_to) rounds of the successive-halving soft top-k over
// the whole sequence (global sort, best paired with worst, ties to the lower sequence index, survivors
// in sequence order). After every round the survivors are rebalanced so that rank r holds survivors
// [r·m/P, (r+1)·m/P) of the m that remain; the pooled sequence is therefore contiguous per rank and its
// RoPE positions are the survivor indices 0..pool_to-1 (one geometry for every batch element, whatever
// each sequence selected). Encoder stacks only (the input geometry is bidirectional).
// Both backends run one code path: states and scores stay in the session device's memory; each round
// downloads its gathered scores and plans the pairing on the host (pyramidion.cpp says where).
#pragma once

#include "model_parts.hpp"

#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/session.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ringcast::model {

class PyramidionPool final : public Layer {
 public:
  // Collective (gathers every rank's positions). Declares prefix + "pool_w" [1, D] (decayed) and
  // prefix + "pool_b" [1, 1] (not decayed). Throws Error, alike on every rank, unless
  // in.seq_len / pool_to is a power of two >= 2, pool_to is a multiple of the ranks, and the
  // positions of `in` are a permutation of [0, seq_len) in equal shares.
  PyramidionPool(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& prefix,
                 const ModelConfig& c, const Geometry& in, std::int64_t pool_to);

  const Geometry& in_geometry() const override { return in_; }
  const Geometry& out_geometry() const override { return out_; }
  int rounds() const { return rounds_; }
  void forward(const RunContext& rc, const float* in, float* out) override;
  void backward(const RunContext& rc, const float* in, const float* d_out, float* d_in) override;
  // The last pass's plan of `round` (the pairing it chose, as this rank's rows sent and received),
  // for comparing backends.
  const std::vector<std::int64_t>& sent_rows(int round) const { return plans_.at(static_cast<std::size_t>(round)).inputs.rows; }
  const std::vector<std::int64_t>& received_rows(int round) const {
    return plans_.at(static_cast<std::size_t>(round)).pairs.rows;
  }

 private:
  // Rows that one all_to_all_v moves, in its packed order: rows[k] is a row index of the buffer on
  // this side, counts[p] how many rows go to (or come from) rank p. device_rows: rows where the
  // kernels read them (in route_rows_).
  struct Routes {
    std::vector<std::int64_t> rows;
    std::vector<std::size_t> counts;
    const std::int64_t* device_rows = nullptr;
  };
  // One round for every batch element: input rows b·in_len + j, output slot (b·out_len + o) merges
  // pair rows 2·slot (the better-scored member) and 2·slot + 1.
  struct RoundPlan {
    std::int64_t in_len = 0, out_len = 0;  // per rank
    Routes inputs;  // this rank's input rows, in the order they leave
    Routes pairs;   // this rank's pair rows, in the order they arrive
  };

  // Runs the scorer and every round, keeping each round's plan and pairs for the backward; writes the
  // last round's states into `out` when it is not null.
  void run_rounds(const RunContext& rc, const float* x, float* out);
  void plan_round(int round, const float* gathered_scores, RoundPlan& plan) const;
  // Copies the plan's rows to the device, at the round's place in route_rows_.
  void upload_routes(const RunContext& rc, int round, RoundPlan& plan);
  // Moves rows of D + 1 floats (a state and its score) from src_rows of (src_e, src_s) to dst_rows of
  // (dst_e, dst_s); backward passes the routes of the forward swapped.
  void exchange(const RunContext& rc, const Routes& src_routes, const float* src_e, const float* src_s,
                const Routes& dst_routes, float* dst_e, float* dst_s) const;
  std::int64_t round_len(int round) const;   // per-rank tokens entering `round`
  std::int64_t pairs_offset(int round) const;  // of the round's pair rows in the pairs scratch

  int ranks_, rank_, dim_;
  float beta_;
  int rounds_;
  Geometry in_, out_;
  ParamRef w_, b_;
  // Round 0 reads rows in the input geometry's placement: slot p·local_len + j holds position
  // position_of_[·]; location_of_ is the inverse. Later rounds are contiguous (the identity).
  std::vector<std::int32_t> position_of_, location_of_;
  std::vector<RoundPlan> plans_;
  std::vector<float> gathered_;  // a round's gathered scores, on the host for planning
  DeviceBuffer route_rows_;      // int64: round r's inputs then pairs rows at 2 · pairs_offset(r)
};

}  // namespace ringcast::model
