// ClusteredTables (clustered_tables.hpp): one selection-and-table step, host or device resident.
#include "clustered_tables.hpp"

#include <ringcast/error.hpp>

namespace ringcast {

std::int64_t ClusteredTables::slot_bytes(const kernels::SelectionOptions& options, std::int64_t units,
                                         int kv_heads) {
  const std::int64_t per_head = units * (options.coarse_k * std::int64_t{sizeof(std::int64_t)} +
                                         (options.top_k + 2) * std::int64_t{sizeof(std::int32_t)});
  return (kv_heads * per_head + 255) / 256 * 256;
}

ClusteredTables::ClusteredTables(const kernels::ExecContext& ctx, const kernels::SelectionOptions& options,
                                 std::int64_t units, int kv_heads, void* slots)
    : ctx_(ctx), options_(options) {
  if (ctx.device.kind == DeviceKind::kCpu) {
    selections_.resize(static_cast<std::size_t>(kv_heads));
    return;
  }
  RINGCAST_CHECK(slots != nullptr, "clustered tables: the CUDA selection needs slot memory");
  auto* blocks = static_cast<std::int64_t*>(slots);
  auto* pages = reinterpret_cast<std::int32_t*>(blocks + kv_heads * units * options.coarse_k);
  std::int32_t* counts = pages + kv_heads * units * options.top_k;
  for (int g = 0; g < kv_heads; ++g)
    slots_.push_back({pages + g * units * options.top_k, blocks + g * units * options.coarse_k, counts + g * units * 2});
}

void ClusteredTables::select(int g, const kernels::SelectionParams& p) {
  const std::size_t heads = ctx_.device.kind == DeviceKind::kCpu ? selections_.size() : slots_.size();
  RINGCAST_CHECK(g >= 0 && static_cast<std::size_t>(g) < heads, "clustered tables: KV head {} of {}", g, heads);
  built_ = false;
  if (ctx_.device.kind == DeviceKind::kCpu)
    selections_[g] = kernels::select_pages(p, ctx_);
  else
    kernels::select_pages_to_slots(p, slots_[g], ctx_);
}

void ClusteredTables::build(std::span<const kernels::ClusteredLayout> layouts, const kernels::AttentionShape& shape) {
  RINGCAST_CHECK(static_cast<int>(layouts.size()) == shape.kv_heads, "clustered tables: {} layouts for {} KV heads",
                 layouts.size(), shape.kv_heads);
  if (ctx_.device.kind == DeviceKind::kCpu) {
    host_ = kernels::build_clustered_table(layouts, options_, selections_);
    host_.rows_vary = options_.unit == kernels::SelectUnit::kRow;
    cpu_tables_.emplace(host_, shape, ctx_.device, ctx_.stream);
  } else {
    build_on_device(layouts, shape);
  }
  built_ = true;
}

void ClusteredTables::reserve(DeviceBuffer& buf, std::size_t bytes) const {
  if (buf.bytes() < bytes) buf = DeviceBuffer(bytes, ctx_.device);
}

void ClusteredTables::build_on_device(std::span<const kernels::ClusteredLayout> layouts,
                                      const kernels::AttentionShape& shape) {
  num_units_ = shape.num_tiles() * shape.kv_heads;
  reserve(offsets_, (num_units_ + 1) * sizeof(std::int64_t));
  const auto storage = [this] {
    return kernels::DeviceTableStorage{offsets_.as<std::int64_t>(), entries_.as<kernels::BlockEntry>(),
                                       static_cast<std::int64_t>(entries_.bytes() / sizeof(kernels::BlockEntry)),
                                       key_meta_.as<kernels::KeyMeta>(),
                                       static_cast<std::int64_t>(key_meta_.bytes() / sizeof(kernels::KeyMeta))};
  };
  size_ = kernels::build_clustered_table_on_device(layouts, options_, slots_, storage(), ctx_);
  const kernels::DeviceTableStorage held = storage();
  if (size_.entries > held.entry_capacity || size_.key_meta > held.key_meta_capacity) {
    reserve(entries_, size_.entries * sizeof(kernels::BlockEntry));
    reserve(key_meta_, size_.key_meta * sizeof(kernels::KeyMeta));
    size_ = kernels::build_clustered_table_on_device(layouts, options_, slots_, storage(), ctx_);
  }
  reserve(t_offsets_, (shape.kv_heads * shape.num_pages + 1) * sizeof(std::int64_t));
  reserve(t_refs_, size_.entries * sizeof(kernels::PageRef));
  num_refs_ = size_.entries;
  kernels::transpose_on_device(table(), shape, t_offsets_.as<std::int64_t>(), t_refs_.as<kernels::PageRef>(), ctx_);
}

kernels::BlockTable ClusteredTables::table() const {
  if (cpu_tables_) return cpu_tables_->table();
  return {offsets_.as<const std::int64_t>(), entries_.as<const kernels::BlockEntry>(),
          size_.key_meta > 0 ? key_meta_.as<const kernels::KeyMeta>() : nullptr, size_.entries,
          options_.unit == kernels::SelectUnit::kRow};
}

kernels::TransposedTable ClusteredTables::transposed() const {
  if (cpu_tables_) return cpu_tables_->transposed();
  return {t_offsets_.as<const std::int64_t>(), t_refs_.as<const kernels::PageRef>(), num_refs_};
}

std::vector<std::int64_t> ClusteredTables::host_offsets() const {
  RINGCAST_CHECK(built_, "clustered tables: no table built yet");
  if (cpu_tables_) return host_.offsets;
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(num_units_ + 1));
  offsets_.download(std::span(offsets), ctx_.stream);
  return offsets;
}

kernels::HostBlockTable ClusteredTables::host_table() const {
  RINGCAST_CHECK(built_, "clustered tables: no table built yet");
  if (cpu_tables_) return host_;
  kernels::HostBlockTable t;
  t.offsets = host_offsets();
  t.entries.resize(static_cast<std::size_t>(size_.entries));
  t.key_meta.resize(static_cast<std::size_t>(size_.key_meta));
  entries_.download(std::span(t.entries), ctx_.stream);
  key_meta_.download(std::span(t.key_meta), ctx_.stream);
  return t;
}

}  // namespace ringcast
