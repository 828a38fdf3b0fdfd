#!/usr/bin/env bash
# End-to-end checks of the `ringcast` executable: help, version, usage errors (exit 2 on every rank,
# never a hang), `run` on 1, 2 and 4 ranks with JSON and CSV output, --config with command-line
# override, `check --dump` (files and the coverage invariant), and short `train` runs.
# Usage: test_cli.sh RINGCAST MPIEXEC
set -uo pipefail
rc=$1
mpiexec=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
expect_code() {  # expect_code CODE DESCRIPTION COMMAND...
  local want=$1 what=$2; shift 2
  timeout 120 "$@" >"$tmp/out" 2>"$tmp/err"
  local got=$?
  [ "$got" -eq "$want" ] || fail "$what: exit $got, expected $want; stderr: $(tail -3 "$tmp/err")"
}

expect_code 0 "--help" "$rc" --help
for c in run train bench plan check; do grep -qw "$c" "$tmp/out" || fail "--help does not list $c"; done
expect_code 0 "--version" "$rc" --version
grep -q "^ringcast " "$tmp/out" || fail "--version prints no version"
expect_code 0 "run --help" "$rc" run --help
grep -q -- "--mode" "$tmp/out" || fail "run --help does not list --mode"

# Usage errors: a clear message once (rank 0), exit 2 from every rank, no hang.
expect_code 2 "unknown option" "$mpiexec" -n 2 "$rc" --no-such-option
[ "$(grep -c "unknown option '--no-such-option'" "$tmp/err")" -eq 1 ] || fail "unknown option: message not printed exactly once"
expect_code 2 "unknown command" "$mpiexec" -n 2 "$rc" frobnicate
expect_code 2 "bad run option" "$mpiexec" -n 4 "$rc" run --no-such-option
grep -q "unrecognised option\|unrecognized option" "$tmp/err" || fail "bad run option: no message"
expect_code 2 "bad size" "$mpiexec" -n 2 "$rc" bench comm --max-bytes 12Q
expect_code 2 "uneven sequence" "$mpiexec" -n 4 "$rc" run --seq-len 1001
[ "$(grep -c "does not divide evenly over 4 ranks" "$tmp/err")" -eq 1 ] || fail "uneven sequence: message not printed once"
expect_code 2 "unknown mode" "$mpiexec" -n 2 "$rc" run --mode dense
expect_code 2 "bad output format" "$rc" run --output yaml
expect_code 2 "missing config" "$rc" run --config "$tmp/missing.conf"

# The main job (one attention layer) and the communication test on 1, 2 and 4 ranks.
for np in 1 2 4; do
  for mode in ring ulysses allgather; do
    expect_code 0 "run --mode $mode on $np ranks" "$mpiexec" -n "$np" "$rc" run --mode "$mode" --seq-len 512 \
      --heads 4 --kv-heads 4 --head-dim 64 --warmup 0 --iters 1 --output json
    python3 - "$tmp/out" "$mode" "$np" <<'PY' || fail "run --mode $mode on $np ranks: bad JSON"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["mode"] == sys.argv[2] and r["ranks"] == int(sys.argv[3]), r
assert r["fwd_ms_max"] > 0 and r["fwd_bwd_ms_max"] >= r["fwd_ms_max"] and r["peak_memory_bytes"] > 0, r
assert r["bytes_sent_fwd"] == r["plan_bytes_sent_fwd"] and r["bytes_sent_bwd"] == r["plan_bytes_sent_bwd"], r
PY
  done
  expect_code 0 "bench comm on $np ranks" "$mpiexec" -n "$np" "$rc" bench comm --max-bytes 64K --iters 2 --output json
  python3 - "$tmp/out" <<'PY' || fail "bench comm on $np ranks: bad JSON rows"
import json, sys
rows = json.load(open(sys.argv[1]))
assert isinstance(rows, list) and rows, "no rows"
assert {r["op"] for r in rows} == {"ring", "allgather", "alltoall"}, rows
assert all(r["wrong"] == 0 and r["time_us"] > 0 and r["busbw_GBps"] >= 0 for r in rows), rows
PY
done

# Config file, overridden on the command line; CSV to a file.
printf 'ops = alltoall\nmax-bytes = 4K\niters = 1\n' >"$tmp/bench.conf"
expect_code 0 "bench comm --config" "$mpiexec" -n 2 "$rc" bench comm --config "$tmp/bench.conf" --ops ring \
  --output csv "$tmp/rows.csv"
head -1 "$tmp/rows.csv" | grep -q "^op,size_B,count,type,time_us,algbw_GBps,busbw_GBps,wrong$" || fail "CSV header"
[ "$(cut -d, -f1 "$tmp/rows.csv" | sort -u | grep -v op)" = ring ] || fail "--ops on the command line did not override the config"
[ "$(wc -l <"$tmp/rows.csv")" -eq 3 ] || fail "expected 2 CSV rows (1K, 4K) from max-bytes in the config"

