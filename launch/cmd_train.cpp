// `ringcast train`: trains the decoder (ringcast::Model, CPU backend) on associative recall or on a
// file's bytes, sharded over the ranks by sequence. Every rank builds the same global batches and keeps
// its rows (data.hpp). Rank 0 prints a progress line every --log-every steps and a summary table;
// --output writes one row per step. Step times and peak memory are the maximum over ranks; evaluation
// (a fixed held-out set, outside the step timing) runs forward_backward and discards the gradients,
// since the model has no forward-only pass.
#include "commands.hpp"
#include "layer_options.hpp"
#include "report.hpp"

#include <ringcast/data.hpp>
#include <ringcast/error.hpp>
#include <ringcast/log.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/session.hpp>
#include <ringcast/version.hpp>

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <numeric>
#include <vector>

namespace ringcast::launch {
namespace {

struct TrainOptions {
  int steps = 0;
  float lr = 0.0f;  // the peak, after warm-up
  int warmup_steps = 0;
  float min_lr = 0.0f;
  int eval_every = 0;
  int eval_batches = 0;
  int log_every = 0;
  std::string task;
  std::string data;
};

// Linear warm-up to the peak rate, then a cosine down to min_lr at the last step (a run no longer
// than its warm-up never leaves it).
float learning_rate(const TrainOptions& t, int step) {
  if (step <= t.warmup_steps) return t.lr * static_cast<float>(step) / static_cast<float>(t.warmup_steps);
  const double progress = static_cast<double>(step - t.warmup_steps) / static_cast<double>(t.steps - t.warmup_steps);
  return t.min_lr + static_cast<float>(0.5 * (t.lr - t.min_lr) * (1.0 + std::cos(std::numbers::pi * progress)));
}

struct Datasets {
  std::unique_ptr<Dataset> train;
  std::unique_ptr<Dataset> held_out;  // null when there is no evaluation
};

// The held-out recall set is another seed; the held-out bytes are the file's last tenth, which the
// training windows then never touch. Every rank reads the file and fails alike, before any collective.
Datasets make_datasets(const TrainOptions& t, std::uint64_t seed, std::int64_t seq_len) {
  constexpr std::uint64_t kHeldOutSeed = 0x5eed0f4e1d0ull;
  Datasets d;
  if (t.task == "recall") {
    d.train = std::make_unique<RecallDataset>(seed);
    if (t.eval_every > 0) d.held_out = std::make_unique<RecallDataset>(seed ^ kHeldOutSeed);
    return d;
  }
  std::shared_ptr<const std::vector<std::uint8_t>> bytes;
  try {
    bytes = read_file_bytes(t.data);
  } catch (const Error& e) {
    throw UsageError(fmt::format("--data: {}", e.message()));
  }
  const std::size_t size = bytes->size(), held = t.eval_every > 0 ? size / 10 : 0, window = seq_len + 1;
  if (size - held < window || (held > 0 && held < window))
    throw UsageError(fmt::format("--data: '{}' has {} bytes; windows of {} tokens need {} (the last tenth is held "
                                 "out for --eval-every)",
                                 t.data, size, seq_len, held > 0 ? 10 * window : window));
  d.train = std::make_unique<ByteDataset>(bytes, 0, size - held, seed);
  if (held > 0) d.held_out = std::make_unique<ByteDataset>(bytes, size - held, size, seed);
  return d;
}

struct Evaluation {
  double loss = 0.0;
  double accuracy = 0.0;
};

Evaluation evaluate(Model& model, const Dataset& held_out, const TrainOptions& t, const SequenceShape& shape) {
  LocalBatch batch;
  double loss_sum = 0.0;
  TargetCounts total;
  for (int e = 0; e < t.eval_batches; ++e) {
    local_batch(held_out, static_cast<std::uint64_t>(e) * shape.batch, shape.batch, shape.seq_len, model.positions(),
                batch);
    const double loss = model.forward_backward(batch.tokens, batch.targets);
    const TargetCounts c = model.last_targets();
    loss_sum += loss * static_cast<double>(c.count);
    total.count += c.count;
    total.correct += c.correct;
  }
  return {loss_sum / static_cast<double>(total.count),
          static_cast<double>(total.correct) / static_cast<double>(total.count)};
}

}  // namespace

int train_command(const CommandLine& cmd) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  po::options_description desc("ringcast train options");
  add_common_options(desc);
  add_model_layer_options(desc, /*default_seq_len=*/1024, /*default_heads=*/4, /*default_head_dim=*/64);
  desc.add_options()
      ("steps", po::value<int>()->default_value(200), "optimizer steps")
      ("dim", po::value<int>()->default_value(256), "D: the residual stream width")
      ("layers", po::value<int>()->default_value(2), "decoder blocks")
      ("ffn-hidden", po::value<int>()->default_value(768), "F: the SwiGLU FFN's hidden width")
      ("lr", po::value<float>()->default_value(1e-3f), "peak learning rate (after warm-up)")
      ("warmup-steps", po::value<int>()->default_value(20), "linear warm-up steps")
      ("min-lr", po::value<float>()->default_value(1e-4f), "learning rate the cosine decay ends at")
      ("weight-decay", po::value<float>()->default_value(0.1f), "AdamW decoupled weight decay (not on norm gains)")
      ("max-norm", po::value<float>()->default_value(1.0f), "global gradient-norm clip (<= 0: none)")
      ("seed", po::value<std::uint64_t>()->default_value(0), "parameters and training data")
      ("task", po::value<std::string>()->default_value("recall"), "recall (synthetic associative recall)|bytes")
      ("data", po::value<std::string>(), "bytes: the file to model, byte by byte")
      ("eval-every", po::value<int>()->default_value(0), "evaluate on held-out data every N steps and at the end "
                                                          "(0: never)")
      ("eval-batches", po::value<int>()->default_value(2), "batches in the held-out set")
      ("log-every", po::value<int>()->default_value(10), "progress line every N steps");
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm, "usage: mpirun -np P ringcast train [--config FILE] [options]", rank == 0))
    return 0;

  LayerShape layer;
  ModelConfig config;
  read_layer_options(vm, world, layer, config.attention);
  config.dim = vm["dim"].as<int>();
  config.layers = vm["layers"].as<int>();
  config.heads = layer.heads;
  config.kv_heads = layer.kv_heads;
  config.head_dim = layer.head_dim;
  config.ffn_hidden = vm["ffn-hidden"].as<int>();
  config.seed = vm["seed"].as<std::uint64_t>();
  const SequenceShape shape{layer.seq_len, layer.batch};
  AdamWConfig adam;
  adam.weight_decay = vm["weight-decay"].as<float>();
  adam.max_norm = vm["max-norm"].as<float>();
  TrainOptions t;
  t.lr = vm["lr"].as<float>();
  t.steps = vm["steps"].as<int>();
  t.warmup_steps = vm["warmup-steps"].as<int>();
  t.min_lr = vm["min-lr"].as<float>();
  t.eval_every = vm["eval-every"].as<int>();
  t.eval_batches = vm["eval-batches"].as<int>();
  t.log_every = vm["log-every"].as<int>();
  t.task = vm["task"].as<std::string>();
  t.data = vm.count("data") ? vm["data"].as<std::string>() : "";
  if (config.dim < 1 || config.layers < 1 || config.ffn_hidden < 1)
    throw UsageError("--dim, --layers and --ffn-hidden must be positive");
  if (t.steps < 1 || t.warmup_steps < 0) throw UsageError("--steps must be positive and --warmup-steps >= 0");
  if (!(t.lr > 0) || !(t.min_lr >= 0 && t.min_lr <= t.lr) || !(adam.weight_decay >= 0))
    throw UsageError("--lr must be positive, --min-lr in [0, lr] and --weight-decay >= 0");
  if (t.log_every < 1 || t.eval_every < 0 || t.eval_batches < 1)
    throw UsageError("--log-every and --eval-batches must be positive, --eval-every >= 0");
  if (t.task != "recall" && t.task != "bytes")
    throw UsageError(fmt::format("--task: unknown task '{}' (recall|bytes)", t.task));
  if ((t.task == "bytes") != !t.data.empty())
    throw UsageError("--data FILE goes with --task bytes, and only with it");
  if (t.task == "recall" && shape.seq_len < 4)
    throw UsageError(fmt::format("--task recall needs --seq-len >= 4 (one pair and one query), got {}", shape.seq_len));
  const OutputSpec output = OutputSpec::from_options(vm);
  const Datasets data = make_datasets(t, config.seed, shape.seq_len);

  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  reset_peak_allocated_bytes();
  Model model(session, config, shape);
  log::info("ringcast {} ({}): training a {}-layer decoder (D = {}, h = {}, h_kv = {}, d = {}, F = {}; {} parameters) "
            "on {}, n = {}, batch = {}, {} attention, {} rank(s) on the CPU backend",
            version(), git_commit(), config.layers, config.dim, config.heads, config.kv_heads, config.head_dim,
            config.ffn_hidden, model.num_parameters(), t.task == "recall" ? "associative recall" : t.data,
            shape.seq_len, shape.batch, name(config.attention.mode), world);

  auto& comm = session.comm();
  Report steps;
  LocalBatch batch;
  Evaluation last_eval;
  std::vector<double> losses, accuracies;
  double train_s = 0.0, peak_bytes = 0.0;
  const double tokens_per_step = static_cast<double>(shape.seq_len) * shape.batch;
  for (int step = 1; step <= t.steps; ++step) {
    const double t0 = MPI_Wtime();
    local_batch(*data.train, static_cast<std::uint64_t>(step - 1) * shape.batch, shape.batch, shape.seq_len,
                model.positions(), batch);
    const double loss = model.forward_backward(batch.tokens, batch.targets);
    const TargetCounts counts = model.last_targets();
    adam.lr = learning_rate(t, step);
    model.step(adam);
    // The slowest rank sets the pace; one all-reduce also brings rank 0 the largest peak.
    double slowest[2] = {MPI_Wtime() - t0, static_cast<double>(peak_allocated_bytes())};
    comm.all_reduce({slowest, 2, DType::kF64}, {slowest, 2, DType::kF64}, comm::ReduceOp::kMax);
    train_s += slowest[0];
    peak_bytes = slowest[1];
    const double accuracy = static_cast<double>(counts.correct) / static_cast<double>(counts.count);
    losses.push_back(loss);
    accuracies.push_back(accuracy);

    Report::Row& row = steps.add_row()
                           .set("step", std::int64_t{step})
                           .set("loss", loss)
                           .set("accuracy", accuracy)
                           .set("lr", static_cast<double>(adam.lr))
                           .set("grad_norm", model.last_grad_norm())
                           .set("tokens_per_s", tokens_per_step / slowest[0])
                           .set("step_ms", 1e3 * slowest[0])
                           .set("peak_memory_bytes", static_cast<std::int64_t>(slowest[1]));
    const bool eval_now = data.held_out && (step % t.eval_every == 0 || step == t.steps);
    if (eval_now) {
      last_eval = evaluate(model, *data.held_out, t, shape);
      row.set("eval_loss", last_eval.loss).set("eval_accuracy", last_eval.accuracy);
    }
    if (step == 1 || step % t.log_every == 0 || step == t.steps)
      log::info("step {:>{}}/{}  loss {:.4f}  accuracy {:.3f}  lr {:.2e}  {:.0f} tokens/s  {:.1f} ms  peak {}{}", step,
                fmt::formatted_size("{}", t.steps), t.steps, loss, accuracy, adam.lr, tokens_per_step / slowest[0],
                1e3 * slowest[0], format_bytes(slowest[1]),
                eval_now ? fmt::format("  eval loss {:.4f} accuracy {:.3f}", last_eval.loss, last_eval.accuracy) : "");
  }

  // Means over the first and the last tenth of the steps (at least one step each) show the trend
  // through the batch-to-batch noise.
  const std::size_t tenth = std::max<std::size_t>(1, losses.size() / 10);
  const auto mean = [](auto begin, auto end) { return std::accumulate(begin, end, 0.0) / double(end - begin); };
  Report summary;
  Report::Row& row = summary.add_row()
                         .set("task", t.task)
                         .set("mode", std::string(name(config.attention.mode)))
                         .set("ranks", std::int64_t{world})
                         .set("seq_len", shape.seq_len)
                         .set("batch", std::int64_t{shape.batch})
                         .set("parameters", model.num_parameters())
                         .set("steps", std::int64_t{t.steps})
                         .set("loss_first_10pct", mean(losses.begin(), losses.begin() + tenth))
                         .set("loss_last_10pct", mean(losses.end() - tenth, losses.end()))
                         .set("accuracy_last_10pct", mean(accuracies.end() - tenth, accuracies.end()));
  if (data.held_out) row.set("eval_loss", last_eval.loss).set("eval_accuracy", last_eval.accuracy);
  row.set("tokens_per_s", tokens_per_step * t.steps / train_s)
      .set("train_s", train_s)
      .set("peak_memory_bytes", static_cast<std::int64_t>(peak_bytes))
      .set("commit", std::string(git_commit()));
  if (rank == 0) {
    const bool machine_on_stdout = output.format != OutputSpec::Format::kNone && output.path.empty();
    summary.print_table(machine_on_stdout ? stderr : stdout);
    write_output(steps, output);
  }
  return 0;
}

}  // namespace ringcast::launch
