// The pieces the model stack is assembled from (runtime-internal). A Layer maps the residual stream
// of one geometry to the next (a pre-norm block, a VCC block, a Pyramidion pooling stage); a Mixer is
// one residual branch of a block (attention, FFN) and adds f(x) into its output. Parameters are
// declared while the stack is built (ParameterTable), scratch is reserved per key and shared by every
// layer (only layer inputs are kept: backward recomputes each layer right before differentiating it),
// and both are bound to memory once, before the first pass. Activations are [rows, D] fp32 matrices
// in the memory of the session's device (host on the CPU, device memory on CUDA, where every pass is
// enqueued on the session's stream), rows = batch * local_len in the geometry's row order.
#pragma once

#include <ringcast/kernels/attention.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/session.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ringcast::model {

// How a tensor starts: U(±1/sqrt(cols)) (PyTorch's Linear default), U(±1), ones, zeros.
enum class Init { kFanIn, kUnit, kOnes, kZeros };

// A declared tensor; resolves to pointers once the table is bound to the flat buffers.
struct ParamRef {
  std::int32_t index = -1;
};

// Names are unique. finalize() lays the tensors out decayed first (in declaration order), then the
// rest, so AdamW covers each group with one contiguous call; infos() is then in layout order.
class ParameterTable {
 public:
  ParamRef add(std::string name, std::int64_t rows, std::int64_t cols, bool decay, Init init);
  void finalize();
  std::int64_t total() const { return total_; }
  // Tensors declared so far; ParamRef{i} for i below it names the i-th declared.
  std::int32_t declared() const { return static_cast<std::int32_t>(infos_.size()); }
  std::int64_t decayed() const { return decayed_; }
  // In layout order once finalized.
  const std::vector<ParameterInfo>& infos() const { return infos_; }
  const ParameterInfo& info(ParamRef r) const {
    return infos_[static_cast<std::size_t>(slot_[static_cast<std::size_t>(r.index)])];
  }
  Init init(std::size_t index) const { return inits_[index]; }  // of infos()[index]
  const ParameterInfo& find(std::string_view name) const;  // throws Error on an unknown name

 private:
  std::vector<ParameterInfo> infos_;
  std::vector<Init> inits_;
  std::vector<std::int32_t> slot_;  // ParamRef::index -> index into infos_
  std::int64_t total_ = 0, decayed_ = 0;
  bool final_ = false;
};

// Named buffers on the session's device shared by every layer: reserve() while building (the largest
// request per key wins), bind() once, get() at run time. A pointer from get() stays valid for the
// model's lifetime. Sizes are in floats; a buffer of another type reserves the floats its bytes fill.
class Scratch {
 public:
  void reserve(const std::string& key, std::int64_t floats);
  void bind(const Device& device);
  float* get(std::string_view key) const;  // throws Error for a key never reserved
  std::int64_t floats(std::string_view key) const;

 private:
  std::map<std::string, std::int64_t, std::less<>> sizes_;
  std::map<std::string, DeviceBuffer, std::less<>> buffers_;
};

// The rows a layer works on: batch sequences of seq_len tokens (global), local_len of them on this
// rank, at the global positions `positions` (RoPE; the same for every batch element). Pooling stages
// change seq_len and positions between layers.
struct Geometry {
  int batch = 1;
  std::int64_t seq_len = 0;
  std::int64_t local_len = 0;
  bool causal = true;
  std::vector<std::int32_t> positions;  // [local_len], host memory
  // The positions where the kernels read them (RoPE): `positions` itself on the CPU; on CUDA the
  // device copy bind_positions() made, which copies of the geometry share. Bind once the positions
  // are final.
  std::shared_ptr<const DeviceBuffer> device_positions;
  std::int64_t rows() const { return std::int64_t{batch} * local_len; }
  void bind_positions(const Device& device, Stream stream);
  const std::int32_t* kernel_positions(const Device& device) const;
};

