// Checkpoint files (checkpoint.hpp): serialisation, the atomic write, the checked read, and the
// broadcast that makes rank 0's outcome -- success or its error message -- every rank's.
#include "checkpoint.hpp"

#include <ringcast/error.hpp>
#include <ringcast/memory.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <unistd.h>

namespace ringcast::model {
namespace {

constexpr char kMagic[8] = {'R', 'I', 'N', 'G', 'C', 'K', 'P', 'T'};
constexpr std::uint32_t kVersion = 1;

std::uint64_t fnv1a(std::span<const std::byte> bytes, std::uint64_t h = 0xcbf29ce484222325ull) {
  for (const std::byte b : bytes) h = (h ^ static_cast<std::uint8_t>(b)) * 0x100000001b3ull;
  return h;
}

class Writer {
 public:
  template <typename T> void put(const T& v) { put_bytes(std::as_bytes(std::span<const T>(&v, 1))); }
  void put_bytes(std::span<const std::byte> b) { bytes_.insert(bytes_.end(), b.begin(), b.end()); }
  void put_floats(std::span<const float> x) { put_bytes(std::as_bytes(x)); }
  std::vector<std::byte>& bytes() { return bytes_; }

 private:
  std::vector<std::byte> bytes_;
};

class Reader {
 public:
  Reader(std::span<const std::byte> bytes, const std::string& path) : bytes_(bytes), path_(path) {}
  std::span<const std::byte> take(std::size_t n) {
    RINGCAST_CHECK(n <= bytes_.size() - at_, "checkpoint {}: truncated (needs {} more bytes at offset {}, has {})",
                   path_, n, at_, bytes_.size() - at_);
    const auto out = bytes_.subspan(at_, n);
    at_ += n;
    return out;
  }
  template <typename T> T get() {
    T v;
    std::memcpy(&v, take(sizeof(T)).data(), sizeof(T));
    return v;
  }
  std::vector<float> floats(std::uint64_t n) {
    const auto b = take(static_cast<std::size_t>(n) * sizeof(float));
    std::vector<float> x(static_cast<std::size_t>(n));
    std::memcpy(x.data(), b.data(), b.size());
    return x;
  }
  std::size_t at() const { return at_; }

