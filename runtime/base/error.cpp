// ringcast::Error: the message carries the source location for developers; message() is for users.
#include <ringcast/error.hpp>

namespace ringcast {
namespace {
std::string_view basename(std::string_view path) {
  auto slash = path.find_last_of('/');
  return slash == std::string_view::npos ? path : path.substr(slash + 1);
}
}  // namespace

Error::Error(std::string_view file, int line, std::string_view message)
    : std::runtime_error(fmt::format("{} ({}:{})", message, basename(file), line)),
      message_(message),
      file_(basename(file)),
      line_(line) {}

void throw_error(std::string_view file, int line, std::string_view message) {
  throw Error(file, line, message);
}

}  // namespace ringcast
