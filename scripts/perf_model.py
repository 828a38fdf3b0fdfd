#!/usr/bin/env python3
"""Performance model of one distributed attention layer: forward and backward time per rank, from
compute rates, link figures, and `ringcast plan`'s FLOPs and bytes (docs/scaling.md, "The model").

  perf_model.py predict --machine FILE [--rates CSV] --modes LIST (--seq-len N | --tokens-per-rank M)
                        --ranks LIST [shape options]
      predicted step times and scaling for a machine description (configs/machines/*.conf); --rates
      takes measured rates from `ringcast bench layer` rows on 1 rank or `ringcast bench kernels` output
  perf_model.py validate DIR --machine FILE [--tolerance X]
      the model against a scaling.sh results folder: rates from its 1-rank rows, links from its
      `bench comm` rows (comm.csv) at each P; writes DIR/model.csv, prints predicted/measured, and with
      --tolerance fails (exit 1) when a P > 1 prediction of the forward+backward time is off by more
      than that factor either way

Per rank, with F = plan's forward attention FLOPs, c_f = F / rate_fwd and c_b = 3.5 F / rate_fwd_bwd - c_f
(times s = ranks sharing a compute unit, when more ranks than GPUs or cores), and T_op(bytes) the time of
one message (Hockney: latency + bytes / bandwidth, or interpolated from measured `bench comm` rows):
  ring       fwd: (P-1) max(c_f/P, T_ring(kv)) + c_f/P        (overlap: the next K/V block travels
             bwd: (P-1) max(c_b/P, T_ring(kv)) + c_b/P + P T_ring(dkv)   while this one computes)
             without overlap the max becomes a sum
  allgather  c + T_allgather(bytes)        (gather, then compute; backward: compute, then reduce-scatter)
  ulysses    fwd: c_f + 3 T_alltoall(bytes/3); bwd: c_b + 2 T_alltoall(bytes/2)
  clustered  c + k T_ring(bytes/k): k = 4(P-1)+1 message rounds forward, 2(P-1)+1 backward, not overlapped
plus the input check's small all-gathers (3 forward, 1 backward). Beyond ranks_per_node the network's
figures replace the node's. Exposed communication = predicted time - c.
Standard library only.
"""
import argparse
import bisect
import csv
import functools
import json
import math
import os
import shlex
import subprocess
import sys


def read_conf(path):
    """key = value lines, # comments: the machine files and scaling.sh's run.conf."""
    conf = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "=" in line:
                key, value = line.split("=", 1)
                conf[key.strip()] = value.strip()
    return conf


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- machine, links, rates ------------------------------------------------------------------------------

class Machine:
    def __init__(self, path):
        c = read_conf(path)
        self.path = path
        self.name = c.get("name", os.path.basename(path))
        self.ranks_per_node = int(c.get("ranks_per_node", "1000000"))
        self.compute_units = c.get("compute_units", "auto")
        self.overlap = c.get("overlap", "yes").lower() in ("yes", "true", "1")
        num = lambda k: float(c[k]) if c.get(k, "measured") != "measured" else None
        self.link = (num("link_latency_us"), num("link_bw_GBps"))
        self.net = (num("net_latency_us"), num("net_bw_GBps"))
        self.rates = {"exact": (num("attn_fwd_tflops"), num("attn_fwd_bwd_tflops")),
                      "clustered": (num("clustered_fwd_tflops"), num("clustered_fwd_bwd_tflops"))}

    def units(self, run_conf):
        """A measured run's own count (run.conf) first: it knows how many GPUs or cores the ranks had."""
        if run_conf and "compute_units" in run_conf:
            return int(run_conf["compute_units"])
        if self.compute_units != "auto":
            return int(self.compute_units)
        return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("OMP_NUM_THREADS", "1")))


def nccl_size(op, bytes_sent, p):
    """The nccl-tests size_B (comm_bench.hpp) of an op in which each rank sends `bytes_sent`."""
    return bytes_sent if op == "ring" else bytes_sent * p / (p - 1)


