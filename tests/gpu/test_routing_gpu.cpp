// CUDA CoLT5 routing (routing.hpp) against the CPU backend on the same seeded inputs (the CPU backend
// is checked against float64 references and finite differences in tests/selection).
//  - Hard top-k: equal to the CPU's. Ties are planted (scores from a set of seven values, -0 next to +0)
//    and must go to the lower index.
//  - Router scores, d x, d u: relative L2 difference from the CPU <= 1e-5 (fp32; summation order).
//  - Soft top-k s~ and the recorded a_t: <= 1e-5. The iterations repeat the CPU's arithmetic; expf and
//    logf differ in the last bit and the sequence sums (double accumulators) in order, so a_t moves by
//    about 1e-7 relative, which s~ = exp(min(s + a, 0)/eps) scales by |a|/eps.
//  - d s through the T unrolled iterations: <= 1e-4, the CPU suite's gradient tolerance: the adjoint
//    passes T softmax steps, each adding rounding of the order of 1e-7 to a sum with cancellations.
//  - A sequence split across two "ranks" (two host threads, one stream each) whose reduction hook gets
//    device pointers in stream order and reduces through host staging: equal within 1e-6 to the whole
//    sequence on the GPU, as on the CPU. (The runtime's hook is an NCCL all-reduce on the stream.)
// Written outputs start poisoned; d x, d u and d s are added into random values. Shapes: one token,
// sequences of several 2048-token chunks with a partial last one, k = n, T = 1 and 2, scores hundreds
// of eps apart.
#include <ringcast/error.hpp>
#include <ringcast/kernels/routing.hpp>

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "backend_compare.hpp"
#include "device_array.hpp"
#include "soft_topk_case.hpp"
#include "test_util.hpp"