// What a pass needs besides its inputs: the session, the parameter and gradient buffers, scratch.
struct RunContext {
  const Session& session;
  kernels::ExecContext exec;
  const ParameterTable& table;
  const float* params;
  float* grads;
  const Scratch& scratch;
  std::uint64_t step;  // the optimizer step this pass belongs to (seeds per-step randomness)
  bool training;       // false for forward-only passes (evaluation)
  DType compute = DType::kF32;  // inputs of the matrix products (ModelConfig::compute_dtype, resolved)

  const float* p(ParamRef r) const { return params + table.info(r).offset; }
  float* g(ParamRef r) const { return grads + table.info(r).offset; }
};

// The address of element `index` of an array of `dtype` at `base`.
inline void* element_at(void* base, DType dtype, std::int64_t index) {
  return static_cast<char*>(base) + static_cast<std::size_t>(index) * dtype_size(dtype);
}
inline const void* element_at(const void* base, DType dtype, std::int64_t index) {
  return static_cast<const char*>(base) + static_cast<std::size_t>(index) * dtype_size(dtype);
}

// dst = src, n elements, converted (bf16 rounded to nearest even) when the dtypes differ.
void convert(const void* src, DType from, void* dst, DType to, std::int64_t n, const kernels::ExecContext& exec);

// One residual branch: forward adds f(x) into y; backward, after a forward on the same x (nothing
// else may run in between but the other branch of the same block), adds (∂f/∂x)ᵀ dy into dx and the
// parameter gradients into rc.grads. x, y, dx, dy are [rows, D] of the block's geometry.
class Mixer {
 public:
  virtual ~Mixer() = default;
  virtual void forward(const RunContext& rc, const float* x, float* y) = 0;
  virtual void backward(const RunContext& rc, const float* x, const float* dy, float* dx) = 0;
};

// One step of the stack: out = f(in), in [in_geometry rows, D], out [out_geometry rows, D], fp32.
// backward recomputes from `in` and writes d_in = (∂out/∂in)ᵀ d_out (overwriting), adding parameter
// gradients into rc.grads. Collective wherever the layer communicates: every rank calls alike.
class Layer {
 public:
  virtual ~Layer() = default;
  virtual const Geometry& in_geometry() const = 0;
  virtual const Geometry& out_geometry() const = 0;
  virtual void forward(const RunContext& rc, const float* in, float* out) = 0;
  virtual void backward(const RunContext& rc, const float* in, const float* d_out, float* d_in) = 0;
};

// A layer as the stack runs it: `in` and `out` are layer inputs as the model keeps them, in the
// stack's activation dtype (attention_dtype(), model_mixers.hpp: f32 on the CPU, bf16 on CUDA), so an
// output is rounded once, when it is stored, and the next layer's forward and its recompute in
// backward read the same stored value. Gradients stay fp32. Otherwise Layer's contract.
class StackLayer {
 public:
  virtual ~StackLayer() = default;
  virtual const Geometry& in_geometry() const = 0;
  virtual const Geometry& out_geometry() const = 0;
  virtual void forward(const RunContext& rc, const void* in, void* out) = 0;
  // d_in may be d_out when gradient_in_place().
  virtual void backward(const RunContext& rc, const void* in, const float* d_out, float* d_in) = 0;
  virtual bool gradient_in_place() const = 0;
};

// Runs an fp32 Layer in the stack: with an fp32 activation dtype it passes the buffers through;
// otherwise it converts the layer's input (and output) through fp32 scratch ("stage.in", "stage.out",
// reserved here), which holds [rows, D] fp32 of the layer's geometries.
class Fp32Layer final : public StackLayer {
 public:
  Fp32Layer(std::unique_ptr<Layer> layer, Scratch& scratch, int dim, DType activations);
  const Geometry& in_geometry() const override { return layer_->in_geometry(); }
  const Geometry& out_geometry() const override { return layer_->out_geometry(); }
  void forward(const RunContext& rc, const void* in, void* out) override;
  void backward(const RunContext& rc, const void* in, const float* d_out, float* d_in) override;
  bool gradient_in_place() const override { return false; }

 private:
  std::unique_ptr<Layer> layer_;
  int dim_;
  DType activations_;
};

}  // namespace ringcast::model
