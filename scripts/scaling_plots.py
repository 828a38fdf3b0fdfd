#!/usr/bin/env python3
"""Tables and plots of a scaling results folder (scripts/scaling.sh writes it; docs/scaling.md).

  scaling_plots.py merge DIR   raw/{strong,weak}-*.csv -> strong.csv, weak.csv (an `experiment` column
                               first); raw/comm-np*.csv -> comm.csv (a `ranks` column first)
  scaling_plots.py plot DIR    time.png, efficiency.png, tflops.png, bytes.png: strong and weak side
                               by side, one line per mode (and shape, when a sweep has several)

Times are forward+backward on the slowest rank (fwd_bwd_ms_max), the band spans the fastest rank.
"Ideal" is perfect compute scaling with free communication: the smallest P's time scaled by plan's
attention FLOPs per rank, t(P0) * F(P) / F(P0) (strong: t(P0) * P0 / P; weak: the per-rank work of
exact attention grows with P). Efficiency = ideal / measured. model.csv (scripts/perf_model.py), when
present, adds the model's prediction as a dotted line. Standard library plus matplotlib (Agg).
"""
import argparse
import csv
import glob
import os
import re
import sys

from perf_model import read_conf  # this folder is on sys.path when the script runs

EXPERIMENTS = ("strong", "weak")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows, first):
    """Rows with the union of their columns, in order of first appearance, `first` leading."""
    columns = [first]
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)


def merge(folder):
    raw = os.path.join(folder, "raw")
    for exp in EXPERIMENTS:
        rows = []
        for path in glob.glob(os.path.join(raw, f"{exp}-*.csv")):
            rows += [{"experiment": exp, **r} for r in read_csv(path)]
        rows.sort(key=lambda r: (r["mode"], int(r["ranks"]), int(r["seq_len"])))
        target = os.path.join(folder, f"{exp}.csv")
        if rows:
            write_csv(target, rows, "experiment")
        elif os.path.exists(target):
            os.remove(target)
    comm = []
    for path in glob.glob(os.path.join(raw, "comm-np*.csv")):
        p = re.search(r"comm-np(\d+)\.csv$", path).group(1)
        comm += [{"ranks": p, **r} for r in read_csv(path)]
    comm.sort(key=lambda r: (r["op"], int(r["ranks"]), int(r["size_B"])))
    if comm:
        write_csv(os.path.join(folder, "comm.csv"), comm, "ranks")


def series_key(row, several_shapes):
    shape = f" h{row['heads']}/{row['kv_heads']} d{row['head_dim']}" if several_shapes else ""
    return row["mode"] + shape


def group(rows):
    shapes = {(r["heads"], r["kv_heads"], r["head_dim"], r["batch"]) for r in rows}
    series = {}
    for r in rows:
        series.setdefault(series_key(r, len(shapes) > 1), []).append(r)
    for key in series:
        series[key].sort(key=lambda r: int(r["ranks"]))
    return series


def model_index(folder):
    path = os.path.join(folder, "model.csv")
    if not os.path.exists(path):
        return {}
    return {(r["experiment"], r["mode"], r["seq_len"], r["ranks"], r["heads"], r["kv_heads"], r["head_dim"]):
            float(r["predicted_fwd_bwd_ms"]) for r in read_csv(path)}


