#!/usr/bin/env bash
# The shipped CPU configs train: each runs as shipped on 2 ranks and its loss must fall -- the mean of
# the last tenth of the steps below FACTOR times the mean of the first tenth.
# Usage: test_configs.sh RINGCAST MPIEXEC CONFIG_DIR FACTOR NAME...
set -uo pipefail
rc=$1 mpiexec=$2 dir=$3 factor=$4
shift 4
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
for name in "$@"; do
  if ! "$mpiexec" -n 2 "$rc" train --config "$dir/$name.conf" --output csv "$tmp/$name.csv" >"$tmp/$name.log" 2>&1; then
    echo "FAIL: $name: train exited non-zero: $(tail -3 "$tmp/$name.log")"
    failures=$((failures + 1))
    continue
  fi
  python3 - "$tmp/$name.csv" "$factor" "$name" <<'PY' || failures=$((failures + 1))
import csv, sys
loss = [float(r["loss"]) for r in csv.DictReader(open(sys.argv[1]))]
k = max(1, len(loss) // 10)
first, last = sum(loss[:k]) / k, sum(loss[-k:]) / k
ok = last < float(sys.argv[2]) * first
print(f"{'ok' if ok else 'FAIL'}: {sys.argv[3]}: loss {first:.3f} -> {last:.3f} over {len(loss)} steps")
sys.exit(0 if ok else 1)
PY
done
exit $((failures > 0))
