// The gtest main of every ringcast test binary. It initialises MPI (a single process is a world of
// one), runs the tests, and reduces the outcome over all ranks so that a failure on any rank fails the
// test on every rank. Output from ranks other than 0 is kept for failures only. A binary whose tests
// all skipped (no GPU) exits with 77, which ctest reports as "skipped".
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

namespace {

// Prints only failures (with the rank) on ranks other than 0.
class FailureOnlyPrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailureOnlyPrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed()) {
      std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
    }
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  // As launch/main.cpp: helper threads communicate beside the compute and beside other communicators.
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailureOnlyPrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  const auto* unit = ::testing::UnitTest::GetInstance();
  const bool all_skipped = unit->test_to_run_count() > 0 && unit->skipped_test_count() == unit->test_to_run_count();
  MPI_Finalize();
  if (any_failed) return 1;
  return all_skipped ? 77 : 0;
}
