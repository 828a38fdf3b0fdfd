// The clustered mode's page selection and block tables for one batch element (DESIGN.md §4.1 steps
// 5-7), on the session's backend. CPU: select_pages and the host table builder. CUDA: the
// device-resident path of selection_device.hpp -- selections in per-unit slots, the forward table
// built from them and its transpose, all on the device (one synchronisation to learn the table's
// size); nothing of a layer's choice travels to the host unless host_table() asks for it. Table
// buffers grow to the largest table seen and are reused by later forwards; the selection slots live in
// device memory the caller lends, read only between select() and build().
#pragma once

#include "attention_internal.hpp"

#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/selection_device.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace ringcast {

class ClusteredTables {
 public:
  // Device bytes of the selection slots of `units` units per KV head (CUDA), a multiple of 256: every
  // head's blocks [units, coarse_k] int64, then every head's pages [units, top_k] int32, then counts
  // [units, 2] int32.
  static std::int64_t slot_bytes(const kernels::SelectionOptions& options, std::int64_t units, int kv_heads);

  // units: selection units per KV head (tiles, or rows in row mode) of the element. slots: on CUDA,
  // slot_bytes() of device memory (256-byte aligned) that nothing else uses from the first select()
  // of a forward to its build(); unused on the CPU.
  ClusteredTables(const kernels::ExecContext& ctx, const kernels::SelectionOptions& options, std::int64_t units,
                  int kv_heads, void* slots);

  // Selects the pages of KV head g (p.layout is its layout); heads may be selected in any order.
  void select(int g, const kernels::SelectionParams& p);
  // The forward table over the pool of `shape` from every head's selection, and its transpose.
  void build(std::span<const kernels::ClusteredLayout> layouts, const kernels::AttentionShape& shape);

  kernels::BlockTable table() const;
  kernels::TransposedTable transposed() const;
  // The forward table in host memory (downloaded on CUDA: for inspection, not for the hot path).
  kernels::HostBlockTable host_table() const;
  // Its offsets only (units + 1), in host memory.
  std::vector<std::int64_t> host_offsets() const;
  bool built() const { return built_; }

 private:
  void build_on_device(std::span<const kernels::ClusteredLayout> layouts, const kernels::AttentionShape& shape);
  // Reallocates `buf` when it holds fewer than `bytes`.
  void reserve(DeviceBuffer& buf, std::size_t bytes) const;

  kernels::ExecContext ctx_;
  kernels::SelectionOptions options_;
  bool built_ = false;
  // CPU backend: per KV head its selection, then the tables.
  std::vector<kernels::ClusteredSelection> selections_;
  kernels::HostBlockTable host_;
  std::optional<DeviceTables> cpu_tables_;
  // CUDA backend: per KV head the slots (pages, blocks, counts), then the tables.
  std::vector<kernels::SelectionSlots> slots_;
  DeviceBuffer offsets_, entries_, key_meta_, t_offsets_, t_refs_;
  kernels::TableSize size_;
  std::int64_t num_units_ = 0, num_refs_ = 0;
};

}  // namespace ringcast
