// `ringcast check`: runs one attention layer distributed over the world's ranks and compares every
// rank's shard with a single-rank reference of the same layer on the whole sequence (the CPU backend
// in fp32, on the same inputs rounded to the storage dtype). Prints the relative errors of O, LSE,
// dQ, dK, dV (worst rank) and exits 1 when one is above its tolerance (fp32: 1e-5; bf16/f16: 1e-2).
// The clustered mode approximates attention, and its selections depend on P, so no single-rank run is
// its reference; it is exact when its budgets cover every page (DESIGN.md §7). check therefore widens
// top-k, coarse-k, remote-blocks and remote-cap to cover every page (the other options as given:
// summaries, halo, fetches and their gradients all run) and compares with exact attention. The
// clustered mode at sparse budgets is checked against a single-process simulation by the test suite.
// --dump DIR writes every rank's inputs, outputs and (clustered) attended entries as .npy files with
// a README.txt that documents them (write_dump), for references outside the code base.
#include "commands.hpp"
#include "layer_options.hpp"
#include "npy.hpp"
#include "report.hpp"
#include "tensor_arena.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/error.hpp>
#include <ringcast/log.hpp>

#include <fmt/format.h>
#include <mpi.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

namespace ringcast::launch {
namespace {

// Inputs and, after run(), the host copies of the outputs. s: the surrogates [h_kv, c, d] when the
// layer takes them (the same seeded values on every rank), d_s this rank's part of their gradient.
struct Tensors {
  LayerInputs in;
  std::vector<float> s;
  std::vector<float> o, lse, d_q, d_k, d_v, d_s;
};

// Rounds through the storage dtype (bf16 and f16 keep 8 and 11 significand bits).
float round_to(float x, DType t) {
  if (t == DType::kF32) return x;
  const int bits = t == DType::kBF16 ? 8 : 11;
  int e = 0;
  const float m = std::frexp(x, &e);
  return std::ldexp(std::nearbyint(std::ldexp(m, bits)), e - bits);
}

std::vector<float> random_tensor(std::size_t n, std::uint64_t seed, DType t) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> x(n);
  for (auto& v : x) v = round_to(dist(rng), t);
  return x;
}

std::vector<float> rows(const std::vector<float>& x, int batch, std::int64_t seq, int row,
                        std::span<const std::int32_t> pos) {
  std::vector<float> out;
  for (int b = 0; b < batch; ++b)
    for (auto t : pos) out.insert(out.end(), x.begin() + (b * seq + t) * row, x.begin() + (b * seq + t + 1) * row);
  return out;
}

std::vector<float> lse_rows(const std::vector<float>& x, int batch, int heads, std::int64_t seq,
                            std::span<const std::int32_t> pos) {
  std::vector<float> out;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (auto t : pos) out.push_back(x[(b * heads + h) * seq + t]);
  return out;
}

double rel_error(const std::vector<float>& x, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (x[i] == ref[i]) continue;  // also equal infinities
    if (!std::isfinite(x[i]) || !std::isfinite(ref[i])) return INFINITY;
    num += (double(x[i]) - ref[i]) * (double(x[i]) - ref[i]);
  }
  for (float r : ref)
    if (std::isfinite(r)) den += double(r) * r;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Forward and backward of `layer` on host tensors (uploaded to the session's device in its dtype).
void run(const Session& session, DistributedAttention& layer, Tensors& t) {
  TensorArena arena(session);
  const LayerTensors x = arena.layer(layer.shape(), t.in);
  TensorView s, d_s;
  if (layer.options().uses_surrogates()) {
    const auto [h_kv, c, d] = surrogate_shape(layer.shape(), layer.options());
    const std::vector<float> zeros(t.s.size(), 0.f);
    s = arena.make({h_kv, c, d}, layer.shape().dtype, &t.s);
    d_s = arena.make({h_kv, c, d}, DType::kF32, &zeros);
  }
  layer.forward({x.q, x.k, x.v, x.o, x.lse, s});
  layer.backward({x.q, x.k, x.v, x.o, x.lse, x.d_o, x.d_q, x.d_k, x.d_v, s, d_s});
  if (d_s.data) t.d_s = arena.download(d_s);
  t.o = arena.download(x.o);
  t.lse = arena.download(x.lse);
  t.d_q = arena.download(x.d_q);
  t.d_k = arena.download(x.d_k);
  t.d_v = arena.download(x.d_v);
}

// The clustered mode's budgets raised until every unit selects every eligible page and every rank
// fetches every remote block: the setting in which it equals exact attention. Surrogate clusters
// are pages too; they are exact so only when every token lies in one cluster (single assignment with
// c * page_size >= n_loc) and the joint combine mixes nothing.
void cover_every_page(const LayerShape& shape, AttentionOptions& o) {
  validate(shape, o);  // a bad page size or block fails here with its own message
  if (o.uses_surrogates() &&
      (o.assignment != SurrogateAssignment::kSingle || o.combine != ClusterCombine::kJoint ||
       std::int64_t{o.resolved_surrogate_clusters(shape)} * o.page_size < shape.local_len()))
    throw UsageError(
        "ringcast check compares with exact attention: surrogate clusters are exact only with --assignment single, "
        "--combine joint and at least n_loc / page-size clusters (the test suite checks the others against a "
        "float64 reference of the same algorithm)");
  const std::int64_t pages =
      o.uses_surrogates() ? std::int64_t{shape.ranks} * o.resolved_surrogate_clusters(shape) : shape.seq_len / o.page_size;
  const auto blocks = static_cast<int>(pages / o.coarse_pages);
  o.top_k = static_cast<int>(pages);
  o.coarse_k = o.remote_blocks = o.remote_cap = blocks;
  log::info("ringcast check: clustered budgets widened to cover every page (top-k {}, coarse-k, remote-blocks and "
            "remote-cap {}), where the mode is exact", o.top_k, blocks);
}

// The clustered mode with surrogate clusters: what its extra files hold and how its entries read.
std::string surrogate_readme(const LayerShape& s, const AttentionOptions& o) {
  const int c = o.resolved_surrogate_clusters(s);
  return fmt::format(
      "  entries    int64   [num_entries, 9]         what the forward attended, per (batch, tile, KV head)\n"
      "  clusters   int32   [B, h_kv, c, ps]          the rank's clusters: global positions of the members of\n"
      "                                               cluster i of KV head g (ascending), -1 in padding slots\n"
      "  surrogates float32 [h_kv, c, d]              the surrogate tokens S (the same on every rank)\n"
      "  d_surrogates float32 [h_kv, c, d]            this rank's part of dLoss/dS (the sum over ranks is dS)\n"
      "\n"
      "Surrogate (CAST) clusters: assignment {}, combine {}, c = {} clusters of page_size = {} slots per rank\n"
      "and KV head, coarse blocks of coarse_pages = {} clusters. A_q = q.S (per query head), A_k = k.S; a\n"
      "cluster's summary is the softmax(A_k)-weighted mean of its members' keys and values.\n"
      "entries.npy columns as in the blocks mode (0 batch, 1 tile: local rows [128 tile, 128 tile + 128),\n"
      "2 first_row_pos, 3 kv_head, 4 kind, 5 global_id, 6 row_mask_lo, 7 row_mask_hi, 8 causal = 0), with\n"
      "clusters for pages: global cluster id = rank * c + i (rows of rank{{rank}}_clusters.npy), global block\n"
      "id = global cluster id / coarse_pages. Kinds:\n"
      "  0 window          global cluster global_id: the row's own cluster (its members' keys, exact)\n"
      "  1 selected        global cluster global_id, exact (chosen by top-k)\n"
      "  2 page_summary    one key standing for cluster global_id: softmax(A_k)-weighted mean key and\n"
      "                    value, logit bias + log(members)\n"
      "  3 coarse_summary  one key standing for block global_id: the count-weighted mean of its clusters'\n"
      "                    summaries, logit bias + log(members of the block)\n"
      "combine = joint: every non-empty cluster is counted once for every row, at one of these resolutions.\n"
      "combine = cast: entries list each row's own clusters only (the intra-cluster attention); the output\n"
      "mixes them with every surrogate's summary over all ranks, weighted by softmax(A_q).\n",
      name(o.assignment), name(o.combine), c, o.page_size, o.coarse_pages);
}

// The README of a dump: every file, its shape, dtype and columns, and the options as run.
std::string dump_readme(const LayerShape& s, const AttentionOptions& o, std::uint64_t seed) {
  const bool clustered = o.mode == AttentionMode::kClustered;
  std::string t = fmt::format(
      "ringcast check --dump: one attention layer, forward and backward, as `ringcast check` ran it.\n"
      "\n"
      "Options as run: mode {}, seq_len n = {}, ranks P = {}, batch B = {}, heads h = {}, kv_heads h_kv = {},\n"
      "head_dim d = {}, {}, dtype {}, placement {}, seed {}.\n",
      name(o.mode), s.seq_len, s.ranks, s.batch, s.heads, s.kv_heads, s.head_dim,
      s.causal ? "causal" : "bidirectional", dtype_name(s.dtype), name(o.resolved_placement(s)), seed);
  if (clustered)
    t += fmt::format(
        "Clustered: selection {}, score {}, page_size {}, coarse_pages {} (coarse block {} keys), top_k {},\n"
        "coarse_k {}, remote_blocks {}, remote_cap {}, window {} ({}).\n"
        "check widens top_k, coarse_k, remote_blocks and remote_cap to cover every page and compares with\n"
        "exact attention; the dump holds what the layer attended with these options as run.\n",
        name(o.resolved_selection(s)), name(o.score), o.page_size, o.coarse_pages, o.coarse_block(), o.top_k,
        o.coarse_k, o.remote_blocks, o.resolved_remote_cap(), s.causal ? o.window_before : o.window_bidir,
        s.causal ? "causal: keys [t0 - window, t1)" : "bidirectional: keys [t0 - window, t1 + window)");
  t += fmt::format(
      "\n"
      "Every rank r writes rank{{r}}_NAME.npy (little-endian, C order); n_loc = n / P = {} rows per rank.\n"
      "Values of q, k, v, d_o are the exact inputs (already rounded to the storage dtype); outputs are\n"
      "those of the distributed layer, converted to float32.\n"
      "  positions  int32   [n_loc]                  global position of each local row (row i of every\n"
      "                                               tensor below)\n"
      "  q, d_o     float32 [B, n_loc, h, d]          queries, output gradient\n"
      "  k, v       float32 [B, n_loc, h_kv, d]       keys, values (query head i uses KV head i / (h / h_kv))\n"
      "  o          float32 [B, n_loc, h, d]          output\n"
      "  lse        float32 [B, h, n_loc]             natural log of the softmax denominator of\n"
      "                                               q.k / sqrt(d) (+ log(count) on summary keys)\n"
      "  d_q        float32 [B, n_loc, h, d]          gradients\n"
      "  d_k, d_v   float32 [B, n_loc, h_kv, d]\n",
      s.local_len());
  if (!clustered) return t + "(entries.npy is written in the clustered mode only: the exact modes attend every visible key.)\n";
  if (o.uses_surrogates()) return t + surrogate_readme(s, o);
  t += fmt::format(
      "  entries    int64   [num_entries, 9]         what the forward attended, per (batch, tile, KV head)\n"
      "\n"
      "entries.npy columns: 0 batch, 1 tile (rank-local, 128 rows: local rows [128 tile, 128 tile + 128)),\n"
      "2 first_row_pos (global position of the tile's first row; contiguous placement: row i of the tile\n"
      "is at first_row_pos + i), 3 kv_head, 4 kind, 5 global_id, 6 row_mask_lo, 7 row_mask_hi, 8 causal.\n"
      "Masks are uint64 stored bit for bit in int64 (view as uint64): tile row i sees the record iff bit\n"
      "i % 64 of (i < 64 ? row_mask_lo : row_mask_hi) is set. Kinds:\n"
      "  0 window          global page global_id: its {ps} keys [{ps} id, {ps} id + {ps}), exact\n"
      "  1 selected        global page global_id, exact (chosen by top-k)\n"
      "  2 page_summary    one summary key standing for global page global_id ({ps} keys): mean key,\n"
      "                    mean value, logit bias + log({ps})\n"
      "  3 coarse_summary  one summary key standing for global block global_id ({bk} keys\n"
      "                    [{bk} id, {bk} id + {bk})): mean key, mean value, logit bias + log({bk})\n"
      "causal = 1: row at position t sees only the page's keys at positions <= t (window pages when\n"
      "causal); 0: all of them. Every key a row may see is counted exactly once over its records\n"
      "(DESIGN.md section 4.1, Visibility rules).\n",
      fmt::arg("ps", o.page_size), fmt::arg("bk", o.coarse_block()));
  return t;
}

// Writes this rank's files of a --dump (and, on rank 0, the README).
void write_dump(const std::string& dir, int rank, const DistributedAttention& layer, const Tensors& t,
                std::uint64_t seed) {
  const LayerShape& s = layer.shape();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);  // every rank: the directory may be rank-local
  RINGCAST_CHECK(std::filesystem::is_directory(dir), "ringcast check: cannot create the dump directory {}", dir);
  const auto path = [&](const char* what) { return fmt::format("{}/rank{}_{}.npy", dir, rank, what); };
  const std::int64_t b = s.batch, n = s.local_len(), h = s.heads, g = s.kv_heads, d = s.head_dim;
  write_npy(path("positions"), layer.positions(), {n});
  using Named = std::pair<const char*, const std::vector<float>*>;
  for (const auto& [what, x] : {Named{"q", &t.in.q}, Named{"d_o", &t.in.d_o}, Named{"o", &t.o}, Named{"d_q", &t.d_q}})
    write_npy(path(what), *x, {b, n, h, d});
  for (const auto& [what, x] : {Named{"k", &t.in.k}, Named{"v", &t.in.v}, Named{"d_k", &t.d_k}, Named{"d_v", &t.d_v}})
    write_npy(path(what), *x, {b, n, g, d});
  write_npy(path("lse"), t.lse, {b, h, n});
  if (layer.options().mode == AttentionMode::kClustered) {
    std::vector<std::int64_t> rows;
    const std::vector<AttendedEntry> entries = layer.attended_entries();
    for (const AttendedEntry& e : entries)
      rows.insert(rows.end(), {e.batch, e.tile, e.first_row_pos, e.kv_head, static_cast<std::int64_t>(e.kind),
                               e.global_id, static_cast<std::int64_t>(e.row_mask[0]),
                               static_cast<std::int64_t>(e.row_mask[1]), e.causal});
    write_npy(path("entries"), rows, {static_cast<std::int64_t>(entries.size()), 9});
  }
  if (layer.options().uses_surrogates()) {
    const auto [h_kv, c, d_s] = surrogate_shape(s, layer.options());
    write_npy(path("clusters"), layer.cluster_members(), {b, h_kv, c, layer.options().page_size});
    write_npy(path("surrogates"), t.s, {h_kv, c, d_s});
    write_npy(path("d_surrogates"), t.d_s, {h_kv, c, d_s});
  }
  if (rank == 0) {
    std::ofstream f(dir + "/README.txt");
    f << dump_readme(s, layer.options(), seed);
    RINGCAST_CHECK(f.good(), "ringcast check: error writing {}/README.txt", dir);
  }
  log::info("ringcast check: rank {} dumped its shard to {}", rank, dir);
}

}  // namespace

