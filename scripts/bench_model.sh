#!/usr/bin/env bash
# Model-level measurements (issues 6 and 7): short `ringcast train` runs -- a few steps, the first one
# warm-up -- of the full stack and of each seed method, recording the median step time and the
# communication it waited for, tokens/s, peak memory and the last loss per run in OUT/model.csv (the
# raw per-step CSVs and logs in OUT/raw/). A run that fails (out of memory, an option the backend
# lacks) is a row with its status, not an abort.
#   scale: decoder, D 1024, 8 layers, 16 heads of 64, clustered attention, needle task, at 64K, 256K
#          and 1M tokens (PERFORMANCE.md: "full model training step at 1M tokens on one 80 GB GPU"),
#          and the longest once more with tile instead of row selection;
#   seed:  the same model as an encoder with each seed option beside its plain twin, at 64K tokens:
#          prefix retrieval plain / CoLT5 / VCC, ListOps plain / Pyramidion (to n/4) / CAST.
#   usage: scripts/bench_model.sh --ringcast BIN --out DIR [--ranks P] [--quick] [--backend cuda|cpu]
#          --quick: scale at 64K only, seed at 16K; --tiny: CPU sizes that finish in seconds (the CI check:
#          coarse blocks of 256 keys, so that the 256-key causal window fits one block).
#   env: MPIRUN (default mpirun), MPIRUN_ARGS (extra launcher options), PYTHON (default python3)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
ringcast="" out="" ranks=1 backend=cuda quick=0 tiny=0
while [ $# -gt 0 ]; do
  case $1 in
    --ringcast) ringcast=$2; shift ;;
    --out) out=$2; shift ;;
    --ranks) ranks=$2; shift ;;
    --backend) backend=$2; shift ;;
    --quick) quick=1 ;;
    --tiny) tiny=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench_model.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$ringcast" ] && [ -n "$out" ] || { echo "bench_model.sh: --ringcast and --out are required" >&2; exit 2; }
mkdir -p "$out/raw"
mpirun=${MPIRUN:-mpirun}
python=${PYTHON:-python3}
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if [ "$tiny" = 1 ]; then
  model="--dim 64 --layers 2 --heads 4 --kv-heads 4 --head-dim 64 --ffn-hidden 128"
  blocks="--page-size 32 --coarse-pages 8 --top-k 4 --coarse-k 2 --remote-blocks 2"
  scale_lens="1024" seed_len=1024 steps=3 pooled=2
else
  model="--dim 1024 --layers 8 --heads 16 --kv-heads 16 --head-dim 64 --ffn-hidden 2816"
  blocks=""
  scale_lens="65536 262144 1048576" seed_len=65536 steps=4 pooled=4
  [ "$quick" = 1 ] && scale_lens="65536" seed_len=16384
fi
common="--batch 1 --steps $steps --warmup-steps 1 --log-every 1 --eval-every 1000000 --backend $backend"

echo "experiment,option,task,seq_len,ranks,status,step_ms,exposed_comm_ms,tokens_per_s,peak_memory_bytes,loss" >"$out/model.csv"
run() {  # run EXPERIMENT OPTION TASK SEQ_LEN ARGS...
  local experiment=$1 option=$2 task=$3 n=$4; shift 4
  local name="$experiment-$option-$task-$n-p$ranks"
  echo "bench_model.sh: $name" >&2
  # shellcheck disable=SC2086 # word splitting of the option strings is intended
  $mpirun -np "$ranks" ${MPIRUN_ARGS:-} "$ringcast" train --task "$task" --seq-len "$n" $model $common "$@" \
    --output csv "$out/raw/$name.csv" >"$out/raw/$name.log" 2>&1
  local rc=$?
  "$python" - "$out/raw/$name.csv" "$out/raw/$name.log" "$rc" "$experiment,$option,$task,$n,$ranks" \
    >>"$out/model.csv" <<'EOF'
import csv, statistics, sys
path, log, rc, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = []
try:
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()]
except OSError:
    pass
timed = rows[1:] or rows  # the first step is warm-up
if rc != 0 or not rows:
    lines = [l.strip() for l in open(log, errors="replace") if l.strip()]
    why = next((l for l in lines if "rror" in l or "memory" in l), lines[-1] if lines else "no output")
    print(f"{prefix},failed: {why[:160].replace(',', ';')},,,,,")
else:
    med = lambda key: statistics.median(float(r[key]) for r in timed)
    peak = max(int(float(r["peak_memory_bytes"])) for r in rows)
    print(f"{prefix},ok,{med('step_ms'):.1f},{med('exposed_comm_ms'):.1f},{med('tokens_per_s'):.0f},{peak},"
          f"{float(rows[-1]['loss']):.4f}")
EOF
}

for n in $scale_lens; do
  run scale plain needle "$n" --mode clustered $blocks
done
# The longest again with tile selection: per-row selection (the causal default) builds each tile's
# union of its rows' choices, which the memory estimate does not bound (docs/launching.md).
run scale tile-selection needle "${scale_lens##* }" --mode clustered --selection tile $blocks
n=$seed_len
run seed plain prefix-recall "$n" --mode clustered $blocks
run seed colt5 prefix-recall "$n" --mode clustered $blocks --colt5 true
run seed vcc prefix-recall "$n" --mode clustered $blocks --vcc true
run seed plain listops "$n" --mode clustered $blocks
run seed pyramidion listops "$n" --mode clustered $blocks --pool-after 0 --pool-to $((n / pooled))
run seed cast listops "$n" --mode clustered $blocks --clusters surrogate

column -s, -t <"$out/model.csv"
! grep -q ',failed' "$out/model.csv"
