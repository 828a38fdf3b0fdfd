#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, configure with CUDA on, build, run the whole test
# suite including the `gpu` tests (NCCL tests run 4 ranks on one GPU, each rank with its own
# NCCL_HOSTID), run `ringcast run` on 4 NCCL ranks, and run the attention benchmark beside PyTorch's
# baselines. Everything is logged to LOG_DIR (default build-gpu/gpu-check), one file per step, and a
# summary is printed last.
#   usage: scripts/gpu-check.sh [LOG_DIR]      env: CUDA_ARCH (default 90), JOBS, BENCH=quick|full|off
# Missing host libraries can travel as Debian packages in .gpu-deps/ (unpacked to /tmp/gpu-deps).
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-build-gpu/gpu-check}
mkdir -p "$log_dir"
build=build-gpu
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc)}
bench=${BENCH:-quick}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
summary=()
step() {  # step NAME COMMAND...: runs COMMAND, logs it, records ok/FAIL
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$log_dir/$name.log" 2>&1; then summary+=("ok    $name ($((SECONDS - t0)) s)")
  else summary+=("FAIL  $name ($((SECONDS - t0)) s): see $log_dir/$name.log"); tail -30 "$log_dir/$name.log"; fi
}

if [ -d .gpu-deps ] && ! ldconfig -p | grep -q libopenblas; then
  mkdir -p /tmp/gpu-deps
  for f in .gpu-deps/*.deb; do dpkg -x "$f" /tmp/gpu-deps; done
  export CMAKE_PREFIX_PATH=/tmp/gpu-deps/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
  export LD_LIBRARY_PATH=/tmp/gpu-deps/usr/lib/x86_64-linux-gnu:/tmp/gpu-deps/usr/lib/x86_64-linux-gnu/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export CPATH=/tmp/gpu-deps/usr/include/x86_64-linux-gnu/openblas-pthread:/tmp/gpu-deps/usr/include${CPATH:+:$CPATH}
fi

{ nvidia-smi; nvcc --version; mpirun --version; python3 -c 'import torch; print("torch", torch.__version__)'; } \
  >"$log_dir/environment.log" 2>&1
head -20 "$log_dir/environment.log"

step configure cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DRINGCAST_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch"
step build cmake --build "$build" -j"$jobs"
step ctest-cpu ctest --test-dir "$build" --output-on-failure -j4 -LE gpu --timeout 600
step ctest-gpu ctest --test-dir "$build" --output-on-failure -L gpu --timeout 600
step run-4-nccl-ranks mpirun -np 4 "$build/bin/ringcast" run --max-bytes 64M
if [ "$bench" != off ] && [ -f scripts/bench_attention.py ]; then
  step bench-attention python3 scripts/bench_attention.py --ringcast "$build/bin/ringcast" --out "$log_dir" \
    $([ "$bench" = quick ] && echo --quick)
fi

echo
echo "== gpu-check summary ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short=12 HEAD 2>/dev/null))"
grep -E "tests passed|tests failed" "$log_dir/ctest-cpu.log" "$log_dir/ctest-gpu.log" 2>/dev/null
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -q '^FAIL'
