// ringcast::Error and the check macros every layer uses.
// Library code throws Error (message carries file:line); only launch/ turns errors into exit codes.
// RINGCAST_CHECK for invariants and user input; backend macros (CUDA, NCCL, MPI) live beside
// their backends and build on make_error().
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>

namespace ringcast {

class Error : public std::runtime_error {
 public:
  Error(std::string_view file, int line, std::string_view message);

  // The message without the file:line prefix, for users.
  const std::string& message() const noexcept { return message_; }
  std::string_view file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  std::string message_;
  std::string file_;
  int line_;
};

[[noreturn]] void throw_error(std::string_view file, int line, std::string_view message);

}  // namespace ringcast

#define RINGCAST_THROW(...) ::ringcast::throw_error(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__))

#define RINGCAST_CHECK(cond, ...)                  \
  do {                                             \
    if (!(cond)) [[unlikely]] {                    \
      RINGCAST_THROW(__VA_ARGS__);                 \
    }                                              \
  } while (0)
