#!/usr/bin/env bash
# Scaling experiments for one attention layer (forward + backward) with mpirun: strong scaling (fixed
# n, P = 1, 2, 4, ... up to --max-ranks) and weak scaling (fixed n/P), for each of --modes. Writes a
# results folder: raw/ (one `ringcast bench layer` CSV and log per run, `bench comm` per P), strong.csv,
# weak.csv, comm.csv, environment.txt, commands.txt, model.csv (scripts/perf_model.py against these
# measurements, when a machine file applies) and PNG plots (scripts/scaling_plots.py). docs/scaling.md
# explains the columns and plots. A mode the build cannot run ("not supported", e.g. a head dim the
# CUDA kernels lack) is skipped with a note in notes.txt; any other failure fails the script.
#   usage: scripts/scaling.sh [options]        (scripts/scaling.sh --help)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  cat <<'EOF'
usage: scripts/scaling.sh [options]
  --ringcast PATH        the executable (default: build/bin/ringcast)
  --out DIR              results folder (default: results/scaling-YYYYMMDD-HHMMSS)
  --max-ranks P          P = 1, 2, 4, ... up to P, and P itself (default: the GPUs found, else 4)
  --modes LIST           attention modes (default: ring,clustered)
  --experiments LIST     strong, weak or both (default: strong,weak)
  --seq-len N            strong scaling: the fixed sequence length (default: 65536)
  --tokens-per-rank M    weak scaling: n = M * P (default: 16384)
  --heads H              query heads (default: 16)
  --kv-heads K           KV heads (default: = heads)
  --head-dim D           head dim, 64 or 128 (default: 128)
  --warmup W             untimed passes per configuration (default: 1)
  --iters I              timed passes per configuration, each rank's median (default: 5)
  --layer-args "ARGS"    more `ringcast bench layer` options for every run (e.g. clustered budgets)
  --comm-max-bytes SIZE  largest message of the `bench comm` runs (default: 64M)
  --verify               also measure the error against the single-rank reference (small n only)
  --machine FILE         machine description for the model (default: configs/machines/cpu-local.conf on
                         the CPU backend; none on GPUs)
  --label TEXT           a note for environment.txt and the plot titles (e.g. "ranks share one GPU")
  --oversubscribe        let mpirun start more ranks than cores
  --tiny                 CPU sizes for CI (n = 2048 strong, 512 per rank weak, h = 2, d = 64, small
                         clustered blocks with per-tile selection as --layer-args, 3 timed passes):
                         seconds per run; the other options override these
  env: MPIRUN (default mpirun), MPIRUN_ARGS (extra launcher options, e.g. a hostfile), PYTHON,
       OMP_NUM_THREADS (default 1 per rank on the CPU backend)
EOF
}

ringcast=$repo/build/bin/ringcast
out=""
max_ranks=""
modes=ring,clustered
experiments=strong,weak
seq_len=65536
per_rank=16384
heads=16
kv_heads=""
head_dim=128
warmup=1
iters=5
comm_max=64M
comm_iters=10
layer_args=""
verify=""
machine=""
label=""
oversubscribe=""
for arg in "$@"; do
  if [ "$arg" = --tiny ]; then
    # Small enough for 2 cores in CI; clustered blocks of 256 keys (pages of 32) so that 4 ranks hold
    # whole blocks of a 2048-token sequence. Per-tile selection: with per-row selection (the causal
    # default) the later ranks' tiles compute larger unions of pages, an imbalance the model does not
    # see (docs/scaling.md, "How far off it is"). Options given beside --tiny override these.
    seq_len=2048 per_rank=512 heads=2 head_dim=64 iters=3 comm_max=4M comm_iters=5
    layer_args="--page-size 32 --coarse-pages 8 --top-k 8 --coarse-k 2 --remote-blocks 2 --selection tile"
  fi
done
while [ $# -gt 0 ]; do
  case $1 in
    --ringcast) ringcast=$2; shift ;;
    --out) out=$2; shift ;;
    --max-ranks) max_ranks=$2; shift ;;
    --modes) modes=$2; shift ;;
    --experiments) experiments=$2; shift ;;
    --seq-len) seq_len=$2; shift ;;
    --tokens-per-rank) per_rank=$2; shift ;;
    --heads) heads=$2; shift ;;
    --kv-heads) kv_heads=$2; shift ;;
    --head-dim) head_dim=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --iters) iters=$2; shift ;;
    --layer-args) layer_args=$2; shift ;;
    --comm-max-bytes) comm_max=$2; shift ;;
    --verify) verify=--verify ;;
    --machine) machine=$2; shift ;;
    --label) label=$2; shift ;;
    --oversubscribe) oversubscribe=--oversubscribe ;;
    --tiny) ;;  # read above
    -h|--help) usage; exit 0 ;;
    *) echo "scaling.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
