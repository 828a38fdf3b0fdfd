#!/usr/bin/env python3
"""The unified-view paper's claim, measured: the longest sequence one attention layer (forward and
backward, h heads of d, bf16) runs on one GPU, for plain materialized attention (PyTorch: the n x n
score matrix in memory, softmax, then P V) and for ringcast (`ringcast run`, one rank, --mode).
Each trial is its own process, so running out of memory ends only that trial. Lengths double from
--start until a trial runs out of memory, then a bisection to --resolution pins the limit. A trial
still running after --timeout stops the search without a verdict: the row says the limit is at least
that long (limited_by = time), as does reaching --limit (limited_by = limit); any other failure stops
the script. Prints one row per method and the ratio (PERFORMANCE.md: bar >= 40x, goal >= 400x), and
writes them as CSV with --out (method, max_seq_len, limited_by, the ratio, the run's GPU and commit).
Cost: the exact mode's work grows as n^2 (fwd+bwd at 1M tokens, h 16, d 128: ~3e16 FLOPs, about 3
minutes at the 172 TFLOP/s measured on an H100), so within a device call its row is bounded by time,
not memory; --mode clustered (a fixed budget of keys per query) reaches its memory limit.

  python3 scripts/bench_maxlen.py --ringcast build-gpu/bin/ringcast --out results.csv
  python3 scripts/bench_maxlen.py --ringcast build-gpu/bin/ringcast --mode clustered --methods ringcast
"""
import argparse
import csv
import datetime
import os
import shutil
import subprocess
import sys

PLAIN = r"""
import sys, torch
n, h, d = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
           for _ in range(3))
s = (q @ k.transpose(-1, -2)) * d ** -0.5          # [1, h, n, n]: the materialized scores
o = torch.softmax(s.float(), dim=-1).to(q.dtype) @ v
o.backward(torch.randn_like(o))
torch.cuda.synchronize()
assert torch.isfinite(q.grad).all()
print(torch.cuda.max_memory_allocated())
"""


# What a process that ran out of memory leaves in its output: PyTorch's OutOfMemoryError ("CUDA out
# of memory"), ringcast's CUDA check ("out of memory") or a host allocation failure.
OOM_SIGNS = ("out of memory", "OutOfMemoryError", "bad_alloc", "Cannot allocate memory")


def trial(cmd, args):
    """Runs one trial: 'fits', 'memory' (it ran out of memory, or the kernel's OOM killer ended it) or
    'time' (still running after --timeout: the length is not refused, only slow). Any other failure
    stops the measurement, since counting it as "does not fit" would report a wrong limit."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return "time"
    if r.returncode == 0:
        return "fits"
    text = r.stdout + r.stderr
    if r.returncode in (-9, 137) or any(sign in text for sign in OOM_SIGNS):
        return "memory"
    tail = "\n".join(text.strip().splitlines()[-10:])
    raise SystemExit(f"bench_maxlen.py: a trial failed for another reason than memory (exit {r.returncode}):\n"
                     f"  {' '.join(cmd)}\n{tail}")


def plain_trial(n, args):
    return trial([sys.executable, "-c", PLAIN, str(n), str(args.heads), str(args.head_dim)], args)


def ringcast_trial(n, args):
    return trial([args.ringcast, "run", "--mode", args.mode, "--seq-len", str(n), "--heads", str(args.heads),
                  "--kv-heads", str(args.heads), "--head-dim", str(args.head_dim), "--causal", "0", "--warmup", "0",
                  "--iters", "1", "--check-inputs", "0"], args)


def longest(run, args):
    """(n, limited_by): the longest n (a multiple of --resolution) whose trial fits, 0 if none, and what
    stopped the search: 'memory' (then n is the limit, to --resolution), 'time' (a longer trial was still
    running after --timeout: the limit is at least n) or 'limit' (every length up to --limit fits)."""
    n, good = args.start, 0
    while n <= args.limit:
        outcome = run(n, args)
        if outcome != "fits":
            break
        good, n = n, 2 * n
    else:
        return good, "limit"
    if outcome == "time" or good == 0:
        return good, outcome
    bad = n
    while bad - good > args.resolution:
        mid = (good + bad) // 2 // args.resolution * args.resolution
        if mid in (good, bad):
            break
        outcome = run(mid, args)
        if outcome == "time":
            return good, "time"
        good, bad = (mid, bad) if outcome == "fits" else (good, mid)
    return good, "memory"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ringcast", required=True)
    p.add_argument("--mode", default="ring", help="ringcast's mode: ring (exact) or clustered")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--start", type=int, default=4096)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--limit", type=int, default=1 << 26)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out")
    p.add_argument("--methods", default="plain,ringcast", help="which to measure: plain, ringcast or both")
    args = p.parse_args()
    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if smi else "none (CPU backend)"
    methods = {"plain": ("plain materialized (PyTorch)", plain_trial),
               "ringcast": (f"ringcast {args.mode}, 1 rank", ringcast_trial)}
    rows = []
    for key in args.methods.split(","):
        if key not in methods:
            p.error(f"--methods: unknown method {key!r} (plain, ringcast)")
        method, run = methods[key]
        n, limited_by = longest(run, args)
        rows.append({"method": method, "max_seq_len": n, "limited_by": limited_by})
        at_least = "" if limited_by == "memory" else f" (at least: {limited_by} reached first)"
        print(f"{method:32s} longest n = {n}{at_least}", flush=True)
    base = rows[0]["max_seq_len"] if rows[0]["method"].startswith("plain") else 0
    if len(rows) == 2 and base:
        bound = "" if rows[1]["limited_by"] == "memory" else "at least "
        print(f"ratio {bound}{rows[1]['max_seq_len'] / base:.1f}x (bar 40x, goal 400x)")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not commit and os.path.exists(".git-commit"):
        commit = open(".git-commit").read().strip()
    for r in rows:
        r.update(timestamp=stamp, gpu=gpu, commit=commit, heads=args.heads, head_dim=args.head_dim,
                 ratio_to_plain=f"{r['max_seq_len'] / base:.1f}" if base else "")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
