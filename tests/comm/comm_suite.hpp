// The checks every Communicator backend must pass, as a typed GoogleTest suite: test_comm_mpi.cpp
// runs it on host memory through MpiCommunicator, test_comm_nccl.cpp on device memory through NCCL.
// Every payload element is a pure function of (tag, source rank, destination, index), so each rank
// rebuilds what every other rank sent and checks every element it received. Values are exactly
// representable and sums over up to 4 ranks stay exact in every dtype, so results compare exactly.
// A Backend provides make() (a communicator over MPI_COMM_WORLD, or null to skip), allocate/release,
// upload/download, stream(), and kReducesHalf (whether bf16/f16 reductions are supported).
#pragma once

#include <ringcast/comm/communicator.hpp>
#include <ringcast/error.hpp>
#include <ringcast/storage_bits.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace ringcast::comm::testing {

using Bytes = std::vector<std::byte>;

inline std::uint64_t mix(std::uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr std::uint64_t kSeed = 0x72696e6763617374ull;

inline std::uint64_t key(std::uint64_t tag, int src, int dst, std::size_t i) {
  return mix(mix(mix(mix(kSeed ^ tag) ^ static_cast<std::uint64_t>(src)) ^ static_cast<std::uint64_t>(dst)) ^ i);
}

// A non-zero value exact in `t`: multiples of 1/64 for f32/f64, of 1/4 in [-8, 8) for bf16/f16 (a
// sum over 4 ranks needs at most 8 significant bits), integers otherwise. u8 stays below 64 so that
// sums over 4 ranks never overflow: Open MPI 4.1's vectorised MPI_SUM saturates uint8 instead of wrapping.
inline double sample(DType t, std::uint64_t k) {
  const auto m = static_cast<std::int64_t>(k % 1024) - 512;
  const double nonzero = static_cast<double>(m == 0 ? 1 : m);
  switch (t) {
    case DType::kF32:
    case DType::kF64: return nonzero / 64.0;
    case DType::kBF16:
    case DType::kF16: return static_cast<double>(static_cast<std::int64_t>(k % 64) - 32 + (k % 64 == 32)) / 4.0;
    case DType::kI32: return static_cast<double>(static_cast<std::int64_t>(k % 2'000'001) - 1'000'000) + (k % 2'000'001 == 1'000'000);
    case DType::kI64: return static_cast<double>(static_cast<std::int64_t>(k % 2'000'000'001) - 1'000'000'000) + (k % 2'000'000'001 == 1'000'000'000);
    case DType::kU8: return static_cast<double>(1 + k % 63);
  }
  return 1.0;
}

inline void store(DType t, double v, std::byte* dst) {
  auto put = [&](auto x) { std::memcpy(dst, &x, sizeof(x)); };
  switch (t) {
    case DType::kF32: put(static_cast<float>(v)); break;
    case DType::kF64: put(v); break;
    case DType::kBF16:
    case DType::kF16: put(storage_bits(static_cast<float>(v), t)); break;
    case DType::kI32: put(static_cast<std::int32_t>(v)); break;
    case DType::kI64: put(static_cast<std::int64_t>(v)); break;
    case DType::kU8: put(static_cast<std::uint8_t>(static_cast<std::int64_t>(v) & 0xff)); break;
  }
}

inline double load(DType t, const std::byte* src) {
  auto get = [&](auto x) {
    std::memcpy(&x, src, sizeof(x));
    return x;
  };
  switch (t) {
    case DType::kF32: return get(float{});
    case DType::kF64: return get(double{});
    case DType::kBF16:
    case DType::kF16: return storage_value(get(std::uint16_t{}), t);
    case DType::kI32: return get(std::int32_t{});
    case DType::kI64: return static_cast<double>(get(std::int64_t{}));
    case DType::kU8: return get(std::uint8_t{});
  }
  return 0.0;
}

// What rank `src` sends to `dst` under `tag`: n elements.
inline Bytes payload(DType t, std::size_t n, std::uint64_t tag, int src, int dst) {
  Bytes b(n * dtype_size(t));
  for (std::size_t i = 0; i < n; ++i) store(t, sample(t, key(tag, src, dst, i)), b.data() + i * dtype_size(t));
  return b;
}

inline void append(Bytes& to, const Bytes& b) { to.insert(to.end(), b.begin(), b.end()); }

// Compares element by element; on failure names the first wrong element and the relative error.
inline ::testing::AssertionResult same(DType t, const Bytes& got, const Bytes& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " bytes, expected " << want.size();
  }
  const std::size_t e = dtype_size(t);
  for (std::size_t i = 0; i * e < got.size(); ++i) {
    if (std::memcmp(got.data() + i * e, want.data() + i * e, e) != 0) {
      const double g = load(t, got.data() + i * e);
      const double w = load(t, want.data() + i * e);
      return ::testing::AssertionFailure() << dtype_name(t) << " element " << i << " of " << got.size() / e << ": got "
                                           << g << ", expected " << w << " (relative error "
                                           << std::fabs(g - w) / std::max(std::fabs(w), 1e-300) << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

inline const std::vector<DType> kAllDTypes = {DType::kF32, DType::kF64, DType::kBF16, DType::kF16,
                                              DType::kI32, DType::kI64, DType::kU8};
inline const std::vector<std::size_t> kCounts = {0, 1, 7, 1001};

// Sets an environment variable for one scope (communicators read theirs at construction).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~ScopedEnv() { unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

// Memory in the backend's space, owned for one test.
template <typename Backend>
class Region {
 public:
  explicit Region(std::size_t bytes) : bytes_(bytes), data_(Backend::allocate(bytes)) {}
  explicit Region(const Bytes& init) : Region(init.size()) { Backend::upload(data_, init.data(), init.size()); }
  ~Region() { Backend::release(data_); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  Buffer view(DType t, std::size_t count, std::size_t offset = 0) const {
    return {static_cast<std::byte*>(data_) + offset * dtype_size(t), count, t};
  }
  Bytes read() const {
    Bytes b(bytes_);
    Backend::download(b.data(), data_, bytes_);
    return b;
  }

 private:
  std::size_t bytes_;
  void* data_;
};

template <typename Backend>
class CommSuite : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { shared_ = Backend::make(); }
  static void TearDownTestSuite() { shared_.reset(); }

  void SetUp() override {
    if (!shared_) GTEST_SKIP() << "no device for this backend";
    shared_->reset_counters();
  }

  Communicator& comm() { return *shared_; }
  int rank() { return shared_->rank(); }
  int size() { return shared_->size(); }
  Stream stream() { return Backend::stream(); }
  void sync() { shared_->synchronize(stream()); }

  std::vector<DType> reducible() const {
    std::vector<DType> t = {DType::kF32, DType::kF64, DType::kI32, DType::kI64, DType::kU8};
    if (Backend::kReducesHalf) t.insert(t.end(), {DType::kBF16, DType::kF16});
    return t;
  }

 private:
  static inline std::unique_ptr<Communicator> shared_;
};

TYPED_TEST_SUITE_P(CommSuite);

TYPED_TEST_P(CommSuite, ExchangeWithEveryPeerInListOrder) {
  const int r = this->rank();
  const int p = this->size();
  // Two messages per ordered pair, of different dtypes and sizes (some empty), including to self.
  auto count = [](int src, int dst, int which) { return static_cast<std::size_t>((src * 5 + dst * 3 + which * 11) % 9); };
  const DType types[2] = {DType::kF64, DType::kI32};
  std::vector<std::unique_ptr<Region<TypeParam>>> regions;
  std::vector<SendOp> sends;
  std::vector<RecvOp> recvs;
  std::vector<Bytes> expected;
  std::uint64_t sent = 0, received = 0;
  for (int peer = 0; peer < p; ++peer) {
    for (int which = 0; which < 2; ++which) {
      const DType t = types[which];
      const auto& out = regions.emplace_back(
          std::make_unique<Region<TypeParam>>(payload(t, count(r, peer, which), 10 + which, r, peer)));
      sends.push_back({peer, out->view(t, count(r, peer, which))});
      const auto& in = regions.emplace_back(std::make_unique<Region<TypeParam>>(count(peer, r, which) * dtype_size(t)));
      recvs.push_back({peer, in->view(t, count(peer, r, which))});
      expected.push_back(payload(t, count(peer, r, which), 10 + which, peer, r));
      if (peer != r) {
        sent += count(r, peer, which) * dtype_size(t);
        received += count(peer, r, which) * dtype_size(t);
      }
    }
  }
  this->comm().exchange(sends, recvs, this->stream());
  this->sync();
  for (std::size_t i = 0; i < recvs.size(); ++i) {
    EXPECT_TRUE(same(recvs[i].buf.dtype, regions[2 * i + 1]->read(), expected[i])) << "message " << i;
  }
  const auto& c = this->comm().counters()[OpKind::kSendRecv];
  EXPECT_EQ(c.calls, 1u);
  EXPECT_EQ(c.bytes_sent, sent);
  EXPECT_EQ(c.bytes_received, received);
}

TYPED_TEST_P(CommSuite, RingShiftEveryStep) {
  const int r = this->rank();
  const int p = this->size();
  std::uint64_t bytes = 0;
  int calls = 0;
  for (std::size_t n : kCounts) {
    Region<TypeParam> out(payload(DType::kF32, n, n, r, -1));
    Region<TypeParam> in(n * sizeof(float));
    // Every step in [0, P), and the steps -1 and P that wrap around.
    for (int step = -1; step <= p; ++step) {
      this->comm().ring_shift(out.view(DType::kF32, n), in.view(DType::kF32, n), step, this->stream());
      this->sync();
      const int from = ((r - step) % p + p) % p;
      EXPECT_TRUE(same(DType::kF32, in.read(), payload(DType::kF32, n, n, from, -1))) << "n " << n << " step " << step;
      ++calls;
      if (from != r) bytes += n * sizeof(float);
    }
    // Step 0 in place leaves the buffer as it is.
    this->comm().ring_shift(out.view(DType::kF32, n), out.view(DType::kF32, n), 0, this->stream());
    this->sync();
    EXPECT_TRUE(same(DType::kF32, out.read(), payload(DType::kF32, n, n, r, -1)));
    ++calls;
  }
  const auto& c = this->comm().counters()[OpKind::kRingShift];
  EXPECT_EQ(c.calls, static_cast<std::uint64_t>(calls));
  EXPECT_EQ(c.bytes_sent, bytes);
  EXPECT_EQ(c.bytes_received, bytes);
}

TYPED_TEST_P(CommSuite, AllGatherEveryDType) {
  const int r = this->rank();
  const int p = this->size();
  for (DType t : kAllDTypes) {
    for (std::size_t n : kCounts) {
      Region<TypeParam> out(payload(t, n, 20 + n, r, -1));
      Region<TypeParam> in(p * n * dtype_size(t));
      this->comm().all_gather(out.view(t, n), in.view(t, p * n), this->stream());
      this->sync();
      Bytes want;
      for (int i = 0; i < p; ++i) append(want, payload(t, n, 20 + n, i, -1));
      EXPECT_TRUE(same(t, in.read(), want)) << dtype_name(t) << " n " << n;
    }
  }
  const auto& c = this->comm().counters()[OpKind::kAllGather];
  EXPECT_EQ(c.calls, kAllDTypes.size() * kCounts.size());
}

TYPED_TEST_P(CommSuite, AllGatherVUnevenAndEmptyCounts) {
  const int r = this->rank();
  const int p = this->size();
  // Patterns of per-rank counts, with zeros for some ranks (or all).
  const std::vector<std::vector<std::size_t>> patterns = [&] {
    std::vector<std::size_t> uneven, last_only, none;
    for (int i = 0; i < p; ++i) {
      uneven.push_back(i % 3 == 1 ? 0 : 1 + 13 * static_cast<std::size_t>(i) + (i == 0 ? 1000 : 0));
      last_only.push_back(i == p - 1 ? 7 : 0);
      none.push_back(0);
    }
    return std::vector{uneven, last_only, none};
  }();
  std::uint64_t sent = 0, received = 0;
  for (DType t : {DType::kF64, DType::kU8, DType::kBF16}) {
    for (std::size_t k = 0; k < patterns.size(); ++k) {
      const auto& counts = patterns[k];
      const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
      const std::size_t mine = counts[static_cast<std::size_t>(r)];
      Region<TypeParam> out(payload(t, mine, 30 + k, r, -1));
      Region<TypeParam> in(total * dtype_size(t));
      this->comm().all_gather_v(out.view(t, mine), in.view(t, total), counts, this->stream());
      this->sync();
      Bytes want;
      for (int i = 0; i < p; ++i) append(want, payload(t, counts[static_cast<std::size_t>(i)], 30 + k, i, -1));
      EXPECT_TRUE(same(t, in.read(), want)) << dtype_name(t) << " pattern " << k;
      sent += static_cast<std::uint64_t>(p - 1) * mine * dtype_size(t);
      received += (total - mine) * dtype_size(t);
    }
  }
  const auto& c = this->comm().counters()[OpKind::kAllGatherV];
  EXPECT_EQ(c.calls, 3 * patterns.size());
  EXPECT_EQ(c.bytes_sent, sent);
  EXPECT_EQ(c.bytes_received, received);
}

TYPED_TEST_P(CommSuite, AllReduceSumAndMaxInAndOutOfPlace) {
  const int r = this->rank();
  const int p = this->size();
  for (DType t : this->reducible()) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
      for (bool in_place : {false, true}) {
        for (std::size_t n : kCounts) {
          const std::uint64_t tag = 40 + n;
          Region<TypeParam> out(payload(t, n, tag, r, -1));
          Region<TypeParam> in(n * dtype_size(t));
          const Buffer recv = in_place ? out.view(t, n) : in.view(t, n);
          this->comm().all_reduce(out.view(t, n), recv, op, this->stream());
          this->sync();
          Bytes want(n * dtype_size(t));
          for (std::size_t i = 0; i < n; ++i) {
            double acc = sample(t, key(tag, 0, -1, i));
            for (int j = 1; j < p; ++j) {
              const double v = sample(t, key(tag, j, -1, i));
              acc = op == ReduceOp::kSum ? acc + v : std::max(acc, v);
            }
            store(t, acc, want.data() + i * dtype_size(t));
          }
          EXPECT_TRUE(same(t, (in_place ? out : in).read(), want))
              << dtype_name(t) << (op == ReduceOp::kSum ? " sum" : " max") << (in_place ? " in place" : "") << " n " << n;
        }
      }
    }
  }
}

TYPED_TEST_P(CommSuite, ReduceScatterSumAndMax) {
  const int r = this->rank();
  const int p = this->size();
  std::uint64_t bytes = 0;
  for (DType t : this->reducible()) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
      for (std::size_t block : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{333}}) {
        const std::uint64_t tag = 50 + block;
        const std::size_t n = block * static_cast<std::size_t>(p);
        Region<TypeParam> out(payload(t, n, tag, r, -1));
        Region<TypeParam> in(block * dtype_size(t));
        this->comm().reduce_scatter(out.view(t, n), in.view(t, block), op, this->stream());
        this->sync();
        Bytes want(block * dtype_size(t));
        for (std::size_t i = 0; i < block; ++i) {
          const std::size_t g = static_cast<std::size_t>(r) * block + i;
          double acc = sample(t, key(tag, 0, -1, g));
          for (int j = 1; j < p; ++j) {
            const double v = sample(t, key(tag, j, -1, g));
            acc = op == ReduceOp::kSum ? acc + v : std::max(acc, v);
          }
          store(t, acc, want.data() + i * dtype_size(t));
        }
        EXPECT_TRUE(same(t, in.read(), want)) << dtype_name(t) << " block " << block;
        bytes += static_cast<std::uint64_t>(p - 1) * block * dtype_size(t);
      }
    }
  }
  const auto& c = this->comm().counters()[OpKind::kReduceScatter];
  EXPECT_EQ(c.bytes_sent, bytes);
  EXPECT_EQ(c.bytes_received, bytes);
}

