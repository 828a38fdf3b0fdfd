// The float64 reference of ringcast::Model on whole sequences: the same architecture (embedding,
// pre-norm blocks with RoPE at positions 0..n-1, GQA attention, SwiGLU, final RMSNorm) with the
// decoder's LM head (mean cross-entropy over targets >= 0) or the encoder's mean-pooled
// classification head (mean cross-entropy over the batch's labels). Parameters by name, as
// Model::parameter_table() names them. Also the building blocks, for references of the options.
#pragma once

#include "test_util.hpp"

#include <ringcast/model.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ringcast::test {

using Params = std::map<std::string, Vec>;

// y = x Wᵀ, x [rows, in], W [out, in].
void ref_linear(const Vec& x, const Vec& w, std::int64_t rows, int in, int out, Vec& y);
Vec ref_rms(const Vec& x, const Vec& g, std::int64_t rows, int dim, double eps);
// In place on [batch, n, heads, d] rows at positions[t] (0..n-1 when empty).
void ref_rope(Vec& x, int batch, std::int64_t n, int heads, int d, double theta,
              const std::vector<std::int32_t>& positions = {});

// tokens [batch, n]; targets [batch, n] (decoder) or labels [batch] (encoder).
double reference_loss(const ModelConfig& c, const Params& p, int batch, std::int64_t n,
                      const std::vector<std::int32_t>& tokens, const std::vector<std::int32_t>& targets);

// Every parameter of a model, by name, in float64.
Params parameters_of(Model& model);

}  // namespace ringcast::test
