// Cross-rank agreement checks (agreement.hpp).
#include "agreement.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/checks.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/memory.hpp>

#include <fmt/format.h>

#include <array>

namespace ringcast {

std::vector<std::int64_t> gather_from_all_ranks(const Session& session, std::span<const std::int64_t> mine) {
  const std::size_t n = mine.size(), p = static_cast<std::size_t>(session.size());
  DeviceBuffer send(n * sizeof(std::int64_t), session.device()), recv(n * p * sizeof(std::int64_t), session.device());
  send.copy_from_host(mine.data(), send.bytes(), 0, session.stream());
  session.comm().all_gather({send.data(), n, DType::kI64}, {recv.data(), n * p, DType::kI64}, session.stream());
  session.comm().synchronize(session.stream());
  std::vector<std::int64_t> all(n * p);
  recv.copy_to_host(all.data(), recv.bytes(), 0, session.stream());
  return all;
}

void require_same_layer_on_all_ranks(const Session& session, const LayerShape& s, const AttentionOptions& o) {
  constexpr std::array<std::string_view, 23> kNames{
      "seq_len", "ranks", "batch", "heads", "kv_heads", "head_dim", "dtype", "causal", "mode", "placement",
      "clusters", "selection", "score", "page_size", "coarse_pages", "top_k", "coarse_k", "remote_blocks",
      "remote_cap", "surrogate_clusters", "assignment", "combine", "pipeline_groups"};
  const std::array<std::int64_t, kNames.size()> mine{
      s.seq_len, s.ranks, s.batch, s.heads, s.kv_heads, s.head_dim, static_cast<std::int64_t>(s.dtype), s.causal,
      static_cast<std::int64_t>(o.mode), static_cast<std::int64_t>(o.placement), static_cast<std::int64_t>(o.clusters),
      static_cast<std::int64_t>(o.selection), static_cast<std::int64_t>(o.score), o.page_size, o.coarse_pages,
      o.top_k, o.coarse_k, o.remote_blocks, o.remote_cap, o.surrogate_clusters,
      static_cast<std::int64_t>(o.assignment), static_cast<std::int64_t>(o.combine), o.pipeline_groups};
  const auto all = gather_from_all_ranks(session, mine);
  for (int r = 1; r < session.size(); ++r)
    for (std::size_t f = 0; f < kNames.size(); ++f) {
      const std::int64_t theirs = all[r * kNames.size() + f], first = all[f];
      RINGCAST_CHECK(theirs == first,
                     "ranks disagree on the attention layer: {} is {} on rank 0 but {} on rank {} (pass the same "
                     "options to every rank)",
                     kNames[f], first, theirs, r);
    }
}

void require_finite_on_all_ranks(const Session& session,
                                 std::span<const std::pair<std::string_view, TensorView>> tensors) {
  const kernels::ExecContext ctx{session.device(), session.stream()};
  DeviceBuffer counters(tensors.size() * sizeof(std::int64_t), session.device());
  kernels::fill_zero(counters.data(), counters.bytes(), ctx);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const TensorView& t = tensors[i].second;
    kernels::count_nonfinite(t.data, t.dtype, t.numel(), counters.as<std::int64_t>() + i, ctx);
  }
  std::vector<std::int64_t> mine(tensors.size());
  counters.copy_to_host(mine.data(), counters.bytes(), 0, session.stream());
  const auto all = gather_from_all_ranks(session, mine);
  std::string where;
  for (int r = 0; r < session.size(); ++r)
    for (std::size_t i = 0; i < tensors.size(); ++i)
      if (const auto bad = all[r * tensors.size() + i]; bad > 0)
        where += fmt::format("{}{} non-finite in {} on rank {}", where.empty() ? "" : "; ", bad, tensors[i].first, r);
  RINGCAST_CHECK(where.empty(), "non-finite attention inputs: {}", where);
}

}  // namespace ringcast
