// `ringcast train`: trains a ringcast::Model (CPU or CUDA backend) sharded over the ranks by sequence: a
// decoder on associative recall, needle retrieval or a file's bytes, or an encoder with a
// classification head on ListOps or prefix retrieval, with the seed methods as options. Every rank
// builds the same global batches and keeps its rows (data.hpp). Rank 0 prints a progress line every
// --log-every steps and a summary table; --output writes one row per step. Step times, peak memory and
// the communication a step waited for (exposed_comm_ms: the layers' and the gradient sums') are the
// maximum over ranks; evaluation (a fixed held-out set, forward only) is outside the timing.
// --checkpoint writes the model, the optimizer and the data position every --checkpoint-every steps
// and at the end; --resume continues from such a file bit-exactly (the same losses as one long run).
#include "commands.hpp"
#include "layer_options.hpp"
#include "model_options.hpp"
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
#include <cstring>
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
  int listops_depth = 0, listops_args = 0, prefix = 0, pairs = 0;
  std::string checkpoint;  // "{step}" in the name is replaced by the step
  int checkpoint_every = 0;
  std::string resume;
};

bool classification_task(const std::string& task) { return task == "listops" || task == "prefix-recall"; }

// What a checkpoint carries besides the model: enough to refuse a resume with other data. The data
// position is the model's step count (batch i uses sequences i * batch, ...), so nothing else moves.
struct TrainerState {
  static constexpr std::uint32_t kVersion = 1;
  std::uint32_t version = kVersion;
  std::int32_t batch = 0;
  std::int32_t dataset[4] = {};  // listops depth and arguments, prefix, pairs
  std::int64_t seq_len = 0;
  std::int64_t steps = 0;
  std::uint64_t seed = 0;
  char task[24] = {};
  char data[232] = {};  // the --data path's last 231 bytes

  static TrainerState of(const TrainOptions& t, const SequenceShape& shape, std::uint64_t seed) {
    TrainerState s;
    s.batch = shape.batch;
    s.dataset[0] = t.listops_depth;
    s.dataset[1] = t.listops_args;
    s.dataset[2] = t.prefix;
    s.dataset[3] = t.pairs;
    s.seq_len = shape.seq_len;
    s.steps = t.steps;
    s.seed = seed;
    std::strncpy(s.task, t.task.c_str(), sizeof(s.task) - 1);
    const std::size_t keep = std::min(t.data.size(), sizeof(s.data) - 1);
    std::memcpy(s.data, t.data.data() + t.data.size() - keep, keep);
    return s;
  }
  std::span<const std::byte> bytes() const { return std::as_bytes(std::span<const TrainerState>(this, 1)); }
};

std::string checkpoint_path(const std::string& pattern, std::int64_t step) {
  const auto at = pattern.find("{step}");
  return at == std::string::npos ? pattern
                                 : pattern.substr(0, at) + fmt::format("{:06d}", step) + pattern.substr(at + 6);
}

