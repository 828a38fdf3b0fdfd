#!/usr/bin/env bash
# Installs a ringcast build tree into a scratch prefix and proves the install alone is enough to build
# against: consumer/ configured with find_package(ringcast) (CMAKE_PREFIX_PATH = the prefix) and the
# same main.cpp compiled by one c++ command with pkg-config; both run on 2 ranks and must print the
# same loss. WORK is emptied first and left behind for inspection.
# Usage: run_install_test.sh BUILD_DIR CONFIG WORK LIBDIR CXX PKG_CONFIG MPIEXEC
set -euo pipefail
build=$1 config=$2 work=$3 libdir=$4 cxx=$5 pkg_config=$6 mpiexec=$7
here=$(cd "$(dirname "$0")" && pwd)
prefix=$work/prefix
fail() { echo "install: $*" >&2; exit 1; }

rm -rf "$work"
mkdir -p "$work"
cmake --install "$build" --config "$config" --prefix "$prefix" >"$work/install.log"

# The suite stays in the build tree.
if find "$prefix" -iname '*test*' | grep .; then
  fail "test files were installed"
fi
version=$("$mpiexec" -np 1 "$prefix/bin/ringcast" --version)
echo "installed: $version"
[[ $version == "ringcast "* ]] || fail "the installed ringcast --version printed '$version'"

cmake -S "$here/consumer" -B "$work/cmake-build" -DCMAKE_BUILD_TYPE="$config" -DCMAKE_CXX_COMPILER="$cxx" \
      -DCMAKE_PREFIX_PATH="$prefix" >"$work/configure.log"
found=$(sed -n 's/^ringcast_DIR:PATH=//p' "$work/cmake-build/CMakeCache.txt")
[[ $found == "$prefix"/* ]] || fail "find_package(ringcast) found $found, not the package under $prefix"
cmake --build "$work/cmake-build" >"$work/build.log"

flags=$(PKG_CONFIG_PATH="$prefix/$libdir/pkgconfig" "$pkg_config" --cflags --libs ringcast)
echo "pkg-config --cflags --libs ringcast: $flags"
# shellcheck disable=SC2086  # the flags are words
"$cxx" -o "$work/pkgconfig-consumer" "$here/consumer/main.cpp" $flags

run() { "$mpiexec" -np 2 --oversubscribe "$@"; }
from_cmake=$(run "$work/cmake-build/ringcast_consumer")
from_pkgconfig=$(run "$work/pkgconfig-consumer")
echo "find_package: $from_cmake"
echo "pkg-config:   $from_pkgconfig"
[[ $from_cmake == *" loss "* ]] || fail "the consumer printed no loss"
[[ $from_cmake == "$from_pkgconfig" ]] || fail "the two builds of the consumer disagree"