class HockneyLink:
    """latency + bytes / bandwidth per message; collectives take P-1 steps (ring algorithms)."""

    def __init__(self, latency_us, bw_GBps, source):
        if latency_us is None or bw_GBps is None:
            raise SystemExit(f"perf_model.py: no link figures for {source} (measure them: `ringcast bench comm`)")
        self.lat, self.bw, self.source = latency_us * 1e-6, bw_GBps * 1e9, source

    def time(self, op, bytes_sent, p):
        steps = 1 if op == "ring" else p - 1
        return steps * self.lat + bytes_sent / self.bw


class MeasuredLink:
    """Times from `bench comm` rows at one P, interpolated in log-log between sizes; below the
    smallest size, the smallest size's time; above the largest, proportional to the size. A message
    takes no longer than a larger one: a size slower than some larger size (a descheduled rank, on
    oversubscribed cores) takes that larger size's time."""

    def __init__(self, rows, source):
        self.source = source
        self.curves = {}
        for r in rows:
            self.curves.setdefault(r["op"], []).append((float(r["size_B"]), float(r["time_us"]) * 1e-6))
        for c in self.curves.values():
            c.sort()
            for i in range(len(c) - 2, -1, -1):
                c[i] = (c[i][0], min(c[i][1], c[i + 1][1]))

    def time(self, op, bytes_sent, p):
        curve = self.curves.get(op) or self.curves["ring"]
        size = max(nccl_size(op if op in self.curves else "ring", bytes_sent, p), 1.0)
        sizes = [s for s, _ in curve]
        i = bisect.bisect_left(sizes, size)
        if i == 0:
            return curve[0][1]
        if i == len(curve):
            return curve[-1][1] * size / sizes[-1]
        (s0, t0), (s1, t1) = curve[i - 1], curve[i]
        w = math.log(size / s0) / math.log(s1 / s0)
        return math.exp((1 - w) * math.log(t0) + w * math.log(t1))


class TwoLevelLink:
    """Within a node `node`, across nodes `net`: a ring step or gather waits for its slowest link (the
    network); an all-to-all sends the off-node share over the network while the rest goes on-node."""

    def __init__(self, node, net, ranks_per_node):
        self.node, self.net, self.rpn = node, net, ranks_per_node
        self.source = f"{node.source}; across nodes {net.source}"

    def time(self, op, bytes_sent, p):
        if op != "alltoall":
            return self.net.time(op, bytes_sent, p)
        off = bytes_sent * (p - self.rpn) / (p - 1)
        return max(self.node.time(op, bytes_sent - off, p), self.net.time(op, off, p))


def machine_link(machine, p):
    node = HockneyLink(*machine.link, f"{machine.name} link")
    if p <= machine.ranks_per_node:
        return node
    return TwoLevelLink(node, HockneyLink(*machine.net, f"{machine.name} network"), machine.ranks_per_node)


def rate_class(mode):
    return "clustered" if mode == "clustered" else "exact"


def rates_from_file(path, mode, heads, head_dim, seq_len):
    """(fwd, fwd+bwd) TFLOP/s from `bench layer` CSV rows on 1 rank (the same mode, else one of the
    same class; the closest shape), or from `bench kernels` output lines (csv,ringcast,...)."""
    with open(path) as f:
        text = f.read()
    if "csv,ringcast," in text:
        want = ("random-pages", "per-row", "per-row-grouped") if mode == "clustered" else ("dense", "dense-causal")
        for line in text.splitlines():
            if line.startswith("csv,ringcast,"):
                cols = line.split(",")
                if cols[2] in want and cols[15] not in ("nan", ""):
                    return float(cols[13]), float(cols[15]), f"bench kernels ({cols[2]}) in {path}"
        raise SystemExit(f"perf_model.py: {path} has no bench kernels row with a backward time for {want}")
    rows = [r for r in read_csv(path) if int(r["ranks"]) == 1 and rate_class(r["mode"]) == rate_class(mode)]
    if not rows:
        raise SystemExit(f"perf_model.py: {path} has no 1-rank row of a {rate_class(mode)} mode")
    best = min(rows, key=lambda r: (r["mode"] != mode, r["heads"] != str(heads), r["head_dim"] != str(head_dim),
                                    abs(math.log(int(r["seq_len"]) / seq_len))))
    return float(best["tflops_fwd"]), float(best["tflops_fwd_bwd"]), f"bench layer 1-rank row in {path}"


