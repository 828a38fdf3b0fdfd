#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, configure with CUDA on, build, run the whole test
# suite including the `gpu` tests (NCCL tests run 4 ranks on one GPU, each rank with its own
# NCCL_HOSTID), run `ringcast run` on 4 NCCL ranks, the scaling sweep (scripts/scaling.sh, quick size,
# ranks sharing the GPU), and the attention benchmark beside PyTorch's baselines. Everything is logged
# to LOG_DIR (default build-gpu/gpu-check), one file per step, and a summary is printed last.
#   usage: scripts/gpu-check.sh [LOG_DIR]
#   env: CUDA_ARCH (default 90), JOBS, BENCH=quick|full|off, PROFILE=1|0, CPU_TESTS=1|0 (CI runs those),
#        PHASES: a comma list of build, tests, checks, bench, scaling, model, maxlen, maxlen-sparse
#        (default: all but the two maxlen phases). One device call may run 10 minutes: run the phases
#        over several calls, e.g. PHASES=build,tests then PHASES=build,checks,bench,scaling then
#        PHASES=build,model, PHASES=build,maxlen (the build is incremental on a machine still warm;
#        build is always needed to find the binary).
# Dependencies the machine lacks travel as Debian packages in .gpu-deps/ (scripts/gpu-env.sh); a tree
# copied without .git names its commit in .git-commit (git rev-parse --short=12 HEAD > .git-commit).
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-build-gpu/gpu-check}
mkdir -p "$log_dir"
build=build-gpu
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc)}
bench=${BENCH:-quick}
phases=${PHASES:-build,tests,checks,bench,scaling,model}
summary=()
phase() { [[ ",$phases," == *",$1,"* ]]; }
step() {  # step NAME COMMAND...: runs COMMAND, logs it, records ok/FAIL
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$log_dir/$name.log" 2>&1; then summary+=("ok    $name ($((SECONDS - t0)) s)")
  else summary+=("FAIL  $name ($((SECONDS - t0)) s): see $log_dir/$name.log"); tail -30 "$log_dir/$name.log"; fi
}

source scripts/gpu-env.sh

{ nvidia-smi; nvcc --version; mpirun --version; python3 -c 'import torch; print("torch", torch.__version__)'; } \
  >"$log_dir/environment.log" 2>&1
head -20 "$log_dir/environment.log"

if phase build; then
  step configure cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DRINGCAST_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" "${CMAKE_ARGS[@]}"
  step build cmake --build "$build" -j"$jobs"
fi
if phase tests; then
  [ "${CPU_TESTS:-1}" = 1 ] && step ctest-cpu ctest --test-dir "$build" --output-on-failure -j4 -LE gpu --timeout 600
  # Three at a time: the GPU tests are small, so they share the device (and its 16 cores) well, and
  # the ~25 of them fit one 10-minute device call.
  step ctest-gpu ctest --test-dir "$build" --output-on-failure -j3 -L gpu --timeout 600
fi
if phase checks; then
  step comm-4-nccl-ranks mpirun -np 4 "$build/bin/ringcast" bench comm --max-bytes 64M
  for mode in ring ulysses allgather clustered; do
    step check-$mode-4-ranks mpirun -np 4 "$build/bin/ringcast" check --mode $mode --seq-len 8192 --heads 8 \
      --kv-heads 4 --head-dim 128
  done
  for mode in ring clustered; do
    step run-1-rank-64k-$mode "$build/bin/ringcast" run --mode $mode --seq-len 65536 --heads 16 --kv-heads 16 \
      --head-dim 128 --output csv "$log_dir/run-1-rank-64k-$mode.csv"
  done
