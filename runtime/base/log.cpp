// The rank-aware logger. One line per call, written with a single fputs so lines from ranks that
// share a terminal do not interleave mid-line.
#include <ringcast/error.hpp>
#include <ringcast/log.hpp>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

namespace ringcast::log {
namespace {

struct State {
  std::atomic<int> level{static_cast<int>(Level::kInfo)};
  int rank = 0;
  int world_size = 1;
  std::string host;
  std::mutex mutex;

  State() {
    if (const char* env = std::getenv("RINGCAST_LOG_LEVEL"); env && *env) {
      try {
        level = static_cast<int>(parse_level(env));
      } catch (const Error&) {
        std::fprintf(stderr, "ringcast: ignoring RINGCAST_LOG_LEVEL=%s (debug|info|warn|error|off)\n", env);
      }
    }
  }
};

State& state() {
  static State s;
  return s;
}

constexpr std::string_view level_tag(Level l) {
  switch (l) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarn: return "warning";
    case Level::kError: return "error";
    case Level::kOff: return "";
  }
  return "";
}

}  // namespace

void set_rank(int rank, int world_size, std::string_view host) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  s.rank = rank;
  s.world_size = world_size;
  s.host = host;
}

void set_level(Level l) { state().level = static_cast<int>(l); }
Level level() { return static_cast<Level>(state().level.load(std::memory_order_relaxed)); }

Level parse_level(std::string_view name) {
  if (name == "debug") return Level::kDebug;
  if (name == "info") return Level::kInfo;
  if (name == "warn" || name == "warning") return Level::kWarn;
  if (name == "error") return Level::kError;
  if (name == "off") return Level::kOff;
  RINGCAST_THROW("unknown log level '{}' (debug|info|warn|error|off)", name);
}

void write(Level l, std::string_view message) {
  auto& s = state();
  std::string line;
  {
    std::lock_guard lock(s.mutex);
    const bool everywhere = l >= Level::kWarn;
    if (!everywhere && s.rank != 0) return;
    if (everywhere && s.world_size > 1) {
      line = fmt::format("[rank {}/{} {}] {}: {}\n", s.rank, s.world_size, s.host, level_tag(l), message);
    } else if (l == Level::kInfo) {
      line = fmt::format("{}\n", message);
    } else {
      line = fmt::format("{}: {}\n", level_tag(l), message);
    }
  }
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace ringcast::log
