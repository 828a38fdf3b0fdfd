#!/usr/bin/env bash
# The shipped CPU configs train: each runs as shipped on 2 ranks and its loss must fall -- the mean of
# the last tenth of the steps below FACTOR times the mean of the first tenth.
# Usage: test_configs.sh RINGCAST MPIEXEC CONFIG_DIR FACTOR NAME...
# With --plan, the shipped GPU configs fit: each config's comment names its `ringcast plan --model`
# command; run as written it must accept the config, report that it fits, and print the verdict line
# the comment quotes (so the pasted estimate stays the current one).
# Usage: test_configs.sh --plan RINGCAST CONFIG_DIR NAME...
set -uo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

if [ "$1" = "--plan" ]; then
  rc=$2 dir=$3
  shift 3
  for name in "$@"; do
    conf="$dir/$name.conf"
    args=$(grep -o 'ringcast plan --model [^`]*' "$conf" | head -1 | sed -e 's/^ringcast plan //' -e "s|configs/$name.conf|$conf|")
    if [ -z "$args" ]; then
      echo "FAIL: $name: its comment names no \`ringcast plan --model\` command"
      failures=$((failures + 1))
      continue
    fi
    # shellcheck disable=SC2086  # the comment's arguments, word-split as a shell would
    if ! "$rc" plan $args >"$tmp/$name.out" 2>&1; then
      echo "FAIL: $name: plan --model exited non-zero: $(tail -3 "$tmp/$name.out")"
      failures=$((failures + 1))
      continue
    fi
    verdict=$(grep '^per rank: ' "$tmp/$name.out")
    if ! grep -q ': fits (' <<<"$verdict"; then
      echo "FAIL: $name: $verdict"
      failures=$((failures + 1))
    elif ! grep -qF "#   $verdict" "$conf"; then
      echo "FAIL: $name: the comment's estimate is stale; plan now says: $verdict"
      failures=$((failures + 1))
    else
      echo "ok: $name: $verdict"
    fi
  done
  exit $((failures > 0))
fi

rc=$1 mpiexec=$2 dir=$3 factor=$4
shift 4
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