kv_heads=${kv_heads:-$heads}
[ -x "$ringcast" ] || { echo "scaling.sh: no ringcast at $ringcast (build it, or pass --ringcast)" >&2; exit 2; }

# A Python with matplotlib: $PYTHON, else python3, else the system one (install-deps.sh installs
# python3-matplotlib there; a pyenv or venv python3 may shadow it).
python=""
for py in ${PYTHON:-} python3 /usr/bin/python3; do
  "$py" -c "import matplotlib" 2>/dev/null && { python=$py; break; }
done
[ -n "$python" ] || { echo "scaling.sh: no python3 with matplotlib (scripts/install-deps.sh installs it)" >&2; exit 2; }

gpus=0
command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
max_ranks=${max_ranks:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 4)}
ranks=()
for ((p = 1; p <= max_ranks; p *= 2)); do ranks+=("$p"); done
[ "${ranks[-1]}" = "$max_ranks" ] || ranks+=("$max_ranks")
out=${out:-results/scaling-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/raw" || exit 2
rm -f "$out"/raw/*.csv "$out"/raw/*.log "$out"/*.png "$out"/*.csv "$out/notes.txt" "$out/commands.txt"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# CPU backend: a rank waiting on a peer yields its core instead of spinning in Open MPI, since that
# peer (or other work on a shared machine) may need the core to reach the message.
[ "$gpus" = 0 ] && export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
mpirun_cmd=(${MPIRUN:-mpirun})
[ "$(id -u)" = 0 ] && "${mpirun_cmd[0]}" --version 2>/dev/null | grep -q "Open MPI" && mpirun_cmd+=(--allow-run-as-root)
[ -n "$oversubscribe" ] && mpirun_cmd+=("$oversubscribe")
read -r -a extra_launch <<<"${MPIRUN_ARGS:-}"
read -r -a extra_layer <<<"$layer_args"
if [ "$gpus" -gt 0 ] && [ "$max_ranks" -gt "$gpus" ]; then
  note="$max_ranks ranks on $gpus GPU(s): ranks share a GPU (NCCL_HOSTID per rank), times are correct but slow"
  echo "scaling.sh: note: $note" | tee -a "$out/notes.txt"
  label=${label:-$note}
fi

{
  echo "# scaling.sh environment, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "label: ${label:-none}"
  echo "host: $(hostname)"
  commit=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || cat "$repo/.git-commit" 2>/dev/null)
  echo "commit: ${commit:-unknown}"
  echo "ringcast: $("$ringcast" --version 2>&1 | head -1)"
  echo "ranks: ${ranks[*]}; modes: $modes; experiments: $experiments; strong n = $seq_len; weak n/P = $per_rank"
  echo "shape: h = $heads, h_kv = $kv_heads, d = $head_dim; warmup $warmup, iters $iters"
  echo "layer args: ${layer_args:-none}"
  echo "launcher: ${mpirun_cmd[*]} ${MPIRUN_ARGS:-}"
  echo; echo "## uname"; uname -a
  echo; echo "## environment variables (NCCL_*, OMPI_*, RINGCAST_*, OMP_*, CUDA_VISIBLE_DEVICES)"
  env | grep -E '^(NCCL_|OMPI_|RINGCAST_|OMP_|OPENBLAS_|CUDA_VISIBLE_DEVICES)' | sort
  echo; echo "## mpirun --version"; "${mpirun_cmd[0]}" --version 2>&1 | head -3
  if [ "$gpus" -gt 0 ]; then
    echo; echo "## nvidia-smi"; nvidia-smi
    echo; echo "## nvidia-smi topo -m"; nvidia-smi topo -m
    echo; echo "## nvcc --version"; nvcc --version 2>&1 | tail -2
  fi
  echo; echo "## /dev/shm (NCCL's SHM transport needs room here)"; df -h /dev/shm 2>&1 | tail -1
  echo; echo "## lscpu"; lscpu
  echo; echo "## memory"; free -g 2>/dev/null
} >"$out/environment.txt" 2>&1
# Percent of all cores busy over one second, while nothing of this script runs: other work on the
# machine, which slows the timings (recorded before and after the sweep).
other_work() {
  local a b
  read -r -a a </proc/stat
  sleep 1
  read -r -a b </proc/stat
  awk -v a="${a[*]}" -v b="${b[*]}" 'BEGIN { split(a, x); split(b, y); t = 0
    for (i = 2; i <= 9; i++) t += y[i] - x[i]
    idle = y[5] - x[5] + y[6] - x[6]; printf "%.0f", (t > 0 ? 100 * (t - idle) / t : 0) }'
}
# What the model needs to know about the run (perf_model.py reads it).
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc counts OMP_NUM_THREADS otherwise
busy_before=$(other_work)
{
  echo "gpus = $gpus"
  echo "cores = $cores"
  echo "omp_threads = $OMP_NUM_THREADS"
  # Independent compute units the ranks run on: GPUs, or cores / threads per rank.
  echo "compute_units = $([ "$gpus" -gt 0 ] && echo "$gpus" ||
    echo $((cores > OMP_NUM_THREADS ? cores / OMP_NUM_THREADS : 1)))"
  echo "layer_args = $layer_args"
  echo "label = $label"
  echo "other_work_before_pct = $busy_before"
} >"$out/run.conf"

failed=0
launch() {  # launch NAME P ARGS...: one mpirun, logged; returns its status
  local name=$1 np=$2; shift 2
  local cmd=("${mpirun_cmd[@]}" -np "$np" "${extra_launch[@]}" "$ringcast" "$@")
  echo "${cmd[*]}" >>"$out/commands.txt"
  "${cmd[@]}" >"$out/raw/$name.log" 2>&1
}

t_start=$SECONDS
for p in "${ranks[@]}"; do
  if [ "$p" -gt 1 ]; then
    # The links as the model sees them: nccl-tests columns per size, at this P.
    launch "comm-np$p" "$p" bench comm --min-bytes 8 --max-bytes "$comm_max" --factor 4 --warmup 3 \
      --iters "$comm_iters" --output csv "$out/raw/comm-np$p.csv" ||
      { echo "scaling.sh: bench comm on $p ranks failed: see $out/raw/comm-np$p.log" >&2; failed=1; }
  fi
  for exp in ${experiments//,/ }; do
    case $exp in
      strong) n=$seq_len ;;
      weak) n=$((per_rank * p)) ;;
      *) echo "scaling.sh: unknown experiment '$exp' (strong, weak)" >&2; exit 2 ;;
    esac
    for mode in ${modes//,/ }; do
      name=$exp-$mode-np$p
      echo "scaling.sh: [$((SECONDS - t_start)) s] $exp scaling, $mode, P = $p, n = $n" >&2
      if ! launch "$name" "$p" bench layer --modes "$mode" --seq-lens "$n" --heads "$heads" --kv-heads "$kv_heads" \
        --head-dims "$head_dim" --warmup "$warmup" --iters "$iters" $verify "${extra_layer[@]}" \
        --output csv "$out/raw/$name.csv"; then
        rm -f "$out/raw/$name.csv"
        if grep -q "not supported" "$out/raw/$name.log"; then
          echo "scaling.sh: note: $mode skipped on $p rank(s): $(grep -m1 "not supported" \
            "$out/raw/$name.log")" | tee -a "$out/notes.txt" >&2
        else
          echo "scaling.sh: $name failed: see $out/raw/$name.log" >&2
          tail -5 "$out/raw/$name.log" >&2
          failed=1
        fi
      fi
    done
  done
done

busy_after=$(other_work)
echo "other_work_after_pct = $busy_after" >>"$out/run.conf"
echo "other work kept $busy_before% of the cores busy before the sweep, $busy_after% after" >>"$out/environment.txt"
[ "$busy_before" -gt 25 ] || [ "$busy_after" -gt 25 ] &&
  echo "scaling.sh: note: other work kept $busy_before% / $busy_after% of the cores busy before / after the sweep:" \
    "timings are slower and noisier than the machine's" | tee -a "$out/notes.txt" >&2

# The model, against these measurements: rates from the 1-rank rows, links from the comm rows.
"$python" "$repo/scripts/scaling_plots.py" merge "$out" || failed=1
if [ -z "$machine" ] && [ "$gpus" = 0 ]; then machine=$repo/configs/machines/cpu-local.conf; fi
if [ -n "$machine" ]; then
  "$python" "$repo/scripts/perf_model.py" validate "$out" --machine "$machine" --ringcast "$ringcast" ||
    { echo "scaling.sh: the performance model failed" >&2; failed=1; }
fi
"$python" "$repo/scripts/scaling_plots.py" plot "$out" || failed=1
echo "scaling.sh: results in $out ($((SECONDS - t_start)) s)$([ $failed = 1 ] && echo ', with failures')" >&2
exit $failed