namespace ringcast::test {
namespace {

using namespace kernels;

const ExecContext kCpu{};
constexpr double kTol = 1e-5;
constexpr double kGradTol = 1e-4;

const SoftTopkCase kTopkCases[] = {
    {3, 200, 20, 1.0f, 50, 3.0f},    // CoLT5's eps = 1, T = 50
    {1, 1000, 64, 0.5f, 50, 2.0f},   // a sharper eps
    {2, 77, 9, 1.0f, 50, 300.0f},    // scores hundreds of eps apart
    {2, 7, 7, 1.0f, 20, 1.0f},       // k = n
    {2, 5000, 300, 1.0f, 50, 2.0f},  // three chunks, the last partial
    {2, 300, 30, 0.7f, 2, 1.5f},     // T = 2: one backward step
    {1, 4096, 256, 1.0f, 1, 1.0f},   // T = 1: no backward step
    {1, 1, 1, 1.0f, 3, 1.0f},        // one token
};

// The same forward on the device, its outputs downloaded.
SoftTopkResult gpu_soft_topk(const SoftTopkCase& c, const std::vector<float>& s) {
  const DeviceArray<float> g_s(s);
  DeviceArray<float> s_tilde(s.size()), a_history(std::size_t(c.batch) * c.iterations);
  DeviceArray<std::int32_t> top(std::size_t(c.batch) * c.k);
  soft_topk({c.batch, c.seq, c.k, c.epsilon, c.iterations, g_s.get(), s_tilde.get(), a_history.get(), top.get(), {}},
            cuda_context());
  return {s_tilde.download(), a_history.download(), top.download()};
}

TEST(RoutingGpu, RouterScoresAndBackwardMatchCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  struct Case {
    int batch;
    std::int64_t seq;
    int dim;
  };
  std::uint32_t seed = 1;
  for (const Case& c : {Case{2, 1000, 96}, Case{1, 1, 7}, Case{3, 4097, 33}}) {
    std::ostringstream os;
    os << 'B' << c.batch << " n" << c.seq << " D" << c.dim;
    const std::string what = os.str();
    const std::size_t rows = std::size_t(c.batch) * c.seq;
    const auto x = random_floats(rows * c.dim, seed++), u = random_floats(c.dim, seed++);
    std::vector<float> s(rows);
    router_scores({c.batch, c.seq, c.dim, x.data(), u.data(), s.data()}, kCpu);
    const DeviceArray<float> g_x(x), g_u(u);
    DeviceArray<float> g_s(rows);
    router_scores({c.batch, c.seq, c.dim, g_x.get(), g_u.get(), g_s.get()}, cuda_context());
    expect_near_cpu(what + " s", g_s.download(), s, kTol);

    const auto d_s = random_floats(rows, seed++), dx0 = random_floats(x.size(), seed++),
               du0 = random_floats(u.size(), seed++);
    std::vector<float> dx = dx0, du = du0;
    router_scores_backward({c.batch, c.seq, c.dim, x.data(), u.data(), d_s.data(), dx.data(), du.data()}, kCpu);
    const DeviceArray<float> g_ds(d_s);
    DeviceArray<float> g_dx(dx0), g_du(du0);
    router_scores_backward({c.batch, c.seq, c.dim, g_x.get(), g_u.get(), g_ds.get(), g_dx.get(), g_du.get()},
                           cuda_context());
    expect_near_cpu(what + " d x", added(g_dx.download(), dx0), added(dx, dx0), kTol);
    expect_near_cpu(what + " d u", added(g_du.download(), du0), added(du, du0), kTol);
  }
}

TEST(RoutingGpu, SoftTopkAndBackwardMatchCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 100;
  for (const SoftTopkCase& c : kTopkCases) {
    const std::string what = describe(c);
    const auto s = random_floats(std::size_t(c.batch) * c.seq, seed++, c.scale);
    const SoftTopkResult cpu = cpu_soft_topk(c, s), gpu = gpu_soft_topk(c, s);
    expect_near_cpu(what + " s~", gpu.s_tilde, cpu.s_tilde, kTol);
    expect_near_cpu(what + " a_t", gpu.a_history, cpu.a_history, kTol);
    expect_bitwise(what + " hard top-k", gpu.top, cpu.top);

    // The backward runs from the CPU's a_t on both sides, so it is compared on its own.
    const auto d_st = random_floats(s.size(), seed++), ds0 = random_floats(s.size(), seed++);
    std::vector<float> ds = ds0;
    soft_topk_backward({c.batch, c.seq, c.k, c.epsilon, c.iterations, s.data(), cpu.a_history.data(), d_st.data(),
                        ds.data(), {}},
                       kCpu);
    const DeviceArray<float> g_s(s), g_a(cpu.a_history), g_dst(d_st);
    DeviceArray<float> g_ds(ds0);
    soft_topk_backward({c.batch, c.seq, c.k, c.epsilon, c.iterations, g_s.get(), g_a.get(), g_dst.get(), g_ds.get(),
                        {}},
                       cuda_context());
    expect_near_cpu(what + " d s", added(g_ds.download(), ds0), added(ds, ds0), kGradTol);
  }
}

TEST(RoutingGpu, HardTopkTiesGoToLowerIndices) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  // The CPU suite's example, then many ties (including -0 against +0) across several chunks.
  const SoftTopkCase small{1, 10, 4, 1.0f, 10, 1.0f};
  const std::vector<float> s_small{0.5f, 1.0f, 0.5f, 1.0f, 0.25f, 0.5f, 0.75f, 0.5f, 0.25f, 0.5f};
  const SoftTopkCase many{2, 3000, 500, 1.0f, 5, 1.0f};
  const float values[] = {-1.0f, -0.5f, -0.0f, 0.0f, 0.25f, 0.5f, 1.0f};
  std::mt19937 gen(3);
  std::uniform_int_distribution<int> pick(0, 6);
  std::vector<float> s_many(std::size_t(many.batch) * many.seq);
  for (float& x : s_many) x = values[pick(gen)];
  for (const auto& [c, s] : {std::pair{small, s_small}, std::pair{many, s_many}}) {
    expect_bitwise(describe(c) + " tied hard top-k", gpu_soft_topk(c, s).top, cpu_soft_topk(c, s).top);
  }
}

// Two slices of each sequence run on two host threads with a stream each; the hook copies the device
// values out in stream order, combines them like an all-reduce, and copies the result back.
struct TwoRankReduce {
  std::barrier<> sync{2};
  std::vector<float> slot[2];
};

struct StagedHook {
  TwoRankReduce* shared;
  int rank;
  cudaStream_t stream;
};

void staged_all_reduce(float* values, int count, ReduceOp op, void* user) {
  auto* hook = static_cast<StagedHook*>(user);
  TwoRankReduce& r = *hook->shared;
  std::vector<float>& mine = r.slot[hook->rank];
  mine.resize(static_cast<std::size_t>(count));
  cuda_require(cudaMemcpyAsync(mine.data(), values, count * sizeof(float), cudaMemcpyDeviceToHost, hook->stream),
               "hook: copy out");
  cuda_require(cudaStreamSynchronize(hook->stream), "hook: synchronize");
  r.sync.arrive_and_wait();
  std::vector<float> reduced(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    reduced[i] = op == ReduceOp::kSum ? r.slot[0][i] + r.slot[1][i] : std::max(r.slot[0][i], r.slot[1][i]);
  }
  r.sync.arrive_and_wait();  // both have read the slots before either writes again
  cuda_require(cudaMemcpyAsync(values, reduced.data(), count * sizeof(float), cudaMemcpyHostToDevice, hook->stream),
               "hook: copy back");
  cuda_require(cudaStreamSynchronize(hook->stream), "hook: synchronize");
}

TEST(RoutingGpu, SplitSequenceWithDeviceHookMatchesWholeSequence) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const SoftTopkCase c{2, 4500, 300, 1.0f, 50, 3.0f};
  const std::int64_t split[3] = {0, 2100, c.seq};  // uneven slices, the first across a chunk boundary
  const auto s = random_floats(std::size_t(c.batch) * c.seq, 8, c.scale);
  const auto g = random_floats(s.size(), 9);

