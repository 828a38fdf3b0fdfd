// Internals shared by the attention modes: the Mode base (session, shape, positions, owned scratch),
// shard segments and page pools, block tables uploaded to the device, and the one "attend to a page
// pool and merge" step that ring and all-gather both run per source rank.
#pragma once

#include <ringcast/attention.hpp>
#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/memory.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace ringcast {

inline constexpr int kExactPageSize = 64;  // pages of the exact modes' pools

// A shard's tokens as segments of consecutive positions (1 when contiguous, 2 when zigzag). In a page
// pool every segment starts a new page, so the causal mask needs only a page's first position.
struct Segments {
  int count = 1;
  std::int64_t len = 0;                // tokens per segment
  std::int64_t pages_per_segment = 0;  // ceil(len / page_size)
  std::vector<std::int32_t> pos0;      // first global position of each segment
  std::int64_t pages() const { return count * pages_per_segment; }
  // The key ranges of the pool, its pages numbered from first_page.
  std::vector<kernels::KeyRange> ranges(std::int64_t first_page = 0) const;
};
Segments shard_segments(const LayerShape& shape, const AttentionOptions& options, int rank, int page_size);

// Where a shard's pages sit in a pool [B][heads][pool_pages][ps][d]: pages [first_page,
// first_page + seg.pages()) of every head. By default the pool holds exactly the shard.
struct PoolSpan {
  std::int64_t pool_pages = -1;  // -1: seg.pages()
  std::int64_t first_page = 0;
};

// Tokens [B, segments * len, heads, d] (dtype) <-> a shard's pages of a pool. pack leaves padding
// slots as they were (zero the pool once); unpack writes dst_dtype, skipping them.
void pack_to_pool(const void* tokens, DType dtype, void* pool, int batch, int heads, int head_dim,
                  const Segments& seg, int page_size, const kernels::ExecContext& ctx, PoolSpan span = {});
void unpack_from_pool(const float* pool, void* tokens, DType dst_dtype, int batch, int heads, int head_dim,
                      const Segments& seg, int page_size, const kernels::ExecContext& ctx, PoolSpan span = {});


// A forward table and its transpose, in device memory (host memory on the CPU backend).
class DeviceTables {
 public:
  DeviceTables(const kernels::HostBlockTable& table, const kernels::AttentionShape& shape, const Device& device,
               Stream stream);
  kernels::BlockTable table() const;
  kernels::TransposedTable transposed() const;
  std::size_t bytes() const;

 private:
  DeviceBuffer offsets_, entries_, key_meta_, t_offsets_, t_refs_;
  std::int64_t num_entries_ = 0, num_refs_ = 0;
  bool rows_vary_ = false;
};

class DistributedAttention::Mode {
 public:
  Mode(const Session& session, const LayerShape& shape, const AttentionOptions& options);
  virtual ~Mode() = default;
  virtual void forward(const AttentionForwardArgs& args) = 0;
  virtual void backward(const AttentionBackwardArgs& args) = 0;
  // DistributedAttention::attended_entries(); the exact modes keep the default, which throws.
  virtual std::vector<AttendedEntry> attended_entries() const;
  // DistributedAttention::table_entries(); the exact modes keep the default, which throws.
  virtual TableEntries table_entries() const;
  // DistributedAttention::cluster_members(); every mode but surrogate clusters keeps the default, which throws.
  virtual std::vector<std::int32_t> cluster_members() const;

  const Session& session;
  const LayerShape shape;
  const AttentionOptions options;
  const std::vector<std::int32_t> positions;
  const kernels::ExecContext ctx;
  std::size_t workspace_bytes = 0;

  // Checks the views of a call against the shape (dtype, device, contiguity, sizes).
  void check_args(const AttentionForwardArgs& a) const;
  void check_args(const AttentionBackwardArgs& a) const;
  // A surrogates-shaped view: required (shape [h_kv, c, d], dtype) exactly when options.uses_surrogates().
  void check_surrogates(const TensorView& t, const char* what, DType dtype) const;

 protected:
  // Scratch owned by the mode, counted in workspace_bytes.
  DeviceBuffer allocate(std::size_t bytes);
};

std::unique_ptr<DistributedAttention::Mode> make_ring_mode(const Session&, const LayerShape&, const AttentionOptions&);
std::unique_ptr<DistributedAttention::Mode> make_ulysses_mode(const Session&, const LayerShape&, const AttentionOptions&);
std::unique_ptr<DistributedAttention::Mode> make_clustered_mode(const Session&, const LayerShape&, const AttentionOptions&);

}  // namespace ringcast