TYPED_TEST_P(CommSuite, AllToAllBlocks) {
  const int r = this->rank();
  const int p = this->size();
  std::uint64_t bytes = 0;
  for (DType t : {DType::kF32, DType::kI64, DType::kU8, DType::kF16}) {
    for (std::size_t block : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{101}}) {
      const std::uint64_t tag = 60 + block;
      Bytes send;
      for (int j = 0; j < p; ++j) append(send, payload(t, block, tag, r, j));
      const std::size_t n = block * static_cast<std::size_t>(p);
      Region<TypeParam> out(send);
      Region<TypeParam> in(n * dtype_size(t));
      this->comm().all_to_all(out.view(t, n), in.view(t, n), this->stream());
      this->sync();
      Bytes want;
      for (int i = 0; i < p; ++i) append(want, payload(t, block, tag, i, r));
      EXPECT_TRUE(same(t, in.read(), want)) << dtype_name(t) << " block " << block;
      bytes += static_cast<std::uint64_t>(p - 1) * block * dtype_size(t);
    }
  }
  const auto& c = this->comm().counters()[OpKind::kAllToAll];
  EXPECT_EQ(c.bytes_sent, bytes);
  EXPECT_EQ(c.bytes_received, bytes);
}

TYPED_TEST_P(CommSuite, AllToAllVUnevenAndEmptyCounts) {
  const int r = this->rank();
  const int p = this->size();
  // Rank i sends f(i, j) elements to rank j; some are zero, rank 0 sends a large block to the last.
  auto f = [p](int i, int j) {
    return static_cast<std::size_t>((i * 5 + j * 3) % 7) + (i == 0 && j == p - 1 ? 1000 : 0);
  };
  for (DType t : {DType::kF64, DType::kI32, DType::kBF16}) {
    std::vector<std::size_t> send_counts, recv_counts;
    Bytes send, want;
    for (int j = 0; j < p; ++j) {
      send_counts.push_back(f(r, j));
      recv_counts.push_back(f(j, r));
      append(send, payload(t, f(r, j), 70, r, j));
      append(want, payload(t, f(j, r), 70, j, r));
    }
    const std::size_t ns = send.size() / dtype_size(t);
    const std::size_t nr = want.size() / dtype_size(t);
    Region<TypeParam> out(send);
    Region<TypeParam> in(want.size());
    this->comm().reset_counters();
    this->comm().all_to_all_v(out.view(t, ns), send_counts, in.view(t, nr), recv_counts, this->stream());
    this->sync();
    EXPECT_TRUE(same(t, in.read(), want)) << dtype_name(t);
    const auto& c = this->comm().counters()[OpKind::kAllToAllV];
    EXPECT_EQ(c.bytes_sent, (ns - f(r, r)) * dtype_size(t));
    EXPECT_EQ(c.bytes_received, (nr - f(r, r)) * dtype_size(t));
  }
}