// The checkpoint's trainer state must describe this run; the user state of the file is identical on
// every rank (broadcast by load), so every rank decides alike.
void check_resumable(const std::vector<std::byte>& saved, const TrainerState& now, const std::string& path) {
  TrainerState was;
  if (saved.size() != sizeof(TrainerState) || (std::memcpy(&was, saved.data(), sizeof was), was.version != now.version))
    throw UsageError(fmt::format("--resume {}: not a checkpoint of `ringcast train` (or of another version)", path));
  const auto differs = [&](const char* what, auto a, auto b) {
    if (a != b) throw UsageError(fmt::format("--resume {}: written with {} {}, this run has {}", path, what, a, b));
  };
  differs("--task", std::string(was.task), std::string(now.task));
  differs("--data", std::string(was.data), std::string(now.data));
  differs("--seq-len", was.seq_len, now.seq_len);
  differs("--batch", was.batch, now.batch);
  differs("--listops-depth", was.dataset[0], now.dataset[0]);
  differs("--listops-args", was.dataset[1], now.dataset[1]);
  differs("--prefix", was.dataset[2], now.dataset[2]);
  differs("--pairs", was.dataset[3], now.dataset[3]);
  differs("--seed", was.seed, now.seed);
  differs("--steps", was.steps, now.steps);
}

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
  const auto synthetic = [&](auto make) {
    d.train = make(seed);
    if (t.eval_every > 0) d.held_out = make(seed ^ kHeldOutSeed);
    return std::move(d);
  };
  if (t.task == "recall") return synthetic([](std::uint64_t s) { return std::make_unique<RecallDataset>(s); });
  if (t.task == "needle") return synthetic([](std::uint64_t s) { return std::make_unique<NeedleDataset>(s); });
  if (t.task == "listops")
    return synthetic([&](std::uint64_t s) { return std::make_unique<ListOpsDataset>(s, t.listops_depth, t.listops_args); });
  if (t.task == "prefix-recall")
    return synthetic([&](std::uint64_t s) { return std::make_unique<PrefixRecallDataset>(s, t.prefix, t.pairs); });
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
    const double loss = model.evaluate(batch.tokens, batch.targets);
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
  add_model_options(desc);
  desc.add_options()
      ("steps", po::value<int>()->default_value(200), "optimizer steps")
      ("lr", po::value<float>()->default_value(1e-3f), "peak learning rate (after warm-up)")
      ("warmup-steps", po::value<int>()->default_value(20), "linear warm-up steps")
      ("min-lr", po::value<float>()->default_value(1e-4f), "learning rate the cosine decay ends at")
      ("weight-decay", po::value<float>()->default_value(0.1f), "AdamW decoupled weight decay (not on norm gains)")
      ("max-norm", po::value<float>()->default_value(1.0f), "global gradient-norm clip (<= 0: none)")
      ("task", po::value<std::string>()->default_value("recall"),
       "decoder: recall|needle|bytes; encoder (classification): listops|prefix-recall")
      ("data", po::value<std::string>(), "bytes: the file to model, byte by byte")
      ("listops-depth", po::value<int>()->default_value(2), "listops: deepest nesting")
      ("listops-args", po::value<int>()->default_value(6), "listops: most arguments per operator")
      ("prefix", po::value<int>()->default_value(8), "prefix-recall: tokens of the question prefix")
      ("pairs", po::value<int>()->default_value(8), "prefix-recall: (key, value) pairs in each sequence (1 to 64)")
      ("eval-every", po::value<int>()->default_value(0), "evaluate on held-out data every N steps and at the end "
                                                          "(0: never)")
      ("eval-batches", po::value<int>()->default_value(2), "batches in the held-out set")
      ("log-every", po::value<int>()->default_value(10), "progress line every N steps")
      ("checkpoint", po::value<std::string>()->default_value(""), "checkpoint file; {step} in the name is replaced "
                                                                  "by the step")
      ("checkpoint-every", po::value<int>()->default_value(0), "write the checkpoint every N steps (0: only at the end)")
      ("resume", po::value<std::string>()->default_value(""), "continue from this checkpoint")
      ("backend", po::value<std::string>()->default_value("auto"),
       "auto|cpu|cuda; auto: CUDA where a device exists, else the CPU");
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm, "usage: mpirun -np P ringcast train [--config FILE] [options]", rank == 0))
    return 0;

  LayerShape layer;
  ModelConfig config;
  AttentionOptions attention;
  read_layer_options(vm, world, layer, attention, !classification_task(vm["task"].as<std::string>()));
  read_model_options(vm, layer, attention, config);
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
  t.listops_depth = vm["listops-depth"].as<int>();
  t.listops_args = vm["listops-args"].as<int>();
  t.prefix = vm["prefix"].as<int>();
  t.pairs = vm["pairs"].as<int>();
  t.checkpoint = vm["checkpoint"].as<std::string>();
  t.checkpoint_every = vm["checkpoint-every"].as<int>();
  t.resume = vm["resume"].as<std::string>();
  if (t.steps < 1 || t.warmup_steps < 0) throw UsageError("--steps must be positive and --warmup-steps >= 0");
  if (!(t.lr > 0) || !(t.min_lr >= 0 && t.min_lr <= t.lr) || !(adam.weight_decay >= 0))
    throw UsageError("--lr must be positive, --min-lr in [0, lr] and --weight-decay >= 0");
  if (t.log_every < 1 || t.eval_every < 0 || t.eval_batches < 1)
    throw UsageError("--log-every and --eval-batches must be positive, --eval-every >= 0");
  if (t.task != "recall" && t.task != "needle" && t.task != "bytes" && !classification_task(t.task))
    throw UsageError(fmt::format("--task: unknown task '{}' (recall|needle|bytes|listops|prefix-recall)", t.task));
  if ((t.task == "bytes") != !t.data.empty())
    throw UsageError("--data FILE goes with --task bytes, and only with it");
  if (t.task == "recall" && shape.seq_len < 4)
    throw UsageError(fmt::format("--task recall needs --seq-len >= 4 (one pair and one query), got {}", shape.seq_len));
  if (t.task == "needle" && shape.seq_len < 16)
    throw UsageError(fmt::format("--task needle needs --seq-len >= 16, got {}", shape.seq_len));
  if (t.task == "listops" && (shape.seq_len < 5 || t.listops_depth < 1 || t.listops_args < 2))
    throw UsageError("--task listops needs --seq-len >= 5, --listops-depth >= 1 and --listops-args >= 2");
  if (t.task == "prefix-recall" && (t.prefix < 2 || shape.seq_len < t.prefix + 8 || t.pairs < 1 || t.pairs > 64))
    throw UsageError(fmt::format("--task prefix-recall needs --prefix >= 2, --seq-len >= prefix + 8 and --pairs in "
                                 "[1, 64] (prefix {}, seq-len {}, pairs {})", t.prefix, shape.seq_len, t.pairs));
  const std::string backend = vm["backend"].as<std::string>();
  if (backend != "auto" && backend != "cpu" && backend != "cuda")
    throw UsageError(fmt::format("--backend: unknown backend '{}' (auto|cpu|cuda)", backend));
  if (t.checkpoint_every < 0) throw UsageError("--checkpoint-every must be >= 0");
  if (t.checkpoint_every > 0 && t.checkpoint.empty()) throw UsageError("--checkpoint-every needs --checkpoint FILE");
  const OutputSpec output = OutputSpec::from_options(vm);
  const Datasets data = make_datasets(t, config.seed, shape.seq_len);
  if (classification_task(t.task)) {
    config.kind = ModelKind::kEncoder;
    config.num_classes = data.train->classes();
  }
  const bool encoder = config.kind == ModelKind::kEncoder;

  // auto: CUDA where a device exists.
  const Backend chosen = backend == "cpu" ? Backend::kCpu : backend == "cuda" ? Backend::kCuda : Backend::kAuto;
  Session session = Session::from_mpi(MPI_COMM_WORLD, chosen);
  reset_peak_allocated_bytes();
  Model model(session, config, shape);
  const TrainerState trainer = TrainerState::of(t, shape, config.seed);
  if (!t.resume.empty()) {
    check_resumable(model.load(t.resume), trainer, t.resume);
    if (model.steps_taken() >= t.steps)
      throw UsageError(fmt::format("--resume {}: already at step {} of --steps {}", t.resume, model.steps_taken(), t.steps));
    log::info("resumed from {} after step {}", t.resume, model.steps_taken());
  }
  log::info("ringcast {} ({}): training a {}-layer {} (D = {}, h = {}, h_kv = {}, d = {}, F = {}; {} parameters{}) "
            "on {}, n = {}, batch = {}, {} attention, {} rank(s) on {}",
            version(), git_commit(), config.layers, encoder ? "encoder" : "decoder", config.dim, config.heads,
            config.kv_heads, config.head_dim, config.ffn_hidden, model.num_parameters(),
            std::string(config.colt5.enabled ? ", CoLT5" : "") + (config.vcc.enabled ? ", VCC" : "") +
                (config.pyramidion.pool_after.empty() ? "" : ", Pyramidion pooling") +
                (config.attention.clusters == ClusterKind::kSurrogate ? ", CAST clusters" : ""),
            t.task == "bytes" ? t.data : t.task, shape.seq_len, shape.batch, name(config.attention.mode), world,
            session.device().kind == DeviceKind::kCuda
                ? fmt::format("CUDA devices ({} products, {} communicator)", dtype_name(model.compute_dtype()),
                              session.comm().backend_name())
                : std::string("the CPU backend"));

  Report steps;
  LocalBatch batch;
  Evaluation last_eval;
  std::vector<double> losses, accuracies;
  double train_s = 0.0, peak_bytes = 0.0;
  const double tokens_per_step = static_cast<double>(shape.seq_len) * shape.batch;
  const int first_step = static_cast<int>(model.steps_taken()) + 1;
  // The communication each step's compute waited for: the layers' (session.comm()) and the gradient
  // sums' (grad_comm()), timed by the communicators while the steps run.
  comm::ExposedTimingScope exposed({&session.comm(), &session.grad_comm()}, session.stream());
  for (int step = first_step; step <= t.steps; ++step) {
    exposed.take();  // what an evaluation or a checkpoint exchanged between steps
    const double t0 = MPI_Wtime();
    local_batch(*data.train, static_cast<std::uint64_t>(step - 1) * shape.batch, shape.batch, shape.seq_len,
                model.positions(), batch);
    const double loss = model.forward_backward(batch.tokens, batch.targets);
    const TargetCounts counts = model.last_targets();
    adam.lr = learning_rate(t, step);
    model.step(adam);
    synchronize(session.device(), session.stream());  // the step's device work is part of its time
    // The slowest rank sets the pace; one all-reduce also brings rank 0 the largest peak and the
    // longest exposed communication.
    double slowest[3] = {MPI_Wtime() - t0, static_cast<double>(peak_allocated_bytes()), exposed.take()};
    MPI_Allreduce(MPI_IN_PLACE, slowest, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
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
                           .set("exposed_comm_ms", 1e3 * slowest[2])
                           .set("peak_memory_bytes", static_cast<std::int64_t>(slowest[1]));
    const bool eval_now = data.held_out && (step % t.eval_every == 0 || step == t.steps);
    if (eval_now) {
      last_eval = evaluate(model, *data.held_out, t, shape);
      row.set("eval_loss", last_eval.loss).set("eval_accuracy", last_eval.accuracy);
    }
    const bool checkpoint_now =
        !t.checkpoint.empty() && ((t.checkpoint_every > 0 && step % t.checkpoint_every == 0) || step == t.steps);
    if (checkpoint_now) model.save(checkpoint_path(t.checkpoint, step), trainer.bytes());
    if (step == first_step || step % t.log_every == 0 || step == t.steps)
      log::info("step {:>{}}/{}  loss {:.4f}  accuracy {:.3f}  lr {:.2e}  {:.0f} tokens/s  {:.1f} ms (comm {:.1f})  "
                "peak {}{}",
                step, fmt::formatted_size("{}", t.steps), t.steps, loss, accuracy, adam.lr,
                tokens_per_step / slowest[0], 1e3 * slowest[0], 1e3 * slowest[2], format_bytes(slowest[1]),
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
  row.set("tokens_per_s", tokens_per_step * static_cast<double>(losses.size()) / train_s)
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
