#!/usr/bin/env python3
"""The unified-view paper's claim, measured: the longest sequence one attention layer (forward and
backward, h heads of d, bf16) runs on one GPU, for plain materialized attention (PyTorch: the n x n
score matrix in memory, softmax, then P V) and for ringcast's exact mode (`ringcast run`, one rank).
Each trial is its own process, so running out of memory ends only that trial. Lengths double from
--start until a trial fails, then a bisection to --resolution pins the limit. Prints one row per method
and the ratio (PERFORMANCE.md: bar >= 40x, goal >= 400x), and writes them as CSV with --out.
Cost: the exact mode's last trials dominate (dense fwd+bwd at 2M tokens, h 16, d 128 is ~1e17 FLOPs,
minutes on an H100), so this is a one-off measurement, not a gpu-check step; --mode clustered measures
the sparse mode where its backend runs.

  python3 scripts/bench_maxlen.py --ringcast build-gpu/bin/ringcast --out results.csv
"""
import argparse
import csv
import datetime
import os
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


def plain_fits(n, args):
    r = subprocess.run([sys.executable, "-c", PLAIN, str(n), str(args.heads), str(args.head_dim)],
                       capture_output=True, text=True, timeout=args.timeout)
    return r.returncode == 0


def ringcast_fits(n, args):
    r = subprocess.run([args.ringcast, "run", "--mode", args.mode, "--seq-len", str(n), "--heads", str(args.heads), "--kv-heads",
                        str(args.heads), "--head-dim", str(args.head_dim), "--causal", "0", "--warmup", "0",
                        "--iters", "1", "--check-inputs", "0"], capture_output=True, text=True, timeout=args.timeout)
    return r.returncode == 0


def longest(fits, args):
    """The longest n (a multiple of --resolution) for which fits(n) holds, or 0."""
    n, good = args.start, 0
    while n <= args.limit and fits(n, args):
        good, n = n, 2 * n
    bad = n
    if good == 0 or bad > args.limit:
        return good
    while bad - good > args.resolution:
        mid = (good + bad) // 2 // args.resolution * args.resolution
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if fits(mid, args) else (good, mid)
    return good


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
    args = p.parse_args()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    rows = []
    for method, fits in (("plain materialized (PyTorch)", plain_fits), (f"ringcast {args.mode}, 1 rank", ringcast_fits)):
        n = longest(fits, args)
        rows.append({"method": method, "max_seq_len": n})
        print(f"{method:32s} longest n = {n}", flush=True)
    ratio = rows[1]["max_seq_len"] / max(1, rows[0]["max_seq_len"])
    print(f"ratio {ratio:.1f}x (bar 40x, goal 400x)")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not commit and os.path.exists(".git-commit"):
        commit = open(".git-commit").read().strip()
    for r in rows:
        r.update(timestamp=stamp, gpu=gpu, commit=commit, heads=args.heads, head_dim=args.head_dim,
                 ratio_to_plain=f"{r['max_seq_len'] / max(1, rows[0]['max_seq_len']):.1f}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