TYPED_TEST_P(CommSuite, BroadcastFromEveryRoot) {
  const int r = this->rank();
  const int p = this->size();
  for (DType t : {DType::kF32, DType::kI64}) {
    for (std::size_t n : kCounts) {
      for (int root = 0; root < p; ++root) {
        // Non-roots start with their own data, so a broadcast that did nothing is caught.
        Region<TypeParam> buf(payload(t, n, 80 + n, r, root));
        this->comm().reset_counters();
        this->comm().broadcast(buf.view(t, n), root, this->stream());
        this->sync();
        EXPECT_TRUE(same(t, buf.read(), payload(t, n, 80 + n, root, root))) << "root " << root << " n " << n;
        const auto& c = this->comm().counters()[OpKind::kBroadcast];
        EXPECT_EQ(c.bytes_sent, r == root ? static_cast<std::uint64_t>(p - 1) * n * dtype_size(t) : 0u);
        EXPECT_EQ(c.bytes_received, r == root ? 0u : n * dtype_size(t));
      }
    }
  }
}

TYPED_TEST_P(CommSuite, CountersFollowTheConventionAndReset) {
  const int p = this->size();
  const auto up = static_cast<std::uint64_t>(p);
  Region<TypeParam> a(payload(DType::kF64, 10, 90, this->rank(), -1));
  Region<TypeParam> b(10 * up * sizeof(double));
  this->comm().barrier(this->stream());
  this->comm().barrier(this->stream());
  this->comm().all_gather(a.view(DType::kF64, 10), b.view(DType::kF64, 10 * up), this->stream());
  this->comm().all_reduce(a.view(DType::kF64, 10), a.view(DType::kF64, 10), ReduceOp::kMax, this->stream());
  this->comm().ring_shift(a.view(DType::kF64, 3), b.view(DType::kF64, 3), 1, this->stream());
  this->sync();
  const Counters& c = this->comm().counters();
  EXPECT_EQ(c[OpKind::kBarrier].calls, 2u);
  EXPECT_EQ(c[OpKind::kBarrier].bytes_sent, 0u);
  EXPECT_EQ(c[OpKind::kAllGather].calls, 1u);
  EXPECT_EQ(c[OpKind::kAllGather].bytes_sent, (up - 1) * 80);
  EXPECT_EQ(c[OpKind::kAllGather].bytes_received, (up - 1) * 80);
  EXPECT_EQ(c[OpKind::kAllReduce].bytes_sent, (up - 1) * 80);
  const std::uint64_t shifted = p > 1 ? 24 : 0;
  EXPECT_EQ(c[OpKind::kRingShift].bytes_sent, shifted);
  const OpCounters total = c.total();
  EXPECT_EQ(total.calls, 5u);
  EXPECT_EQ(total.bytes_sent, 2 * (up - 1) * 80 + shifted);
  EXPECT_EQ(total.bytes_received, 2 * (up - 1) * 80 + shifted);
  for (int k = 0; k < static_cast<int>(OpKind::kCount); ++k) EXPECT_FALSE(op_kind_name(static_cast<OpKind>(k)).empty());
  this->comm().reset_counters();
  EXPECT_EQ(this->comm().counters().total().calls, 0u);
  EXPECT_EQ(this->comm().counters().total().bytes_sent, 0u);
}