# ---- plan and the model ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def plan(ringcast, mode, seq_len, ranks, heads, kv_heads, head_dim, batch, dtype, causal, layer_args):
    cmd = [ringcast, "plan", "--mode", mode, "--seq-len", str(seq_len), "--ranks", str(ranks), "--heads", str(heads),
           "--kv-heads", str(kv_heads), "--head-dim", str(head_dim), "--batch", str(batch), "--dtype", dtype,
           "--causal", causal, *shlex.split(layer_args), "--output", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"perf_model.py: `{' '.join(cmd)}` failed:\n{done.stderr}")
    return json.loads(done.stdout)


def check_inputs(layer_args):
    args = shlex.split(layer_args)
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--check-inputs=") else (
            args[i + 1] if a == "--check-inputs" and i + 1 < len(args) else None)
        if value is not None:
            return value.lower() not in ("0", "false", "no", "off")
    return True


def predict(mode, p, pl, rates, link, overlap, share, checked):
    """Seconds: forward, forward+backward, compute alone."""
    flops = float(pl["attention_flops_fwd"])
    c_f = flops / (rates[0] * 1e12) * share
    c_b = max(3.5 * flops / (rates[1] * 1e12) * share - c_f, 0.0)
    bf, bb = float(pl["bytes_sent_fwd"]), float(pl["bytes_sent_bwd"])
    if p == 1:
        return c_f, c_f + c_b, c_f + c_b
    check_f, check_b = (24 * (p - 1), 8 * (p - 1)) if checked else (0, 0)
    bf, bb = bf - check_f, bb - check_b
    t = lambda op, b: link.time(op, b, p)
    if mode == "ring":
        kv = bf / (p - 1)
        dkv = (bb - (p - 1) * kv) / p
        step = max if overlap else (lambda a, b: a + b)
        t_f = (p - 1) * step(c_f / p, t("ring", kv)) + c_f / p
        t_b = (p - 1) * step(c_b / p, t("ring", kv)) + c_b / p + p * t("ring", dkv)
    elif mode == "allgather":
        t_f, t_b = c_f + t("allgather", bf), c_b + t("allgather", bb)
    elif mode == "ulysses":
        t_f, t_b = c_f + 3 * t("alltoall", bf / 3), c_b + 2 * t("alltoall", bb / 2)
    else:
        k_f, k_b = 4 * (p - 1) + 1, 2 * (p - 1) + 1
        t_f, t_b = c_f + k_f * t("ring", bf / k_f), c_b + k_b * t("ring", bb / k_b)
    if checked:
        t_f += 3 * t("allgather", 8 * (p - 1))
        t_b += t("allgather", 8 * (p - 1))
    return t_f, t_f + t_b, c_f + c_b


