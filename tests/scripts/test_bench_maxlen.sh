#!/usr/bin/env bash
# scripts/bench_maxlen.py: the search (doubling, then bisection to the resolution) against synthetic
# trials with a known memory limit, a time limit and no limit; the classification of a trial's end
# (out of memory, timeout, any other failure stops the script); and one end-to-end run of ringcast's
# exact mode on the CPU backend (tiny lengths, limited by --limit).
# Usage: test_bench_maxlen.sh RINGCAST SOURCE_DIR RESULTS_DIR
set -uo pipefail
ringcast=$1
src=$2
out=$3
mkdir -p "$out"
python3 - "$src/scripts" <<'PY' || exit 1
import sys, types
sys.path.insert(0, sys.argv[1])
import bench_maxlen as bm

args = types.SimpleNamespace(start=1024, resolution=256, limit=1 << 20, timeout=5)
memory = lambda n, a: "fits" if n <= 5000 else "memory"
slow = lambda n, a: "fits" if n <= 4096 else "time"
slow_bisect = lambda n, a: "fits" if n <= 4096 else ("memory" if n >= 8192 else "time")
cases = [(memory, (4864, "memory")), (slow, (4096, "time")), (slow_bisect, (4096, "time")),
         (lambda n, a: "fits", (1 << 20, "limit")), (lambda n, a: "memory", (0, "memory"))]
for run, want in cases:
    got = bm.longest(run, args)
    if got != want:
        sys.exit(f"FAIL: longest() gave {got}, expected {want}")
sh = lambda script: ["sh", "-c", script]
for cmd, want in [(sh("exit 0"), "fits"), (sh("echo 'CUDA out of memory' >&2; exit 1"), "memory"),
                  (sh("kill -9 $$"), "memory"), (sh("sleep 10"), "time")]:
    got = bm.trial(cmd, args)
    if got != want:
        sys.exit(f"FAIL: trial({cmd}) gave {got}, expected {want}")
try:
    bm.trial(sh("echo 'no such option' >&2; exit 2"), args)
    sys.exit("FAIL: a trial that failed for another reason than memory was not reported")
except SystemExit as e:
    if "another reason" not in str(e):
        raise
print("ok: search and trial outcomes")
PY
python3 "$src/scripts/bench_maxlen.py" --ringcast "$ringcast" --methods ringcast --start 256 --limit 1024 --heads 2 \
  --head-dim 64 --out "$out/maxlen.csv" || { echo "FAIL: bench_maxlen.py exited non-zero"; exit 1; }
python3 - "$out/maxlen.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if len(rows) != 1 or rows[0]["max_seq_len"] != "1024" or rows[0]["limited_by"] != "limit":
    sys.exit(f"FAIL: expected one ringcast row at 1024 (limit), got {rows}")
print("ok: end to end on the CPU backend")
PY