 private:
  std::span<const std::byte> bytes_;
  std::size_t at_ = 0;
  const std::string& path_;
};

void write_all(int fd, std::span<const std::byte> b, const std::string& path) {
  while (!b.empty()) {
    const ssize_t n = ::write(fd, b.data(), b.size());
    if (n < 0 && errno == EINTR) continue;
    RINGCAST_CHECK(n > 0, "checkpoint {}: write failed: {}", path, std::strerror(errno));
    b = b.subspan(static_cast<std::size_t>(n));
  }
}

// temp file, fsync, rename over `path`, fsync of the folder: a reader sees the old file or the new one.
void write_atomically(const std::string& path, std::span<const std::byte> bytes) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string tmp = (dir / fmt::format(".{}.tmp.{}", target.filename().string(), ::getpid())).string();
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  RINGCAST_CHECK(fd >= 0, "checkpoint {}: cannot create {}: {}", path, tmp, std::strerror(errno));
  try {
    write_all(fd, bytes, path);
    RINGCAST_CHECK(::fsync(fd) == 0, "checkpoint {}: fsync failed: {}", path, std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  RINGCAST_CHECK(::close(fd) == 0, "checkpoint {}: close failed: {}", path, std::strerror(errno));
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    RINGCAST_THROW("checkpoint {}: rename failed: {}", path, std::strerror(err));
  }
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  RINGCAST_CHECK(dir_fd >= 0, "checkpoint {}: cannot open its folder to sync it: {}", path, std::strerror(errno));
  const int synced = ::fsync(dir_fd);
  ::close(dir_fd);
  RINGCAST_CHECK(synced == 0, "checkpoint {}: fsync of the folder failed: {}", path, std::strerror(errno));
}

// Broadcasts rank 0's `host` (host memory) to every rank: in place on a host-memory communicator,
// else through a device copy.
void broadcast_host(const Session& session, comm::Buffer host) {
  auto& comm = session.comm();
  if (comm.memory() == DeviceKind::kCpu) {
    comm.broadcast(host, 0);
    return;
  }
  DeviceBuffer staging(host.bytes(), session.device());
  if (session.rank() == 0) staging.copy_from_host(host.data, host.bytes(), 0, session.stream());
  comm.broadcast({staging.data(), host.count, host.dtype}, 0, session.stream());
  comm.synchronize(session.stream());
  staging.copy_to_host(host.data, host.bytes(), 0, session.stream());
}

// Makes rank 0's outcome everyone's: an empty message is success; otherwise every rank throws it.
void agree_on_outcome(const Session& session, std::string message) {
  std::uint64_t length = message.size();
  broadcast_host(session, {&length, 1, DType::kI64});
  message.resize(static_cast<std::size_t>(length));
  if (length > 0) broadcast_host(session, {message.data(), message.size(), DType::kU8});
  if (!message.empty()) RINGCAST_THROW("{}", message);
}

std::string error_text(const std::exception& e) {
  const auto* error = dynamic_cast<const Error*>(&e);
  const std::string text = error ? error->message() : e.what();
  return text.empty() ? std::string("unknown error") : text;
}

void broadcast_bytes(const Session& session, std::vector<std::byte>& bytes) {
  std::uint64_t n = bytes.size();
  broadcast_host(session, {&n, 1, DType::kI64});
  bytes.resize(static_cast<std::size_t>(n));
  if (n > 0) broadcast_host(session, {bytes.data(), bytes.size(), DType::kU8});
}

}  // namespace

std::string fingerprint(const ModelConfig& c, const ParameterTable& table) {
  std::string s = fmt::format(
      "kind={} classes={} vocab={} dim={} layers={} heads={} kv_heads={} head_dim={} ffn_hidden={} norm_eps={} "
      "rope_theta={} mode={} clusters={} page_size={} colt5={} vcc={} pyramidion={}\n",
      c.kind == ModelKind::kEncoder ? "encoder" : "decoder", c.num_classes, c.vocab, c.dim, c.layers, c.heads,
      c.kv_heads, c.head_dim, c.ffn_hidden, c.norm_eps, c.rope_theta, name(c.attention.mode), name(c.attention.clusters),
      c.attention.page_size, c.colt5.enabled, c.vcc.enabled, c.pyramidion.pool_after.size());
  for (const ParameterInfo& t : table.infos()) s += fmt::format("{} [{}, {}]\n", t.name, t.rows, t.cols);
  return s;
}

void save_checkpoint(const Session& session, const std::string& path, const CheckpointData& d) {
  std::string failure;
  if (session.rank() == 0) {
    try {
      Writer w;
      w.put_bytes(std::as_bytes(std::span<const char>(kMagic)));
      w.put(kVersion);
      w.put(std::uint32_t{0});
      w.put(std::uint64_t{d.fingerprint.size()});
      w.put_bytes(std::as_bytes(std::span<const char>(d.fingerprint)));
      w.put(d.steps);
      w.put(std::uint64_t{d.params.size()});
      w.put_floats(d.params);
      w.put_floats(d.adam_m);
      w.put_floats(d.adam_v);
      w.put(std::uint64_t{d.user_state.size()});
      w.put_bytes(d.user_state);
      w.put(fnv1a(w.bytes()));
      write_atomically(path, w.bytes());
    } catch (const std::exception& e) {
      failure = error_text(e);
    }
  }
  agree_on_outcome(session, std::move(failure));
}

LoadedCheckpoint load_checkpoint(const Session& session, const std::string& path, const std::string& expected,
                                 const std::array<float*, 3>& buffers, std::int64_t count) {
  LoadedCheckpoint out;
  std::vector<float> contents[3];  // rank 0: params, adam_m, adam_v as read
  std::string failure;
  if (session.rank() == 0) {
    try {
      std::ifstream f(path, std::ios::binary);
      RINGCAST_CHECK(f.good(), "checkpoint {}: cannot open it: {}", path, std::strerror(errno));
      std::vector<std::byte> bytes;
      f.seekg(0, std::ios::end);
      bytes.resize(static_cast<std::size_t>(f.tellg()));
      f.seekg(0);
      f.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      RINGCAST_CHECK(f.good(), "checkpoint {}: read failed", path);
      Reader r(bytes, path);
      RINGCAST_CHECK(bytes.size() >= sizeof(kMagic) && std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) == 0,
                     "checkpoint {}: not a ringcast checkpoint", path);
      r.take(sizeof(kMagic));
      const auto version = r.get<std::uint32_t>();
      RINGCAST_CHECK(version == kVersion, "checkpoint {}: format version {}, this build reads {}", path, version,
                     kVersion);
      r.get<std::uint32_t>();
      const auto fp_bytes = r.take(static_cast<std::size_t>(r.get<std::uint64_t>()));
      const std::string fp(reinterpret_cast<const char*>(fp_bytes.data()), fp_bytes.size());
      out.steps = r.get<std::int64_t>();
      const auto n = r.get<std::uint64_t>();
      for (std::vector<float>& x : contents) x = r.floats(n);
      const auto user = r.take(static_cast<std::size_t>(r.get<std::uint64_t>()));
      out.user_state.assign(user.begin(), user.end());
      const std::size_t body = r.at();
      const auto sum = r.get<std::uint64_t>();
      RINGCAST_CHECK(r.at() == bytes.size(), "checkpoint {}: {} unexpected bytes after the checksum", path,
                     bytes.size() - r.at());
      RINGCAST_CHECK(sum == fnv1a(std::span<const std::byte>(bytes).first(body)),
                     "checkpoint {}: checksum mismatch (the file is corrupt)", path);
      if (fp != expected) {
        std::istringstream a(fp), b(expected);
        std::string la, lb;
        while (std::getline(a, la) && std::getline(b, lb) && la == lb) {}
        RINGCAST_THROW("checkpoint {}: written for a different model (file: '{}', this model: '{}')", path, la, lb);
      }
      RINGCAST_CHECK(static_cast<std::int64_t>(n) == count, "checkpoint {}: {} parameters, the model has {}", path, n,
                     count);
    } catch (const std::exception& e) {
      failure = error_text(e);
    }
  }
  agree_on_outcome(session, std::move(failure));
  // Rank 0's verified contents, to everyone (parameters are replicated), straight into the buffers.
  auto& comm = session.comm();
  broadcast_host(session, {&out.steps, 1, DType::kI64});
  for (std::size_t i = 0; i < buffers.size(); ++i) {
    if (session.rank() == 0)
      copy_from_host(buffers[i], contents[i].data(), contents[i].size() * sizeof(float), session.device(),
                     session.stream());
    comm.broadcast({buffers[i], static_cast<std::size_t>(count), DType::kF32}, 0, session.stream());
  }
  comm.synchronize(session.stream());
  broadcast_bytes(session, out.user_state);
  return out;
}

}  // namespace ringcast::model
