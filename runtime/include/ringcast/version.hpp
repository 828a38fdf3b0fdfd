// The library version, and the git commit the binary was built from (regenerated at every build).
#pragma once

namespace ringcast {
const char* version();
const char* git_commit();  // "unknown" outside a git checkout; "-dirty" suffix for local changes
}  // namespace ringcast
