// The clustered mode's selection and block tables kept on the device (CUDA backend): select_pages
// into fixed per-unit slots, the forward table of build_clustered_table built from those slots, and
// the transposed table of transpose(), so that a layer's choices never travel to the host. Results
// equal the host functions of selection.hpp and block_table.hpp entry for entry. Pointers are device
// memory; work is enqueued on ctx.stream; the calls that must learn a size synchronize once and say so.
// The CPU backend has the host functions instead: there these report "not supported".
#pragma once

#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/selection.hpp>

#include <cstdint>
#include <span>

namespace ringcast::kernels {

// One KV head's select_pages result in fixed slots: unit u (a tile, or a row in row mode) chose
// counts[2u] pool pages, pages[u * top_k ...] in ascending global position, and counts[2u + 1] coarse
// blocks, blocks[u * coarse_k ...] ascending. Slots past a unit's counts are unspecified.
struct SelectionSlots {
  std::int32_t* pages = nullptr;   // [units, top_k]
  std::int64_t* blocks = nullptr;  // [units, coarse_k]
  std::int32_t* counts = nullptr;  // [units, 2]
};
void select_pages_to_slots(const SelectionParams& p, const SelectionSlots& out, const ExecContext& ctx);

// Storage of a forward table on the device. offsets has tiles * kv_heads + 1 elements.
struct DeviceTableStorage {
  std::int64_t* offsets = nullptr;
  BlockEntry* entries = nullptr;
  std::int64_t entry_capacity = 0;
  KeyMeta* key_meta = nullptr;
  std::int64_t key_meta_capacity = 0;
};
struct TableSize {
  std::int64_t entries = 0;
  std::int64_t key_meta = 0;
};

// build_clustered_table from device selections (selections[g] of layouts[g], read as SelectionSlots
// with `options`' top_k). Writes the offsets, synchronizes to learn the sizes and returns them;
// fills entries and KeyMeta records only when both capacities hold them (else call again with room).
TableSize build_clustered_table_on_device(std::span<const ClusteredLayout> layouts, const SelectionOptions& options,
                                          std::span<const SelectionSlots> selections, const DeviceTableStorage& out,
                                          const ExecContext& ctx);

// transpose() of a device table: offsets [kv_heads * num_pages + 1], refs [table.num_entries].
void transpose_on_device(const BlockTable& table, const AttentionShape& shape, std::int64_t* offsets, PageRef* refs,
                         const ExecContext& ctx);

}  // namespace ringcast::kernels
