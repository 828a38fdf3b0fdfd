#!/usr/bin/env bash
# scripts/bench_model.sh --tiny end to end on the CPU backend (2 ranks): every model-level run (the
# plain stack, with row and with tile selection, and each seed option) trains, and model.csv holds one row per run with a positive step
# time, tokens/s and peak memory and a finite loss.
# Usage: test_bench_model.sh RINGCAST SOURCE_DIR RESULTS_DIR
set -uo pipefail
ringcast=$1
src=$2
out=$3
source "$(dirname "$0")/python.sh"
rm -rf "$out"
MPIRUN_ARGS=--oversubscribe PYTHON=$python bash "$src/scripts/bench_model.sh" --tiny --backend cpu --ranks 2 \
  --ringcast "$ringcast" --out "$out" || { echo "FAIL: bench_model.sh exited non-zero"; exit 1; }
"$python" - "$out/model.csv" <<'PY'
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
want = {("scale", "plain"), ("scale", "tile-selection"), ("seed", "plain"), ("seed", "colt5"), ("seed", "vcc"), ("seed", "pyramidion"),
        ("seed", "cast")}
got = {(r["experiment"], r["option"]) for r in rows}
bad = [r for r in rows if r["status"] != "ok" or float(r["step_ms"]) <= 0 or float(r["tokens_per_s"]) <= 0
       or int(r["peak_memory_bytes"]) <= 0 or not math.isfinite(float(r["loss"]))]
if len(rows) != 8 or got != want or bad:
    sys.exit(f"FAIL: {len(rows)} rows, missing {sorted(want - got)}, bad {bad}")
print(f"ok: {len(rows)} model runs")
PY
