// Validation of attention parameters, shared by both backends (called once by the dispatcher).
// Shapes, dtypes and pointers are checked for every device; on the CPU the block table is host
// memory, so its contents are checked too (a CUDA table lives on the device and is trusted).
#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>

#include <cmath>

namespace ringcast::kernels {
namespace {

void check_host_table(const AttentionForwardParams& p) {
  const AttentionShape& s = p.shape;
  const BlockTable& t = p.table;
  const std::int64_t units = s.num_units();
  RINGCAST_CHECK(t.offsets[0] == 0 && t.offsets[units] == t.num_entries,
                 "attention: block table offsets must run from 0 to num_entries ({}), got {} .. {}",
                 t.num_entries, t.offsets[0], t.offsets[units]);
  for (std::int64_t u = 0; u < units; ++u) {
    RINGCAST_CHECK(t.offsets[u] <= t.offsets[u + 1], "attention: block table offsets decrease at unit {}", u);
  }
  for (std::int64_t i = 0; i < t.num_entries; ++i) {
    const BlockEntry& e = t.entries[i];
    RINGCAST_CHECK(e.page >= 0 && e.page < s.num_pages, "attention: entry {} names page {}, the pool has {}",
                   i, e.page, s.num_pages);
    RINGCAST_CHECK(e.key_count >= 1 && e.key_count <= s.page_size,
                   "attention: entry {} has key_count {}, expected 1..{}", i, e.key_count, s.page_size);
    RINGCAST_CHECK((e.flags & ~std::uint32_t{kEntryCausal | kEntryKeyBias}) == 0,
                   "attention: entry {} has unknown flags {:#x}", i, e.flags);
    RINGCAST_CHECK(!(e.flags & kEntryKeyBias) || p.key_bias,
                   "attention: entry {} reads key_bias (kEntryKeyBias) but key_bias is null", i);
    // key_mask has one bit per key of a page of up to 64 keys; larger pages take all their keys.
    RINGCAST_CHECK(s.page_size <= 64 || e.key_mask == ~std::uint64_t{0},
                   "attention: entry {} has a key_mask, which covers 64 keys, but page_size is {}", i, s.page_size);
    RINGCAST_CHECK(e.key_meta >= -1, "attention: entry {} has key_meta {}", i, e.key_meta);
    RINGCAST_CHECK(e.key_meta < 0 || t.key_meta, "attention: entry {} uses key_meta but the table has none", i);
  }
}

}  // namespace

void validate(const AttentionForwardParams& p, DeviceKind device) {
  const AttentionShape& s = p.shape;
  const bool cuda = device == DeviceKind::kCuda;
  RINGCAST_CHECK(s.batch >= 1 && s.heads >= 1 && s.kv_heads >= 1 && s.num_pages >= 0,
                 "attention: batch ({}), heads ({}), kv_heads ({}) must be >= 1 and num_pages ({}) >= 0",
                 s.batch, s.heads, s.kv_heads, s.num_pages);
  RINGCAST_CHECK(s.seq_q >= 1, "attention: seq_q must be >= 1, got {}", s.seq_q);
  RINGCAST_CHECK(s.heads % s.kv_heads == 0, "attention: heads ({}) must be a multiple of kv_heads ({})", s.heads,
                 s.kv_heads);
  if (cuda) {
    RINGCAST_CHECK(s.head_dim == 64 || s.head_dim == 128,
                   "attention: head_dim {} is not supported on CUDA (64 or 128)", s.head_dim);
  } else {
    RINGCAST_CHECK(s.head_dim >= 1 && s.head_dim <= 256,
                   "attention: head_dim {} is not supported on the CPU (1..256)", s.head_dim);
  }
  RINGCAST_CHECK(s.page_size == 32 || s.page_size == 64 || s.page_size == 128,
                 "attention: page_size {} is not supported (32, 64 or 128)", s.page_size);
  if (cuda) {
    RINGCAST_CHECK(p.dtype == DType::kBF16 || p.dtype == DType::kF16,
                   "attention: dtype {} is not supported on CUDA (bf16 or f16)", dtype_name(p.dtype));
  } else {
    RINGCAST_CHECK(p.dtype == DType::kF32, "attention: dtype {} is not supported on the CPU (f32)",
                   dtype_name(p.dtype));
  }
  RINGCAST_CHECK(p.o_dtype == p.dtype || p.o_dtype == DType::kF32,
                 "attention: o_dtype {} must be the storage dtype ({}) or f32", dtype_name(p.o_dtype),
                 dtype_name(p.dtype));
  RINGCAST_CHECK(std::isfinite(p.softmax_scale) && p.softmax_scale > 0.f,
                 "attention: softmax_scale must be finite and > 0, got {}", p.softmax_scale);
  RINGCAST_CHECK(p.q && p.k_pages && p.v_pages && p.q_pos && p.o && p.lse,
                 "attention: q, k_pages, v_pages, q_pos, o and lse must not be null");
  RINGCAST_CHECK(p.table.offsets, "attention: block table offsets must not be null");
  RINGCAST_CHECK(p.table.num_entries >= 0 && (p.table.num_entries == 0 || p.table.entries),
                 "attention: block table with {} entries has no entry array", p.table.num_entries);
  if (!cuda) check_host_table(p);
}

}  // namespace ringcast::kernels
