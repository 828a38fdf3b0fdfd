// The soft top-k's test cases and their CPU-backend run, shared by the CPU suite (which checks that run
// against float64) and the GPU suite (which checks the CUDA backend against it).
// Outputs: s_tilde [B, n], a_history [B, T], the hard top-k [B, k].
#pragma once

#include <ringcast/kernels/routing.hpp>

#include <cstdint>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

namespace ringcast::test {

struct SoftTopkCase {
  int batch;
  std::int64_t seq;
  int k;
  float epsilon;
  int iterations;
  float scale;  // of the random scores
};

inline std::string describe(const SoftTopkCase& c) {
  std::ostringstream os;
  os << "B" << c.batch << " n" << c.seq << " k" << c.k << " eps" << c.epsilon << " T" << c.iterations << " scale"
     << c.scale;
  return os.str();
}
inline void PrintTo(const SoftTopkCase& c, std::ostream* os) { *os << describe(c); }

struct SoftTopkResult {
  std::vector<float> s_tilde, a_history;
  std::vector<std::int32_t> top;
};

inline SoftTopkResult cpu_soft_topk(const SoftTopkCase& c, const std::vector<float>& s) {
  SoftTopkResult r{std::vector<float>(s.size()), std::vector<float>(std::size_t(c.batch) * c.iterations),
                   std::vector<std::int32_t>(std::size_t(c.batch) * c.k)};
  kernels::soft_topk({c.batch, c.seq, c.k, c.epsilon, c.iterations, s.data(), r.s_tilde.data(), r.a_history.data(),
                      r.top.data(), {}},
                     kernels::ExecContext{});
  return r;
}

}  // namespace ringcast::test
