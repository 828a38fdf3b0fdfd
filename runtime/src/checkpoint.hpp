// Model checkpoints: one file, written by rank 0 atomically (temporary file in the same folder,
// fsync, rename, fsync of the folder) and read by rank 0, checked, and broadcast to every rank.
// Layout (native byte order, so a checkpoint moves between machines of one endianness):
//   "RINGCKPT" | u32 version | u32 0 | u64 fingerprint bytes | fingerprint | i64 steps | u64 n |
//   f32 params[n] | f32 adam_m[n] | f32 adam_v[n] | u64 user bytes | user state | u64 FNV-1a of all before.
// The fingerprint is the model configuration and parameter table as text: a checkpoint loads only into
// the model it was written for (on either backend). Every failure throws the same Error on every rank.
// What crosses ranks goes through the session's communicator, staged in device memory when that is
// where it works (NCCL).
#pragma once

#include "model_parts.hpp"

#include <ringcast/model.hpp>
#include <ringcast/session.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace ringcast::model {

std::string fingerprint(const ModelConfig& config, const ParameterTable& table);

// Host memory; only rank 0's buffers are read.
struct CheckpointData {
  std::string fingerprint;
  std::int64_t steps = 0;
  std::span<const float> params, adam_m, adam_v;
  std::span<const std::byte> user_state;
};

struct LoadedCheckpoint {
  std::int64_t steps = 0;
  std::vector<std::byte> user_state;
};

// Collective.
void save_checkpoint(const Session& session, const std::string& path, const CheckpointData& data);
// Collective. On success writes the file's parameters and AdamW moments into `buffers` (params,
// adam_m, adam_v: `count` floats each in the memory of the session's device) on every rank; on any
// failure throws before touching them.
LoadedCheckpoint load_checkpoint(const Session& session, const std::string& path, const std::string& fingerprint,
                                 const std::array<float*, 3>& buffers, std::int64_t count);

}  // namespace ringcast::model
