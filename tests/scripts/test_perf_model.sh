#!/usr/bin/env bash
# scripts/perf_model.py: every shipped machine file predicts (strong and weak scaling of each mode,
# with the properties any prediction must have), and the model predicts the --tiny sweep of
# test_scaling.sh from that sweep's own 1-rank rates and `bench comm` rows within a factor of 2.5
# either way (docs/scaling.md: the observed error, and why 2.5). A burst of other work on a shared
# machine can slow a whole run of a few hundred milliseconds, so a miss is measured again with a fresh
# sweep. Two misses fail the test, unless other work kept more than a quarter of the cores busy around
# the second sweep (scaling.sh records it): then the timings test the machine's load, not the model,
# and the test reports itself skipped (77) with the tables above.
# Usage: test_perf_model.sh RINGCAST SOURCE_DIR RESULTS_DIR
set -uo pipefail
ringcast=$1
src=$2
results=$3
source "$(dirname "$0")/python.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

for machine in "$src"/configs/machines/*.conf; do
  name=$(basename "$machine" .conf)
  "$python" "$src/scripts/perf_model.py" predict --machine "$machine" --ringcast "$ringcast" --modes ring,clustered \
    --seq-len 65536 --ranks 1,2,4 --output "$tmp/$name.csv" >"$tmp/$name.log" 2>&1 ||
    { fail "$name: predict failed"; cat "$tmp/$name.log"; continue; }
  "$python" - "$tmp/$name.csv" <<'PY' || fail "$name: predictions"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert len(rows) == 6, len(rows)
for r in rows:
    t, fwd, comp, exposed = (float(r[c]) for c in ("fwd_bwd_ms", "fwd_ms", "compute_ms", "exposed_comm_ms"))
    assert 0 < fwd < t and 0 < comp <= t and exposed >= 0 and abs(t - comp - exposed) <= 1e-9 * t, r
    assert 0 < float(r["efficiency"]) <= 1 + 1e-12, r
    assert (float(r["bytes_sent_per_rank"]) == 0) == (r["ranks"] == "1"), r
PY
done

validate() {
  "$python" "$src/scripts/perf_model.py" validate "$1" --machine "$src/configs/machines/cpu-local.conf" \
    --ringcast "$ringcast" --tolerance 2.5
}
if ! validate "$results"; then
  echo "the model missed the sweep of test_scaling.sh by more than 2.5x; measuring again"
  PYTHON=$python bash "$src/scripts/scaling.sh" --tiny --oversubscribe --max-ranks 4 --ringcast "$ringcast" \
    --out "$tmp/again" >"$tmp/again.log" 2>&1 || { cat "$tmp/again.log"; fail "scaling.sh (second sweep) failed"; }
  if ! validate "$tmp/again"; then
    busy=$(grep -h "^other_work_" "$tmp/again/run.conf" | sed 's/.*= //' | sort -n | tail -1)
    if [ "${busy:-0}" -gt 25 ]; then
      echo "SKIPPED: other work kept ${busy}% of the cores busy around the sweep; the timings cannot test the model"
      [ "$failures" -eq 0 ] && exit 77
    fi
    fail "model vs two --tiny sweeps: off by more than 2.5x both times (tables above)"
  fi
fi
[ "$failures" -eq 0 ] && echo "perf_model.py: machine files predict; the model is within 2.5x of the sweep"
exit $((failures > 0))