# A rank that dies mid-run: the job ends (non-zero) instead of leaving the others waiting.
"$mpiexec" -n 2 "$rc" bench comm --ops ring --min-bytes 4 --max-bytes 4 --warmup 0 --iters 200000000 \
  >"$tmp/long.out" 2>&1 &
launcher=$!
victim=""
for _ in $(seq 100); do
  victim=$(pgrep -P "$launcher" -x ringcast | tail -1)
  [ -n "$victim" ] && break
  sleep 0.1
done
if [ -z "$victim" ]; then
  fail "rank death: no ringcast process under mpiexec"
  kill "$launcher" 2>/dev/null
else
  sleep 1
  kill -9 "$victim"
  for _ in $(seq 600); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$launcher" 2>/dev/null; then
    fail "rank death: the job still runs 60 s after a rank was killed"
    kill -9 "$launcher" 2>/dev/null
  else
    wait "$launcher"; code=$?
    [ "$code" -ne 0 ] || fail "rank death: the job exited 0"
  fi
fi

# check --dump: every rank's files with the documented shapes, and the coverage invariant (DESIGN.md
# §4.1) from the entries: each key a row may see counted exactly once, nothing else.
expect_code 0 "check --dump" "$mpiexec" -n 2 "$rc" check --mode clustered --seq-len 4096 --heads 4 --kv-heads 2 \
  --head-dim 64 --dump "$tmp/dump"