// Every rank passes the same wrong arguments: each throws locally, nobody communicates.
TYPED_TEST_P(CommSuite, LocalArgumentErrorsThrow) {
  const int p = this->size();
  Region<TypeParam> a(payload(DType::kF32, 8, 100, this->rank(), -1));
  Region<TypeParam> b(8 * static_cast<std::size_t>(p) * sizeof(float));
  const SendOp bad_send{p, a.view(DType::kF32, 1)};
  EXPECT_THROW(this->comm().exchange({&bad_send, 1}, {}, this->stream()), Error);
  EXPECT_THROW(this->comm().ring_shift(a.view(DType::kF32, 8), b.view(DType::kF32, 7), 1, this->stream()), Error);
  EXPECT_THROW(this->comm().ring_shift(a.view(DType::kF32, 8), b.view(DType::kI32, 8), 1, this->stream()), Error);
  EXPECT_THROW(this->comm().all_gather(a.view(DType::kF32, 8), b.view(DType::kF32, 8 * p + 1), this->stream()), Error);
  EXPECT_THROW(this->comm().broadcast(a.view(DType::kF32, 8), p, this->stream()), Error);
  EXPECT_THROW(this->comm().all_reduce(a.view(DType::kF32, 8), a.view(DType::kF32, 8, 1), ReduceOp::kSum, this->stream()),
               Error);
  EXPECT_EQ(this->comm().counters().total().calls, 0u);
}

