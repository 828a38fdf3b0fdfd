// The gradient buckets of the model's backward (model.cpp): which contiguous regions of the flat
// gradient buffer are summed over ranks by one all-reduce each, and from which point of the backward
// on every gradient in a region is final, so that its sum can run beside the rest of the backward
// (PyTorch DDP's buckets). Points count the backward's stages: 0 when it starts (the head's and the
// final norm's gradients come from forward()), then one per layer, last layer first, then the
// embedding's.
#pragma once

#include <cstdint>
#include <vector>

namespace ringcast::model {

// `count` floats of the flat gradient buffer from `offset`, final from backward point `ready` on.
struct GradRegion {
  std::int64_t offset = 0;
  std::int64_t count = 0;
  int ready = 0;
};

// Groups tensors (one region each; together they must tile the buffer from 0) into buckets: from
// the buffer's end down, consecutive tensors while a bucket holds at most bucket_bytes (a tensor
// larger than that is a bucket of its own; tensors are never split). A bucket is ready when its
// last tensor is. bucket_bytes 0: one bucket, the whole buffer, at the last point. Returns the
// buckets in the order they start: by ready point, then from the buffer's end down.
std::vector<GradRegion> plan_grad_buckets(std::vector<GradRegion> tensors, std::int64_t bucket_bytes);

}  // namespace ringcast::model
