// Gradient bucketing (grad_buckets.hpp).
#include "grad_buckets.hpp"

#include <ringcast/error.hpp>

#include <algorithm>
#include <limits>

namespace ringcast::model {

std::vector<GradRegion> plan_grad_buckets(std::vector<GradRegion> tensors, std::int64_t bucket_bytes) {
  RINGCAST_CHECK(bucket_bytes >= 0, "Model: the gradient bucket size ({} bytes) must be >= 0", bucket_bytes);
  const std::int64_t cap = bucket_bytes == 0 ? std::numeric_limits<std::int64_t>::max() / 2
                                             : std::max<std::int64_t>(bucket_bytes / std::int64_t{sizeof(float)}, 1);
  std::sort(tensors.begin(), tensors.end(), [](const GradRegion& a, const GradRegion& b) { return a.offset < b.offset; });
  std::vector<GradRegion> buckets;
  std::int64_t end = 0;  // where the next tensor must start: the tensors tile the buffer
  for (const GradRegion& t : tensors) {
    RINGCAST_CHECK(t.offset == end && t.count > 0, "Model: gradient tensor at {} ({} floats) does not follow {}",
                   t.offset, t.count, end);
    end += t.count;
  }
  for (auto t = tensors.rbegin(); t != tensors.rend(); ++t) {
    if (buckets.empty() || buckets.back().count + t->count > cap) {
      buckets.push_back(*t);
      continue;
    }
    GradRegion& b = buckets.back();
    b.offset = t->offset;
    b.count += t->count;
    b.ready = std::max(b.ready, t->ready);
  }
  std::stable_sort(buckets.begin(), buckets.end(), [](const GradRegion& a, const GradRegion& b) { return a.ready < b.ready; });
  return buckets;
}

}  // namespace ringcast::model