TYPED_TEST_P(CommSuite, AllGatherVMismatchThrowsOnEveryRank) {
  const int r = this->rank();
  const int p = this->size();
  Region<TypeParam> out(payload(DType::kI32, 5, 110, r, -1));
  Region<TypeParam> in(5 * static_cast<std::size_t>(p + 1) * sizeof(std::int32_t));
  // Every rank sends 5 elements, but rank 0 expects 6 from the last rank (itself, when P = 1).
  std::vector<std::size_t> counts(static_cast<std::size_t>(p), 5);
  if (r == 0) counts.back() = 6;
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  try {
    this->comm().all_gather_v(out.view(DType::kI32, 5), in.view(DType::kI32, total), counts, this->stream());
    ADD_FAILURE() << "all_gather_v with inconsistent counts did not throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("all_gather_v"), std::string::npos) << e.message();
  }
  // One rank passes too few counts: every rank learns it from the gathered verdict.
  std::vector<std::size_t> short_counts(static_cast<std::size_t>(p), 5);
  if (r == p - 1) short_counts.pop_back();
  const std::size_t short_total = std::accumulate(short_counts.begin(), short_counts.end(), std::size_t{0});
  try {
    this->comm().all_gather_v(out.view(DType::kI32, 5), in.view(DType::kI32, short_total), short_counts,
                              this->stream());
    ADD_FAILURE() << "all_gather_v with a short recv_counts did not throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find(fmt::format("invalid arguments on rank(s) {}", p - 1)), std::string::npos)
        << e.message();
  }
  // Nobody was left inside a collective: the communicator still works.
  std::vector<std::size_t> good(static_cast<std::size_t>(p), 5);
  this->comm().all_gather_v(out.view(DType::kI32, 5), in.view(DType::kI32, 5 * p), good, this->stream());
  this->sync();
  Bytes want;
  for (int i = 0; i < p; ++i) append(want, payload(DType::kI32, 5, 110, i, -1));
  const Bytes got = in.read();
  EXPECT_TRUE(same(DType::kI32, Bytes(got.begin(), got.begin() + static_cast<std::ptrdiff_t>(want.size())), want));
}

