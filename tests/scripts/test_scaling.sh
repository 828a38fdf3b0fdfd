#!/usr/bin/env bash
# scripts/scaling.sh --tiny end to end on the CPU backend (P = 1, 2, 4 with --oversubscribe): the merged
# CSVs hold one row per (mode, P) with the documented columns and consistent values, the exact mode's
# bytes equal plan's, --verify's errors are those of exact attention (ring) or finite (clustered), and
# the plots, environment and model rows exist. Leaves the results folder for test_perf_model.sh.
# Usage: test_scaling.sh RINGCAST SOURCE_DIR RESULTS_DIR
set -uo pipefail
ringcast=$1
src=$2
out=$3
source "$(dirname "$0")/python.sh"
rm -rf "$out"
PYTHON=$python bash "$src/scripts/scaling.sh" --tiny --oversubscribe --verify --max-ranks 4 --ringcast "$ringcast" \
  --out "$out" || { echo "FAIL: scaling.sh exited non-zero"; exit 1; }

"$python" - "$out" <<'PY' || exit 1
import csv, math, os, sys
out = sys.argv[1]
failures = []
def check(ok, what):
    if not ok:
        failures.append(what)

columns = ["experiment", "timestamp", "mode", "placement", "seq_len", "ranks", "batch", "heads", "kv_heads",
           "head_dim", "dtype", "causal", "device", "fwd_ms_min", "fwd_ms_median", "fwd_ms_max", "fwd_bwd_ms_min",
           "fwd_bwd_ms_median", "fwd_bwd_ms_max", "exposed_fwd_ms_min", "exposed_fwd_ms_median", "exposed_fwd_ms_max",
           "exposed_fwd_bwd_ms_min", "exposed_fwd_bwd_ms_median", "exposed_fwd_bwd_ms_max", "attention_flops_fwd", "tflops_fwd", "tflops_fwd_bwd",
           "bytes_sent_fwd", "bytes_sent_bwd", "plan_bytes_sent_fwd", "plan_bytes_sent_bwd", "peak_memory_bytes",
           "table_entries_mean", "table_entries_max", "commit", "device_name", "driver", "rel_error"]
for exp, n_of in (("strong", lambda p: 2048), ("weak", lambda p: 512 * p)):
    path = os.path.join(out, f"{exp}.csv")
    rows = list(csv.DictReader(open(path)))
    header = next(csv.reader(open(path)))
    check(header == columns, f"{exp}.csv columns: {header}")
    got = sorted((r["mode"], int(r["ranks"])) for r in rows)
    check(got == sorted((m, p) for m in ("clustered", "ring") for p in (1, 2, 4)), f"{exp}.csv rows: {got}")
    for r in rows:
        p, name = int(r["ranks"]), f"{exp} {r['mode']} P={r['ranks']}"
        f = {c: float(r[c]) for c in columns
             if (c.endswith(("_min", "_median", "_max")) or c.startswith(("tflops", "bytes", "plan_")))
             and not c.startswith("table_")}
        check(int(r["seq_len"]) == n_of(p), f"{name}: seq_len {r['seq_len']}")
        check((r["heads"], r["kv_heads"], r["head_dim"], r["dtype"], r["device"], r["driver"]) ==
              ("2", "2", "64", "f32", "cpu", "cpu"), f"{name}: shape/device {r}")
        for t in ("fwd_ms", "fwd_bwd_ms"):
            check(0 < f[t + "_min"] <= f[t + "_median"] <= f[t + "_max"], f"{name}: {t} min/median/max {r}")
        check(f["fwd_ms_max"] <= f["fwd_bwd_ms_max"], f"{name}: forward slower than forward+backward")
        for t in ("exposed_fwd_ms", "exposed_fwd_bwd_ms"):
            check(0 <= f[t + "_min"] <= f[t + "_median"] <= f[t + "_max"], f"{name}: {t} min/median/max {r}")
        check(f["exposed_fwd_bwd_ms_max"] <= f["fwd_bwd_ms_max"], f"{name}: more exposed communication than time")
        if p == 1:  # only the layer's own checks and local copies go through the communicator
            check(f["exposed_fwd_bwd_ms_median"] <= max(0.05 * f["fwd_bwd_ms_median"], 5.0),
                  f"{name}: exposed communication on one rank")
        check(f["tflops_fwd"] > 0 and f["tflops_fwd_bwd"] > 0 and int(r["peak_memory_bytes"]) > 0, f"{name}: {r}")
        sent = f["bytes_sent_fwd"] + f["bytes_sent_bwd"]
        check((sent == 0) == (p == 1), f"{name}: bytes sent {sent}")
        err = float(r["rel_error"])
        if r["mode"] == "ring":
            check(r["placement"] == "zigzag", f"{name}: placement {r['placement']}")
            check(f["bytes_sent_fwd"] == f["plan_bytes_sent_fwd"] and f["bytes_sent_bwd"] == f["plan_bytes_sent_bwd"],
                  f"{name}: counters differ from plan: {r}")
            check(err <= 1e-5, f"{name}: rel_error {err} (exact attention, fp32: <= 1e-5)")
            check(r["table_entries_mean"] == "", f"{name}: a table size for an exact mode")
        else:
            check(math.isfinite(err), f"{name}: rel_error {err}")
            check(1 <= float(r["table_entries_mean"]) <= int(r["table_entries_max"]), f"{name}: table entries {r}")

comm = list(csv.DictReader(open(os.path.join(out, "comm.csv"))))
check({(r["op"], r["ranks"]) for r in comm} == {(o, p) for o in ("ring", "allgather", "alltoall") for p in ("2", "4")},
      "comm.csv: ops x ranks")
check(all(r["wrong"] == "0" for r in comm), "comm.csv: wrong elements")
model = list(csv.DictReader(open(os.path.join(out, "model.csv"))))
check(len(model) == 12 and all(float(r["predicted_fwd_bwd_ms"]) > 0 for r in model), f"model.csv: {len(model)} rows")
for png in ("time.png", "efficiency.png", "tflops.png", "bytes.png"):
    path = os.path.join(out, png)
    ok = os.path.exists(path) and os.path.getsize(path) > 1000 and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    check(ok, f"{png}: missing, empty or not a PNG")
env = open(os.path.join(out, "environment.txt")).read()
check("## lscpu" in env and "OMP_NUM_THREADS=1" in env and "commit:" in env, "environment.txt")
commands = open(os.path.join(out, "commands.txt")).read().splitlines()
check(sum("bench layer" in c for c in commands) == 12 and sum("bench comm" in c for c in commands) == 2,
      f"commands.txt: {len(commands)} lines")
for f in failures:
    print("FAIL:", f)
if failures:
    sys.exit(1)
print("scaling.sh --tiny: CSV rows, plots, environment and model rows as expected")
PY
