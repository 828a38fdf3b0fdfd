#!/usr/bin/env bash
# Installs ringcast's build and test dependencies from Debian packages: CMake, a C++20 compiler,
# Open MPI, Boost.Program_options, fmt, GoogleTest, OpenBLAS, and Python with numpy/matplotlib for the
# scripts. Idempotent: when everything is present it does nothing (no apt-get update, no network).
# The CUDA toolkit and NCCL are not Debian packages here: install them from NVIDIA to build the GPU
# backend (CMake finds them in /usr/local/cuda).
set -euo pipefail

packages=(cmake g++ make pkg-config git openmpi-bin libopenmpi-dev libboost-program-options-dev libfmt-dev
          libgtest-dev libgmock-dev libopenblas-dev python3 python3-numpy python3-matplotlib)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