TYPED_TEST_P(CommSuite, AllToAllVMismatchThrowsOnEveryRank) {
  const int r = this->rank();
  const int p = this->size();
  const auto up = static_cast<std::size_t>(p);
  Region<TypeParam> out(payload(DType::kF32, 4 * up + 1, 120, r, -1));
  Region<TypeParam> in((4 * up + 1) * sizeof(float));
  // Rank 0 sends 4 + 1 elements to the last rank, which expects 4.
  std::vector<std::size_t> send_counts(up, 4), recv_counts(up, 4);
  if (r == 0) send_counts.back() = 5;
  const std::size_t ns = std::accumulate(send_counts.begin(), send_counts.end(), std::size_t{0});
  try {
    this->comm().all_to_all_v(out.view(DType::kF32, ns), send_counts, in.view(DType::kF32, 4 * up), recv_counts,
                              this->stream());
    ADD_FAILURE() << "all_to_all_v with inconsistent counts did not throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find(fmt::format("rank 0 sends 5 elements to rank {}", p - 1)), std::string::npos)
        << e.message();
  }
}

TYPED_TEST_P(CommSuite, ValidationCatchesDisagreeingCollectives) {
  std::unique_ptr<Communicator> validating;
  {
    ScopedEnv env("RINGCAST_COMM_VALIDATE", "1");
    validating = TypeParam::make();
  }
  ASSERT_TRUE(validating->validating());
  EXPECT_FALSE(this->comm().validating());
  Communicator& comm = *validating;
  const int r = comm.rank();
  const int p = comm.size();
  Region<TypeParam> a(payload(DType::kF32, 9, 130, r, -1));
  Region<TypeParam> b(9 * static_cast<std::size_t>(p) * sizeof(float));
  // The last rank reduces one element more than the others.
  const std::size_t n = r == p - 1 && p > 1 ? 9 : 8;
  if (p > 1) {
    try {
      comm.all_reduce(a.view(DType::kF32, n), b.view(DType::kF32, n), ReduceOp::kSum, TypeParam::stream());
      ADD_FAILURE() << "all_reduce with different counts did not throw";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(fmt::format("rank {} calls all_reduce (send 9 x f32", p - 1)), std::string::npos)
          << e.message();
    }
    // Different roots for one broadcast.
    EXPECT_THROW(comm.broadcast(a.view(DType::kF32, 4), r == 0 ? 0 : 1, TypeParam::stream()), Error);
    // Different dtypes for one all_gather.
    const DType t = r == 0 ? DType::kF32 : DType::kI32;
    EXPECT_THROW(comm.all_gather(a.view(t, 2), b.view(t, 2 * static_cast<std::size_t>(p)), TypeParam::stream()), Error);
  }
  // One rank's local error reaches every rank instead of leaving them waiting.
  const std::size_t bad = r == p - 1 ? 8 * static_cast<std::size_t>(p) - 1 : 8 * static_cast<std::size_t>(p);
  EXPECT_THROW(comm.reduce_scatter(b.view(DType::kF32, bad), a.view(DType::kF32, 8), ReduceOp::kMax, TypeParam::stream()),
               Error);
  // Agreeing calls pass the checks and still compute.
  comm.all_reduce(a.view(DType::kF32, 8), b.view(DType::kF32, 8), ReduceOp::kMax, TypeParam::stream());
  comm.barrier(TypeParam::stream());
  comm.synchronize(TypeParam::stream());
  Bytes want(8 * sizeof(float));
  for (std::size_t i = 0; i < 8; ++i) {
    double m = sample(DType::kF32, key(130, 0, -1, i));
    for (int j = 1; j < p; ++j) m = std::max(m, sample(DType::kF32, key(130, j, -1, i)));
    store(DType::kF32, m, want.data() + i * sizeof(float));
  }
  const Bytes got = b.read();
  EXPECT_TRUE(same(DType::kF32, Bytes(got.begin(), got.begin() + 8 * sizeof(float)), want));
}