numpy_python=""
for py in python3 /usr/bin/python3; do "$py" -c "import numpy" 2>/dev/null && { numpy_python=$py; break; }; done
[ -n "$numpy_python" ] || fail "check --dump: no python3 with numpy to read the dump"
"${numpy_python:-python3}" - "$tmp/dump" <<'PY' || fail "check --dump: bad files or coverage"
import os, sys
import numpy as np
d, P, B, n, h, g, hd = sys.argv[1], 2, 1, 4096, 4, 2, 64
n_loc, ps, bk = n // P, 64, 1024
assert os.path.getsize(os.path.join(d, "README.txt")) > 0
for r in range(P):
    f = lambda name: np.load(os.path.join(d, f"rank{r}_{name}.npy"))
    pos = f("positions")
    assert pos.dtype == np.int32 and (pos == np.arange(r * n_loc, (r + 1) * n_loc)).all()
    for name, shape in [("q", (B, n_loc, h, hd)), ("d_o", (B, n_loc, h, hd)), ("o", (B, n_loc, h, hd)),
                        ("d_q", (B, n_loc, h, hd)), ("k", (B, n_loc, g, hd)), ("v", (B, n_loc, g, hd)),
                        ("d_k", (B, n_loc, g, hd)), ("d_v", (B, n_loc, g, hd)), ("lse", (B, h, n_loc))]:
        x = f(name)
        assert x.dtype == np.float32 and x.shape == shape and np.isfinite(x).all(), (r, name, x.dtype, x.shape)
    e = f("entries")
    assert e.dtype == np.int64 and e.ndim == 2 and e.shape[1] == 9 and len(e), e.shape
    assert set(np.unique(e[:, 4])) <= {0, 1, 2, 3} and (e[:, 4] == 0).any(), "kinds"
    masks = e[:, 6:8].view(np.uint64)
    bits = np.arange(128)
    for b in range(B):
        for tile in range(n_loc // 128):
            rows = pos[tile * 128:(tile + 1) * 128]
            for kv in range(g):
                u = e[(e[:, 0] == b) & (e[:, 1] == tile) & (e[:, 3] == kv)]
                m = masks[(e[:, 0] == b) & (e[:, 1] == tile) & (e[:, 3] == kv)]
                assert len(u) and (u[:, 2] == rows[0]).all(), (r, tile, kv)
                cover = np.zeros((128, n), np.int64)
                for x, (lo_m, hi_m) in zip(u, m):
                    word = np.where(bits < 64, lo_m, hi_m)
                    sel = ((word >> (bits % 64).astype(np.uint64)) & np.uint64(1)).astype(bool)
                    size = bk if x[4] == 3 else ps
                    keys = np.arange(x[5] * size, (x[5] + 1) * size)
                    seen = np.ones((sel.sum(), size), bool)
                    if x[8]:
                        seen = keys[None, :] <= rows[sel][:, None]
                    cover[sel, keys[0]:keys[-1] + 1] += seen
                want = np.arange(n)[None, :] <= rows[:, None]  # causal
                bad = np.argwhere(cover != want)
                assert not len(bad), f"rank {r} tile {tile} kv {kv}: row {bad[0][0]} key {bad[0][1]} counted " \
                                     f"{cover[tuple(bad[0])]} times"
PY

# train: a short run on 2 ranks (config file, command-line override), one finite CSV row per step;
# bad options and an unreadable --data file are usage errors on every rank.
printf 'seq-len = 64\nbatch = 2\ndim = 32\nlayers = 1\nheads = 2\nkv-heads = 1\nhead-dim = 64\nffn-hidden = 48\nsteps = 5\n' \
  >"$tmp/train.conf"
expect_code 0 "train" "$mpiexec" -n 2 "$rc" train --config "$tmp/train.conf" --steps 20 --warmup-steps 4 \
  --eval-every 10 --eval-batches 1 --output csv "$tmp/train.csv"
python3 - "$tmp/train.csv" <<'PY' || fail "train: bad CSV rows"
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert len(rows) == 20 and [int(r["step"]) for r in rows] == list(range(1, 21)), len(rows)
for r in rows:
    for c in ("loss", "accuracy", "tokens_per_s", "step_ms", "peak_memory_bytes"):
        assert math.isfinite(float(r[c])), (c, r)
    assert 0 <= float(r["accuracy"]) <= 1 and float(r["tokens_per_s"]) > 0 and int(r["peak_memory_bytes"]) > 0, r
assert [r["step"] for r in rows if r["eval_loss"]] == ["10", "20"], "eval rows"
assert all(math.isfinite(float(r["eval_loss"])) for r in rows if r["eval_loss"])
PY
printf 'ringcast trains on its own bytes. %.0s' $(seq 20) >"$tmp/text.txt"
expect_code 0 "train --task bytes" "$mpiexec" -n 2 "$rc" train --config "$tmp/train.conf" --task bytes \
  --data "$tmp/text.txt" --output json
python3 -c "import json, math, sys; r = json.load(open(sys.argv[1])); assert len(r) == 5 and all(math.isfinite(x['loss']) for x in r)" \
  "$tmp/out" || fail "train --task bytes: bad JSON rows"
expect_code 2 "bad train option" "$mpiexec" -n 2 "$rc" train --no-such-option
expect_code 2 "train --task bytes without --data" "$mpiexec" -n 2 "$rc" train --task bytes
expect_code 2 "train: unreadable --data" "$mpiexec" -n 2 "$rc" train --task bytes --data "$tmp/missing.txt"
[ "$(grep -c "cannot read data file" "$tmp/err")" -eq 1 ] || fail "unreadable --data: message not printed once"


# Checkpoints: a run resumed from its step-10 checkpoint repeats steps 11..20 of the uninterrupted run
# bit for bit; a truncated checkpoint and one of another run are refused on every rank (exit 1, 2).
for task in needle listops; do
  expect_code 0 "train --task $task with checkpoints" "$mpiexec" -n 2 "$rc" train --config "$tmp/train.conf" \
    --task $task --seq-len 32 --steps 20 --checkpoint "$tmp/$task-{step}.ckpt" --checkpoint-every 10 \
    --output csv "$tmp/$task-full.csv"
  expect_code 0 "train --task $task --resume" "$mpiexec" -n 2 "$rc" train --config "$tmp/train.conf" --task $task \
    --seq-len 32 --steps 20 --resume "$tmp/$task-000010.ckpt" --output csv "$tmp/$task-resumed.csv"
  python3 - "$tmp/$task-full.csv" "$tmp/$task-resumed.csv" <<'PY' || fail "train --task $task: resumed losses differ"
import csv, sys
full = {r["step"]: r["loss"] for r in csv.DictReader(open(sys.argv[1]))}
resumed = [(r["step"], r["loss"]) for r in csv.DictReader(open(sys.argv[2]))]
assert [s for s, _ in resumed] == [str(s) for s in range(11, 21)], resumed
assert all(full[s] == loss for s, loss in resumed), [(s, full[s], loss) for s, loss in resumed]
PY
done
head -c 1000 "$tmp/needle-000010.ckpt" >"$tmp/truncated.ckpt"
expect_code 1 "train --resume truncated" "$mpiexec" -n 2 "$rc" train --config "$tmp/train.conf" --task needle \
  --seq-len 32 --steps 20 --resume "$tmp/truncated.ckpt"
grep -q "checkpoint.*truncated" "$tmp/err" || fail "truncated checkpoint: no clear error"
expect_code 2 "train --resume of another run" "$mpiexec" -n 2 "$rc" train --config "$tmp/train.conf" --task needle \
  --seq-len 32 --steps 30 --resume "$tmp/needle-000010.ckpt"

[ "$failures" -eq 0 ] && echo "all CLI checks passed"
exit $((failures > 0))