  const DeviceArray<float> g_s(s), g_g(g);
  DeviceArray<float> whole_st(s.size()), whole_a(std::size_t(c.batch) * c.iterations), whole_ds(s.size());
  cuda_require(cudaMemset(whole_ds.get(), 0, s.size() * sizeof(float)), "cudaMemset");
  soft_topk({c.batch, c.seq, c.k, c.epsilon, c.iterations, g_s.get(), whole_st.get(), whole_a.get(), nullptr, {}},
            cuda_context());
  soft_topk_backward({c.batch, c.seq, c.k, c.epsilon, c.iterations, g_s.get(), whole_a.get(), g_g.get(),
                      whole_ds.get(), {}},
                     cuda_context());

  TwoRankReduce shared;
  std::vector<float> s_tilde(s.size()), ds(s.size());
  std::string errors[2];
  auto rank_main = [&](int rank) {
    try {
      cudaStream_t stream = nullptr;
      cuda_require(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      StagedHook hook{&shared, rank, stream};
      const SliceAllReduce reduce{staged_all_reduce, &hook};
      const ExecContext ctx{{DeviceKind::kCuda, 0}, stream};
      const std::int64_t n = split[rank + 1] - split[rank];
      std::vector<float> sl(c.batch * n), gl(c.batch * n), zeros(c.batch * n, 0.0f);
      for (int b = 0; b < c.batch; ++b) {
        std::copy_n(&s[b * c.seq + split[rank]], n, &sl[b * n]);
        std::copy_n(&g[b * c.seq + split[rank]], n, &gl[b * n]);
      }
      const DeviceArray<float> d_sl(sl), d_gl(gl);
      DeviceArray<float> st(sl.size()), a(std::size_t(c.batch) * c.iterations), dsl(zeros);
      soft_topk({c.batch, n, c.k, c.epsilon, c.iterations, d_sl.get(), st.get(), a.get(), nullptr, reduce}, ctx);
      soft_topk_backward({c.batch, n, c.k, c.epsilon, c.iterations, d_sl.get(), a.get(), d_gl.get(), dsl.get(), reduce},
                         ctx);
      const std::vector<float> st_host = st.download(), ds_host = dsl.download();
      for (int b = 0; b < c.batch; ++b) {
        std::copy_n(&st_host[b * n], n, &s_tilde[b * c.seq + split[rank]]);
        std::copy_n(&ds_host[b * n], n, &ds[b * c.seq + split[rank]]);
      }
      cuda_require(cudaStreamDestroy(stream), "cudaStreamDestroy");
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  };
  std::thread other(rank_main, 1);
  rank_main(0);
  other.join();
  ASSERT_TRUE(errors[0].empty() && errors[1].empty()) << "rank 0: " << errors[0] << "; rank 1: " << errors[1];
  expect_near_cpu("split s~", s_tilde, whole_st.download(), 1e-6);
  expect_near_cpu("split d s", ds, whole_ds.download(), 1e-6);
}

}  // namespace
}  // namespace ringcast::test