// Exposed time: while timing, a call on the compute stream counts how long the compute waits in it.
// The last rank joins a barrier 1 s late: rank 0 waits about that long, the late rank hardly at all
// (the margins leave room for a loaded machine running oversubscribed ranks).
TYPED_TEST_P(CommSuite, ExposedTimeCountsWaitsOnTheComputeStream) {
  auto& comm = this->comm();
  const int r = this->rank(), p = this->size();
  comm.barrier(this->stream());
  this->sync();
  EXPECT_EQ(comm.take_exposed_seconds(), 0.0) << "nothing is timed before start_exposed_timing";
  EXPECT_FALSE(comm.mark(this->stream()).set);

  // The last rank joins a barrier 1 s late; `take` reads what this rank's compute waited.
  const auto late_barrier = [&](const auto& take) {
    if (r == p - 1) std::this_thread::sleep_for(std::chrono::seconds(1));
    comm.barrier(this->stream());
    this->sync();
    return take();
  };
  comm.start_exposed_timing(this->stream());
  comm.barrier(this->stream());  // everybody in step
  this->sync();
  comm.take_exposed_seconds();
  const double exposed = late_barrier([&] { return comm.take_exposed_seconds(); });
  if (p > 1 && r == 0) {
    EXPECT_GE(exposed, 0.5);
  }
  if (r == p - 1) {
    EXPECT_LT(exposed, 0.5);
  }
  EXPECT_EQ(comm.take_exposed_seconds(), 0.0) << "a take resets";

  // Spans measured by hand: a later mark minus an earlier one, never negative.
  const auto span = [&](bool forward) {
    const TimeMark a = comm.mark(this->stream());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const TimeMark b = comm.mark(this->stream());
    EXPECT_TRUE(a.set && b.set);
    forward ? comm.add_exposed(a, b) : comm.add_exposed(b, a);
    this->sync();
    return comm.take_exposed_seconds();
  };
  EXPECT_GE(span(true), 0.015);
  EXPECT_EQ(span(false), 0.0);
  if (comm.memory() == DeviceKind::kCpu) {
    // Host backend: another thread's marks are unset, so communication it runs is never counted.
    bool other_thread_mark = true;
    std::thread([&] { other_thread_mark = comm.mark(nullptr).set; }).join();
    EXPECT_FALSE(other_thread_mark);
  }
  comm.stop_exposed_timing();
  EXPECT_FALSE(comm.mark(this->stream()).set);
  comm.barrier(this->stream());
  this->sync();
  EXPECT_EQ(comm.take_exposed_seconds(), 0.0);

  {  // The same through a scope, which stops timing when it ends.
    ExposedTimingScope scope({&comm}, this->stream());
    const double waited = late_barrier([&] { return scope.take(); });
    if (p > 1 && r == 0) {
      EXPECT_GE(waited, 0.5);
    }
  }
  EXPECT_FALSE(comm.mark(this->stream()).set);
}

REGISTER_TYPED_TEST_SUITE_P(CommSuite, ExchangeWithEveryPeerInListOrder, RingShiftEveryStep, AllGatherEveryDType,
                            AllGatherVUnevenAndEmptyCounts, AllReduceSumAndMaxInAndOutOfPlace, ReduceScatterSumAndMax,
                            AllToAllBlocks, AllToAllVUnevenAndEmptyCounts, BroadcastFromEveryRoot,
                            CountersFollowTheConventionAndReset, LocalArgumentErrorsThrow,
                            AllGatherVMismatchThrowsOnEveryRank, AllToAllVMismatchThrowsOnEveryRank,
                            ValidationCatchesDisagreeingCollectives, ExposedTimeCountsWaitsOnTheComputeStream);

}  // namespace ringcast::comm::testing