fi
# Scaling sweep at a quick GPU size (under 2 minutes): 4 ranks share the one GPU through NCCL_HOSTID and
# sockets, so the times are "correct, slow" (the label says so on every plot), not a scaling result.
phase scaling && step scaling-4-ranks-shared-gpu scripts/scaling.sh --ringcast "$build/bin/ringcast" --out "$log_dir/scaling" \
  --max-ranks 4 --seq-len 16384 --tokens-per-rank 4096 --heads 8 --head-dim 128 --iters 3 --comm-max-bytes 16M \
  --machine configs/machines/8xh100-nvlink.conf --label "4 ranks share one GPU (NCCL_HOSTID, sockets): correct, slow"
if phase bench && command -v ncu >/dev/null && [ "${PROFILE:-1}" = 1 ]; then
  # Where the forward kernel's time goes (the timed launch after the small correctness check; clocks
  # as found): speed of light, occupancy, warp stalls.
  step profile-attention-fwd ncu --clock-control none --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section ComputeWorkloadAnalysis -k regex:attention_fwd --launch-skip 1 -c 1 \
    "$build/bin/ringcast" bench kernels --seq 16384 --heads 16 --pattern dense --warmup 0 --repeats 1
fi
if phase bench && [ "$bench" != off ] && [ -f scripts/bench_attention.py ]; then
  step bench-attention python3 scripts/bench_attention.py --ringcast "$build/bin/ringcast" --out "$log_dir" \
    $([ "$bench" = quick ] && echo --quick) --repeats 5
fi
# Selection (summaries, scoring + top-k, block table) beside the attention over the table it builds,
# PERFORMANCE.md's bar being 25% of it: 1M tokens, 8 heads, per tile; 64K tokens, 64 / 4 heads, per row.
bench_selection() {
  "$build/bin/ringcast" bench kernels --pattern selection-tile --seq 1048576 --heads 8 --kv-heads 8 --k 16 \
    --repeats 5 &&
    "$build/bin/ringcast" bench kernels --pattern selection-row --seq 65536 --heads 64 --kv-heads 4 --k 16 --repeats 5
}
phase bench && [ "$bench" != off ] && step bench-selection bench_selection
# The pipelines an RTX 4090 runs (shared memory capped at its 99 KB per block: d = 128 forward 2 stages,
# backward 1) beside this GPU's own, same shape, forward + backward: what the shallower pipelines cost.
bench_4090_pipelines() {
  local args=(bench kernels --seq 65536 --heads 16 --pattern dense-causal --backward --repeats 5)
  "$build/bin/ringcast" "${args[@]}" && RINGCAST_CUDA_SMEM_LIMIT=101376 "$build/bin/ringcast" "${args[@]}"
}
phase bench && [ "$bench" != off ] && step bench-4090-pipelines bench_4090_pipelines
# The model at 64K-1M tokens (D 1024, 8 layers, 16 heads) and each seed option beside the plain stack
# (issues 6 and 7): step time, tokens/s, peak memory; one GPU, one rank.
phase model && step bench-model scripts/bench_model.sh --ringcast "$build/bin/ringcast" --out "$log_dir/model" \
  $([ "$bench" = quick ] && echo --quick)
# The unified-view paper's "40x": the longest layer one GPU runs, plain materialized attention vs ours.
# Exact mode: trials past 200 s stop the search (1M tokens takes about 3 minutes), so the phase fits one
# 10-minute device call and the row says "at least"; maxlen-sparse: the clustered mode to its memory limit.
phase maxlen && step bench-maxlen python3 scripts/bench_maxlen.py --ringcast "$build/bin/ringcast" \
  --timeout 200 --out "$log_dir/maxlen.csv"
phase maxlen-sparse && step bench-maxlen-sparse python3 scripts/bench_maxlen.py --ringcast "$build/bin/ringcast" \
  --mode clustered --methods ringcast --start 1048576 --resolution 262144 --timeout 240 \
  --out "$log_dir/maxlen-clustered.csv"

echo
echo "== gpu-check summary ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short=12 HEAD 2>/dev/null || cat .git-commit 2>/dev/null))"
grep -E "tests passed|tests failed" "$log_dir/ctest-cpu.log" "$log_dir/ctest-gpu.log" 2>/dev/null
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -q '^FAIL'