def plot(folder):
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"scaling_plots.py: {sys.executable} has no matplotlib (scripts/install-deps.sh installs "
                 "python3-matplotlib for the system python3)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {e: read_csv(os.path.join(folder, f"{e}.csv")) for e in EXPERIMENTS
            if os.path.exists(os.path.join(folder, f"{e}.csv"))}
    if not data:
        sys.exit(f"scaling_plots.py: no strong.csv or weak.csv in {folder} (run `merge` first)")
    predicted = model_index(folder)
    run_conf = os.path.join(folder, "run.conf")
    label = read_conf(run_conf).get("label", "") if os.path.exists(run_conf) else ""
    any_row = next(iter(data.values()))[0]
    device = any_row.get("device_name") or any_row["device"]
    suptitle = f"ringcast attention layer, fwd+bwd - {device}, {any_row['dtype']}, commit {any_row['commit']}"
    if label:
        suptitle += f"\n{label}"

    def figure(name, ylabel, draw, logy=False):
        """One PNG: strong and weak side by side; log y, or linear from 0."""
        fig, axes = plt.subplots(1, len(data), figsize=(6.4 * len(data), 4.8), squeeze=False)
        for ax, (exp, rows) in zip(axes[0], data.items()):
            for i, (key, series) in enumerate(group(rows).items()):
                draw(ax, exp, key, series, f"C{i}")
            n = rows[0]["seq_len"] if exp == "strong" else f"{int(rows[0]['seq_len']) // int(rows[0]['ranks'])} * P"
            ax.set_title(f"{exp} scaling (n = {n}, h = {rows[0]['heads']}/{rows[0]['kv_heads']}, "
                         f"d = {rows[0]['head_dim']})", fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({int(r["ranks"]) for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            if logy:
                ax.set_yscale("log")
                plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
            else:
                ax.set_ylim(bottom=0)
            ax.set_xlabel("ranks P")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(suptitle, fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=120)
        plt.close(fig)

    def ranks(series):
        return [int(r["ranks"]) for r in series]

    def col(series, name):
        return [float(r[name]) for r in series]

    def ideal(series):
        t0, f0 = float(series[0]["fwd_bwd_ms_max"]), float(series[0]["attention_flops_fwd"])
        return [t0 * float(r["attention_flops_fwd"]) / f0 for r in series]

    def draw_time(ax, exp, key, s, color):
        ax.plot(ranks(s), col(s, "fwd_bwd_ms_max"), "o-", color=color, label=f"{key} (slowest rank)")
        ax.fill_between(ranks(s), col(s, "fwd_bwd_ms_min"), col(s, "fwd_bwd_ms_max"), color=color, alpha=0.2)
        ax.plot(ranks(s), ideal(s), "--", color=color, alpha=0.7, label=f"{key} ideal")
        model = [(int(r["ranks"]), predicted.get((exp, r["mode"], r["seq_len"], r["ranks"], r["heads"],
                                                   r["kv_heads"], r["head_dim"]))) for r in s]
        model = [(p, t) for p, t in model if t is not None]
        if model:
            ax.plot([p for p, _ in model], [t for _, t in model], ":", marker="x", color=color,
                    label=f"{key} model")

    def draw_efficiency(ax, exp, key, s, color):
        ax.plot(ranks(s), [i / t for i, t in zip(ideal(s), col(s, "fwd_bwd_ms_max"))], "o-", color=color, label=key)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)

    def draw_tflops(ax, exp, key, s, color):
        ax.plot(ranks(s), col(s, "tflops_fwd_bwd"), "o-", color=color, label=f"{key} fwd+bwd")
        ax.plot(ranks(s), col(s, "tflops_fwd"), "s--", color=color, alpha=0.6, label=f"{key} fwd")

    def draw_bytes(ax, exp, key, s, color):
        sent = [float(r["bytes_sent_fwd"]) + float(r["bytes_sent_bwd"]) for r in s]
        plan = [float(r["plan_bytes_sent_fwd"]) + float(r["plan_bytes_sent_bwd"]) for r in s]
        pos = [(p, b, q) for p, b, q in zip(ranks(s), sent, plan) if b > 0]  # one rank sends nothing
        if pos:
            ax.plot([p for p, _, _ in pos], [b / 2**20 for _, b, _ in pos], "o-", color=color,
                    label=f"{key} measured")
            ax.plot([p for p, _, _ in pos], [q / 2**20 for _, _, q in pos], "x--", color=color, alpha=0.6,
                    label=f"{key} plan")

    figure("time.png", "forward+backward time (ms)", draw_time, logy=True)
    figure("efficiency.png", "parallel efficiency (ideal / measured)", draw_efficiency)
    figure("tflops.png", "effective TFLOP/s per rank", draw_tflops)
    figure("bytes.png", "MiB sent per rank per layer (fwd+bwd)", draw_bytes, logy=True)
    for exp, rows in data.items():
        print(f"{exp} scaling:")
        for key, s in group(rows).items():
            eff = [i / t for i, t in zip(ideal(s), col(s, "fwd_bwd_ms_max"))]
            print("  " + key + ": " + ", ".join(f"P={p} {t:.4g} ms (eff {e:.2f})"
                                               for p, t, e in zip(ranks(s), col(s, "fwd_bwd_ms_max"), eff)))
    print(f"plots in {folder}: time.png efficiency.png tflops.png bytes.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["merge", "plot"])
    ap.add_argument("folder", help="results folder of scripts/scaling.sh")
    args = ap.parse_args()
    if args.action == "merge":
        merge(args.folder)
    else:
        plot(args.folder)


if __name__ == "__main__":
    main()