def print_table(rows, columns):
    as_text = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    text = [list(columns)] + [[as_text(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in text) for i in range(len(columns))]
    for line in text:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ---- commands -------------------------------------------------------------------------------------------

def cmd_predict(a):
    machine = Machine(a.machine)
    ranks = [int(x) for x in a.ranks.split(",")]
    units = machine.units(None)
    rows = []
    for mode in a.modes.split(","):
        base = None
        for p in ranks:
            n = a.seq_len if a.seq_len else a.tokens_per_rank * p
            pl = plan(a.ringcast, mode, n, p, a.heads, a.kv_heads or a.heads, a.head_dim, a.batch, a.dtype, a.causal,
                      a.layer_args)
            if a.rates:
                rates = rates_from_file(a.rates, mode, a.heads, a.head_dim, n)[:2]
            else:
                rates = machine.rates[rate_class(mode)]
                if None in rates:
                    raise SystemExit(f"perf_model.py: {a.machine} gives no {rate_class(mode)} rates: pass --rates")
            share = max(1.0, min(p, machine.ranks_per_node) / units)
            link = machine_link(machine, p) if p > 1 else None
            t_f, t_fb, comp = predict(mode, p, pl, rates, link, machine.overlap, share, check_inputs(a.layer_args))
            flops = float(pl["attention_flops_fwd"])
            base = base or (t_fb, flops)
            rows.append({"machine": machine.name, "mode": mode, "seq_len": n, "ranks": p, "heads": a.heads,
                         "kv_heads": a.kv_heads or a.heads, "head_dim": a.head_dim, "dtype": a.dtype,
                         "fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_fb, "compute_ms": 1e3 * comp,
                         "exposed_comm_ms": 1e3 * (t_fb - comp),
                         "bytes_sent_per_rank": float(pl["bytes_sent_fwd"]) + float(pl["bytes_sent_bwd"]),
                         "tflops_fwd_bwd_per_rank": 3.5 * flops / t_fb / 1e12,
                         "efficiency": base[0] * flops / base[1] / t_fb})
    print(f"# {machine.name} ({a.machine}); rates: {a.rates or 'machine file'}; overlap {machine.overlap}")
    print_table(rows, ["mode", "seq_len", "ranks", "fwd_ms", "fwd_bwd_ms", "compute_ms", "exposed_comm_ms",
                       "bytes_sent_per_rank", "tflops_fwd_bwd_per_rank", "efficiency"])
    if a.output:
        write_rows(a.output, rows)


def cmd_validate(a):
    machine = Machine(a.machine)
    run_conf_path = os.path.join(a.folder, "run.conf")
    run_conf = read_conf(run_conf_path) if os.path.exists(run_conf_path) else {}
    layer_args = run_conf.get("layer_args", "")
    units = machine.units(run_conf)
    comm_path = os.path.join(a.folder, "comm.csv")
    comm = read_csv(comm_path) if os.path.exists(comm_path) else []
    out = []
    for exp in ("strong", "weak"):
        path = os.path.join(a.folder, f"{exp}.csv")
        if not os.path.exists(path):
            continue
        rows = read_csv(path)
        shape = lambda r: (r["mode"], r["heads"], r["kv_heads"], r["head_dim"], r["batch"], r["dtype"], r["causal"])
        for r in rows:
            p = int(r["ranks"])
            per_rank = exp == "weak"
            one = [q for q in rows if int(q["ranks"]) == 1 and shape(q) == shape(r) and
                   (per_rank or q["seq_len"] == r["seq_len"])]
            if not one:
                print(f"perf_model.py: {exp} {r['mode']} P={p}: no 1-rank row to take rates from; skipped")
                continue
            rates = (float(one[0]["tflops_fwd"]), float(one[0]["tflops_fwd_bwd"]))
            measured_comm = [c for c in comm if int(c["ranks"]) == p]
            link = (None if p == 1 else MeasuredLink(measured_comm, f"bench comm at P={p}") if measured_comm
                    else machine_link(machine, p))
            pl = plan(a.ringcast, r["mode"], int(r["seq_len"]), p, int(r["heads"]), int(r["kv_heads"]),
                      int(r["head_dim"]), int(r["batch"]), r["dtype"], "1" if r["causal"] == "yes" else "0",
                      layer_args)
            share = max(1.0, min(p, machine.ranks_per_node) / units)
            t_f, t_fb, comp = predict(r["mode"], p, pl, rates, link, machine.overlap, share, check_inputs(layer_args))
            m_f, m_fb = float(r["fwd_ms_max"]), float(r["fwd_bwd_ms_max"])
            out.append({"experiment": exp, "mode": r["mode"], "seq_len": r["seq_len"], "ranks": r["ranks"],
                        "heads": r["heads"], "kv_heads": r["kv_heads"], "head_dim": r["head_dim"],
                        "measured_fwd_ms": m_f, "predicted_fwd_ms": 1e3 * t_f,
                        "measured_fwd_bwd_ms": m_fb, "predicted_fwd_bwd_ms": 1e3 * t_fb,
                        "predicted_compute_ms": 1e3 * comp, "predicted_exposed_comm_ms": 1e3 * (t_fb - comp),
                        "measured_exposed_comm_ms": float(r.get("exposed_fwd_bwd_ms_max") or "nan"),
                        "ratio": 1e3 * t_fb / m_fb, "compute_share": share,
                        "links": "none (one rank)" if p == 1 else link.source})
    if not out:
        raise SystemExit(f"perf_model.py: no rows to validate in {a.folder}")
    write_rows(os.path.join(a.folder, "model.csv"), out)
    print(f"# model vs measurement, {a.folder} (machine {machine.name}: overlap {machine.overlap}, "
          f"{units} compute unit(s)); rates from the 1-rank rows; ratio = predicted / measured fwd+bwd")
    print_table(out, ["experiment", "mode", "seq_len", "ranks", "measured_fwd_ms", "predicted_fwd_ms",
                      "measured_fwd_bwd_ms", "predicted_fwd_bwd_ms", "measured_exposed_comm_ms",
                      "predicted_exposed_comm_ms", "ratio"])
    checked = [r for r in out if int(r["ranks"]) > 1]
    if checked:
        logs = [math.log(r["ratio"]) for r in checked]
        worst = max(checked, key=lambda r: abs(math.log(r["ratio"])))
        print(f"P > 1: {len(checked)} predictions, geometric mean ratio {math.exp(sum(logs) / len(logs)):.2f}, "
              f"worst {worst['ratio']:.2f} ({worst['experiment']} {worst['mode']} P={worst['ranks']})")
        if a.tolerance:
            bad = [r for r in checked if not 1 / a.tolerance <= r["ratio"] <= a.tolerance]
            if bad:
                print(f"FAIL: {len(bad)} prediction(s) off by more than {a.tolerance}x")
                sys.exit(1)
            print(f"all within {a.tolerance}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    default_ringcast = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "bin", "ringcast")
    pr = sub.add_parser("predict", help="predict step times and scaling for a machine description")
    pr.add_argument("--machine", required=True)
    pr.add_argument("--rates", help="measured rates: bench layer CSV (1-rank rows) or bench kernels output")
    pr.add_argument("--modes", default="ring,clustered")
    size = pr.add_mutually_exclusive_group(required=True)
    size.add_argument("--seq-len", type=int, help="strong scaling: the fixed n")
    size.add_argument("--tokens-per-rank", type=int, help="weak scaling: n = M * P")
    pr.add_argument("--ranks", default="1,2,4,8")
    pr.add_argument("--heads", type=int, default=16)
    pr.add_argument("--kv-heads", type=int, default=0, help="0: = heads")
    pr.add_argument("--head-dim", type=int, default=128)
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--dtype", default="bf16")
    pr.add_argument("--causal", default="1")
    pr.add_argument("--layer-args", default="", help="more `ringcast plan` options (clustered budgets)")
    pr.add_argument("--output", help="also write the rows as CSV here")
    va = sub.add_parser("validate", help="compare with a scaling.sh results folder")
    va.add_argument("folder")
    va.add_argument("--machine", required=True)
    va.add_argument("--tolerance", type=float, help="fail when a P > 1 prediction is off by more than this factor")
    for p in (pr, va):
        p.add_argument("--ringcast", default=default_ringcast, help="the executable (for `ringcast plan`)")
    a = ap.parse_args()
    cmd_predict(a) if a.command == "predict" else cmd_validate(a)


if __name__ == "__main__":
    main()
