// The one rank-aware logger (fmt). Info and debug print on rank 0 only; warnings and errors print on
// every rank with a "[rank r/P host]" prefix. Level from RINGCAST_LOG_LEVEL (debug|info|warn|error|off),
// default info. Everything goes to stderr so stdout stays for tables and machine-readable output.
#pragma once

#include <fmt/format.h>

#include <string_view>

namespace ringcast::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

// Called once the rank is known (Session, or the launcher before the first collective).
void set_rank(int rank, int world_size, std::string_view host);
void set_level(Level level);
Level level();
Level parse_level(std::string_view name);  // throws Error on an unknown name

void write(Level level, std::string_view message);

template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::kDebug) write(Level::kDebug, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::kInfo) write(Level::kInfo, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::kWarn) write(Level::kWarn, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::kError) write(Level::kError, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace ringcast::log
