// A program outside the ringcast tree, built against an installed ringcast: one training step of a
// tiny decoder on the CPU backend over MPI_COMM_WORLD, on seeded associative-recall sequences. Rank 0
// prints the loss; every rank exits 1 when the loss or the gradient norm is not finite (both are
// global values, identical on every rank). Library errors are the same on every rank; they abort.
// Plain MPI_Init, as a host job might call it: without MPI_THREAD_MULTIPLE the model sums its gradient
// buckets inline rather than beside the backward.
#include <ringcast/ringcast.hpp>

#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    const ringcast::Session session = ringcast::Session::from_mpi(MPI_COMM_WORLD, ringcast::Backend::kCpu);
    ringcast::ModelConfig config;  // vocab 256: the recall dataset's tokens
    config.dim = 40;
    config.layers = 2;
    config.heads = 2;
    config.kv_heads = 1;
    config.head_dim = 64;
    config.ffn_hidden = 56;
    config.seed = 7;
    const ringcast::SequenceShape shape{.seq_len = 120, .batch = 2};
    ringcast::Model model(session, config, shape);

    ringcast::LocalBatch batch;
    ringcast::local_batch(ringcast::RecallDataset(11), 0, shape.batch, shape.seq_len, model.positions(), batch);
    const double loss = model.forward_backward(batch.tokens, batch.targets);
    model.step(ringcast::AdamWConfig{});
    const double grad_norm = model.last_grad_norm();

    if (!std::isfinite(loss) || !std::isfinite(grad_norm) || model.steps_taken() != 1) {
      std::fprintf(stderr, "rank %d: loss %g, gradient norm %g after %lld steps\n", session.rank(), loss,
                   grad_norm, static_cast<long long>(model.steps_taken()));
      status = 1;
    } else if (session.rank() == 0) {
      std::printf("ringcast %s consumer: ranks %d, parameters %lld, loss %.6f, gradient norm %.6f\n",
                  ringcast::version(), session.size(), static_cast<long long>(model.num_parameters()), loss,
                  grad_norm);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringcast consumer: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