std::vector<std::pair<std::string, double>> reference_errors(const Session& session, DistributedAttention& layer,
                                                             std::uint64_t seed, const std::string& dump_dir) {
  const LayerShape& s = layer.shape();
  const std::size_t qn = std::size_t(s.batch) * s.seq_len * s.heads * s.head_dim;
  const std::size_t kn = std::size_t(s.batch) * s.seq_len * s.kv_heads * s.head_dim;
  Tensors global;
  global.in = {random_tensor(qn, seed, s.dtype), random_tensor(kn, seed + 1, s.dtype),
               random_tensor(kn, seed + 2, s.dtype), random_tensor(qn, seed + 3, s.dtype)};
  const auto pos = layer.positions();
  const int qrow = s.heads * s.head_dim, krow = s.kv_heads * s.head_dim;
  Tensors mine;
  mine.in = {rows(global.in.q, s.batch, s.seq_len, qrow, pos), rows(global.in.k, s.batch, s.seq_len, krow, pos),
             rows(global.in.v, s.batch, s.seq_len, krow, pos), rows(global.in.d_o, s.batch, s.seq_len, qrow, pos)};
  if (layer.options().uses_surrogates()) {
    const auto [h_kv, c, d] = surrogate_shape(s, layer.options());
    mine.s = random_tensor(static_cast<std::size_t>(h_kv * c * d), seed + 4, s.dtype);
  }
  run(session, layer, mine);
  if (!dump_dir.empty()) write_dump(dump_dir, session.rank(), layer, mine, seed);

  // The reference: the same layer on one rank, whole sequence, CPU backend in fp32.
  Session self = Session::from_mpi(MPI_COMM_SELF, Backend::kCpu);
  LayerShape whole = s;
  whole.ranks = 1;
  whole.dtype = DType::kF32;
  AttentionOptions exact;
  exact.mode = AttentionMode::kRing;
  exact.placement = Placement::kContiguous;
  DistributedAttention reference(self, whole, exact);
  run(self, reference, global);

  std::vector<std::pair<std::string, double>> errors{
      {"o", rel_error(mine.o, rows(global.o, s.batch, s.seq_len, qrow, pos))},
      {"lse", rel_error(mine.lse, lse_rows(global.lse, s.batch, s.heads, s.seq_len, pos))},
      {"d_q", rel_error(mine.d_q, rows(global.d_q, s.batch, s.seq_len, qrow, pos))},
      {"d_k", rel_error(mine.d_k, rows(global.d_k, s.batch, s.seq_len, krow, pos))},
      {"d_v", rel_error(mine.d_v, rows(global.d_v, s.batch, s.seq_len, krow, pos))}};
  for (auto& [what, err] : errors) {
    double worst = 0;
    MPI_Allreduce(&err, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    err = worst;
  }
  return errors;
}

int check_command(const CommandLine& cmd) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  po::options_description desc("ringcast check options");
  add_common_options(desc);
  add_layer_options(desc, /*with_ranks=*/false);
  desc.add_options()("seed", po::value<std::uint64_t>()->default_value(1), "seed of the random inputs")(
      "dump", po::value<std::string>(), "write every rank's inputs, outputs and attended entries as .npy to DIR");
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm,
                     "usage: mpirun -np P ringcast check --mode M --seq-len N [options]\n"
                     "Compares the distributed layer with exact attention on one rank. --mode clustered runs with\n"
                     "budgets widened to cover every page (where it is exact); sparse budgets are tested by the\n"
                     "test suite against a single-process simulation.",
                     rank == 0))
    return 0;
  LayerShape shape;
  AttentionOptions options;
  read_layer_options(vm, world, shape, options);
  if (options.mode == AttentionMode::kClustered) cover_every_page(shape, options);
  const OutputSpec output = OutputSpec::from_options(vm);
  const std::uint64_t seed = vm["seed"].as<std::uint64_t>();

  Session session = Session::from_mpi(MPI_COMM_WORLD);
  if (session.device().kind == DeviceKind::kCpu) shape.dtype = DType::kF32;  // the CPU backend computes in fp32
  DistributedAttention layer(session, shape, options);
  log::info("ringcast check: {} attention, n = {}, {} ranks, h = {}, h_kv = {}, d = {}, {}, {}", name(options.mode),
            shape.seq_len, shape.ranks, shape.heads, shape.kv_heads, shape.head_dim,
            shape.causal ? "causal" : "bidirectional", dtype_name(shape.dtype));

  const std::vector<std::pair<std::string, double>> errors =
      reference_errors(session, layer, seed, vm.count("dump") ? vm["dump"].as<std::string>() : std::string());
  const double tolerance = shape.dtype == DType::kF32 ? 1e-5 : 1e-2;
  Report report;
  bool ok = true;
  for (const auto& [what, worst] : errors) {
    const bool pass = worst <= tolerance;  // NaN fails
    ok = ok && pass;
    report.add_row()
        .set("mode", std::string(name(options.mode)))
        .set("tensor", what)
        .set("rel_error", worst)
        .set("tolerance", tolerance)
        .set("result", std::string(pass ? "ok" : "FAIL"));
  }
  if (rank == 0) emit(report, output);
  if (!ok) log::error("ringcast check: {} attention differs from the single-rank reference", name(options.mode));
  return ok ? 0 : 1;
}

}  // namespace ringcast::launch
