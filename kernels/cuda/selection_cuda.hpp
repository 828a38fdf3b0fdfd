// CUDA backend of the page / coarse summaries and of the clustered mode's selection and block tables
// (summaries.hpp, selection.hpp, selection_device.hpp). Pointers in the parameter blocks are device
// memory; work is enqueued on `stream`. The summaries never allocate and return without synchronizing.
// The selection and table calls take stream-ordered scratch (their interfaces have no workspace); the
// ones that return host containers or sizes synchronize once.
#pragma once

#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/selection_device.hpp>
#include <ringcast/kernels/summaries.hpp>

namespace ringcast::kernels::cuda {

void page_summaries(const PageSummaryParams& p, Stream stream);
void coarse_summaries(const CoarseSummaryParams& p, Stream stream);
void page_summaries_backward(const PageSummaryBackwardParams& p, Stream stream);
void coarse_summaries_backward(const CoarseSummaryBackwardParams& p, Stream stream);

RemoteSelection select_remote_blocks(const RemoteSelectionParams& p, Stream stream);
ClusteredSelection select_pages(const SelectionParams& p, Stream stream);
void select_pages_to_slots(const SelectionParams& p, const SelectionSlots& out, Stream stream);
TableSize build_clustered_table_on_device(std::span<const ClusteredLayout> layouts, const SelectionOptions& options,
                                          std::span<const SelectionSlots> selections, const DeviceTableStorage& out,
                                          Stream stream);
void transpose_on_device(const BlockTable& table, const AttentionShape& shape, std::int64_t* offsets, PageRef* refs,
                         Stream stream);

}  // namespace ringcast::kernels::cuda
