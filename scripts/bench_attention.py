#!/usr/bin/env python3
"""Side-by-side attention benchmark on one GPU: ringcast's block-sparse kernel vs PyTorch baselines.

Runs `ringcast bench kernels` for our rows (each checks itself against the CPU backend first and
prints a "csv," line), and, in the same process run, PyTorch SDPA pinned to cuDNN and to FlashAttention-2
on the dense shapes and FlexAttention (torch.compile, compile time excluded) on the block-sparse and
per-row shapes, with block masks built from the page lists that ringcast dumped (.npy), so both run
exactly the same mask. Prints one markdown table (ms and effective TFLOP/s; FLOPs = 4 * d * attended
query-key pairs x heads, fwd+bwd = 3.5x fwd, PERFORMANCE.md) and writes it, the raw CSV and the
environment to --out.

Usage (on the GPU machine; PyTorch >= 2.5 with CUDA, numpy):
    python3 scripts/bench_attention.py --ringcast build/bin/ringcast --out bench-out
    python3 scripts/bench_attention.py --ringcast build/bin/ringcast --out bench-out --quick
Options:
    --ringcast PATH   the ringcast executable (its `bench kernels` subcommand takes --seq --batch
                      --heads --kv-heads --head-dim --pattern --k --seed --warmup --repeats --dtype
                      --backward --dump DIR)
    --out DIR         results: table.md, results.csv, env.txt, and the dumped page lists
    --quick           small shapes (seconds): 8K dense, 128K random pages, 8K per-row
    --only NAMES      comma-separated subset of: dense, dense-causal, random-pages, random-pages-gqa, per-row,
                      per-row-grouped (the same choices with the GQA group's heads of a token as consecutive
                      rows of a tile, the clustered mode's order; its FlexAttention row is per-row's)
    --no-baselines    ringcast rows only
    --repeats N       timed runs per measurement (median), default 10 (5 with --quick)
"""
import argparse
import csv
import io
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

PAGE = 64    # keys per page (ringcast page_size)
QTILE = 128  # query rows per tile (ringcast kQueryTile)


@dataclass
class Config:
    name: str
    pattern: str
    seq: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    k: int = 16
    backward: bool = True


def configs(quick):
    if quick:
        return [
            Config("dense", "dense", 8192, 16, 16),
            Config("dense-causal", "dense-causal", 8192, 16, 16),
            Config("random-pages", "random-pages", 131072, 8, 8),
            Config("random-pages-gqa", "random-pages", 131072, 8, 4, backward=False),
            Config("per-row", "per-row", 8192, 64, 4),
            Config("per-row-grouped", "per-row-grouped", 8192, 64, 4),
        ]
    return [
        Config("dense", "dense", 65536, 16, 16),
        Config("dense-causal", "dense-causal", 65536, 16, 16),
        Config("random-pages", "random-pages", 1 << 20, 8, 8),
        Config("random-pages-gqa", "random-pages", 1 << 20, 8, 4, backward=False),
        Config("per-row", "per-row", 65536, 64, 4),
        Config("per-row-grouped", "per-row-grouped", 65536, 64, 4),
    ]


# ---- ringcast -------------------------------------------------------------------------------------

def run_ringcast(exe, cfg, dump_dir, repeats):
    cmd = [exe, "bench", "kernels", "--seq", str(cfg.seq), "--heads", str(cfg.heads),
           "--kv-heads", str(cfg.kv_heads), "--head-dim", str(cfg.head_dim), "--pattern", cfg.pattern,
           "--k", str(cfg.k), "--warmup", "3", "--repeats", str(repeats), "--dtype", "bf16"]
    if cfg.backward:
        cmd.append("--backward")
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        cmd += ["--dump", dump_dir]
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    rows = [line for line in out.stdout.splitlines() if line.startswith("csv,")]
    if out.returncode not in (0, 1) or not rows:
        raise RuntimeError(f"ringcast bench kernels failed ({out.returncode})")
    # csv,ringcast,pattern,batch,seq,heads,kv_heads,d,k,dtype,entries,pairs,fwd_ms,fwd_tf,fb_ms,fb_tf,err,check,
    # perm_ms (per-row-grouped: the clustered mode's permutations around the forward, timed alone; else nan)
    f = next(csv.reader(io.StringIO(rows[-1])))
    return {"impl": "ringcast", "entries": float(f[10]), "pairs": float(f[11]), "fwd_ms": float(f[12]),
            "fb_ms": float(f[14]), "error": float(f[16]), "check": f[17], "perm_ms": float(f[18])}


# ---- PyTorch baselines ----------------------------------------------------------------------------

def cuda_median_ms(torch, fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def time_fwd_bwd(torch, attn, q, k, v, backward, repeats):
    with torch.no_grad():
        fwd = cuda_median_ms(torch, lambda: attn(q, k, v), 3, repeats)
    fb = float("nan")
    if backward:
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        do = torch.randn_like(q)

        def step():
            out = attn(qg, kg, vg)
            out.backward(do)
            qg.grad = kg.grad = vg.grad = None

        fb = cuda_median_ms(torch, step, 3, repeats)
    return fwd, fb


def sdpa_rows(torch, cfg, repeats):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    causal = cfg.pattern == "dense-causal"
    shape = (1, cfg.heads, cfg.seq, cfg.head_dim)  # BHSD view of the same numbers
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pairs = cfg.seq * (cfg.seq + 1) / 2 if causal else float(cfg.seq) * cfg.seq
    pairs *= cfg.heads
    rows = []
    for name, backend in (("cuDNN SDPA", SDPBackend.CUDNN_ATTENTION), ("FA2 SDPA", SDPBackend.FLASH_ATTENTION)):
        def attn(q_, k_, v_, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)
        try:
            fwd, fb = time_fwd_bwd(torch, attn, q, k, v, cfg.backward, repeats)
            rows.append({"impl": name, "pairs": pairs, "fwd_ms": fwd, "fb_ms": fb})
        except RuntimeError as e:  # a backend that refuses the shape is reported, not fatal
            print(f"{name}: {e}", file=sys.stderr)
    return rows


def flex_rows(torch, np, cfg, dump_dir, repeats):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    group = cfg.heads // cfg.kv_heads
    tiles = (cfg.seq + QTILE - 1) // QTILE
    pages = np.load(os.path.join(dump_dir, "pages.npy"))  # [tiles * kv_heads, E] (batch 1), -1 padded
    pages = pages.reshape(tiles, cfg.kv_heads, -1).transpose(1, 0, 2)  # [kv_heads, tiles, E]
    # The tile's own pages need the causal mask_mod; every other listed page is fully visible to the
    # tile (random-pages) or to the rows that chose it (per-row: mask_mod looks the choice up).
    tile_first = (np.arange(tiles) * QTILE // PAGE)[None, :, None]
    valid = pages >= 0
    diagonal = valid & (pages >= tile_first)
    offdiag = valid & ~diagonal

    n_kv_blocks = (cfg.seq + PAGE - 1) // PAGE

    def pack(sel):
        # BlockMask wants kv_indices [B, H, q_blocks, kv_blocks]: the listed blocks first, then padding.
        idx = np.sort(np.where(sel, pages, np.iinfo(np.int32).max), axis=-1)
        num = sel.sum(-1).astype(np.int32)
        idx = np.where(idx == np.iinfo(np.int32).max, 0, idx).astype(np.int32)
        pad = np.zeros(idx.shape[:-1] + (n_kv_blocks - idx.shape[-1],), dtype=np.int32)
        idx = np.concatenate([idx, pad], axis=-1)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda().repeat_interleave(group, dim=0)[None]
        return t(num), t(idx)

    per_row = cfg.pattern.startswith("per-row")
    partial_num, partial_idx = pack(valid if per_row else diagonal)
    full_num, full_idx = (None, None) if per_row else pack(offdiag)

    if per_row:
        rows_sel = torch.from_numpy(np.load(os.path.join(dump_dir, "rows.npy"))).cuda()  # [kv_heads, seq, k]
        chosen = torch.zeros(cfg.kv_heads, cfg.seq, n_kv_blocks + 1, dtype=torch.bool, device="cuda")
        chosen.scatter_(2, torch.where(rows_sel < 0, n_kv_blocks, rows_sel).long(), True)

        def mask_mod(b, h, q_idx, kv_idx):
            kvh = h // group
            own_tile = (kv_idx // QTILE) == (q_idx // QTILE)
            return (q_idx >= kv_idx) & (own_tile | chosen[kvh, q_idx, kv_idx // PAGE])
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

    block_mask = BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx,
                                          BLOCK_SIZE=(QTILE, PAGE), mask_mod=mask_mod, seq_lengths=(cfg.seq, cfg.seq))
    q = torch.randn(1, cfg.heads, cfg.seq, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, cfg.kv_heads, cfg.seq, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    compiled = torch.compile(flex_attention)

    def attn(q_, k_, v_):
        return compiled(q_, k_, v_, block_mask=block_mask, enable_gqa=group > 1)

    attn(q, k, v)  # compile outside the timing
    fwd, _ = time_fwd_bwd(torch, attn, q, k, v, False, repeats)
    fb = float("nan")
    if cfg.backward:
        # Known limitation (PyTorch 2.11, H100): Inductor finds no backward tile that divides
        # 64-key KV blocks ("NoValidChoicesError"); the forward row stands, the backward is reported
        # as nan rather than losing the shape.
        try:
            qg = q.detach().requires_grad_(True)
            attn(qg, k.detach().requires_grad_(True), v.detach().requires_grad_(True)).sum().backward()
            _, fb = time_fwd_bwd(torch, attn, q, k, v, True, repeats)
        except Exception as e:
            print(f"FlexAttention backward for {cfg.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                  file=sys.stderr)
    return [{"impl": "FlexAttention", "fwd_ms": fwd, "fb_ms": fb}]


# ---- report ---------------------------------------------------------------------------------------

def tflops(row, d, key):
    ms = row.get(key, float("nan"))
    if ms is None or math.isnan(ms):
        return float("nan")
    flops = 4.0 * d * row["pairs"] * (3.5 if key == "fb_ms" else 1.0)
    return flops / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ringcast", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--repeats", type=int, default=0)
    args = ap.parse_args()
    repeats = args.repeats or (5 if args.quick else 10)
    os.makedirs(args.out, exist_ok=True)

    torch = np = None
    if not args.no_baselines:
        import numpy as np
        import torch
        assert torch.cuda.is_available(), "the baselines need a CUDA device"

    wanted = set(filter(None, args.only.split(",")))
    table = []
    for cfg in configs(args.quick):
        if wanted and cfg.name not in wanted:
            continue
        dump = os.path.join(args.out, "pages", cfg.name)
        ours = run_ringcast(args.ringcast, cfg, dump, repeats)
        rows = [ours]
        # per-row-grouped draws per-row's choices (same seed): FlexAttention's row would repeat per-row's.
        if not args.no_baselines and cfg.pattern != "per-row-grouped":
            try:
                if cfg.pattern.startswith("dense"):
                    rows += sdpa_rows(torch, cfg, repeats)
                else:
                    for r in flex_rows(torch, np, cfg, dump, repeats):
                        r["pairs"] = ours["pairs"]  # the same mask: the same attended pairs
                        rows.append(r)
                torch.cuda.empty_cache()
            except Exception as e:  # report and go on with the other shapes
                print(f"baseline for {cfg.name} failed: {e}", file=sys.stderr)
        for r in rows:
            table.append((cfg, r))

    header = ("| config | shape (n, h/h_kv, d) | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
              "| entries/tile | check |")
    lines = [header, "|" + "---|" * 9]
    for cfg, r in table:
        perm = r.get("perm_ms", float("nan"))
        impl = r["impl"] + (f" (+ {perm:.2f} ms permutations)" if not math.isnan(perm) else "")
        lines.append(f"| {cfg.name} | {cfg.seq}, {cfg.heads}/{cfg.kv_heads}, {cfg.head_dim} | {impl} "
                     f"| {r['fwd_ms']:.3f} | {tflops(r, cfg.head_dim, 'fwd_ms'):.1f} "
                     f"| {r['fb_ms']:.3f} | {tflops(r, cfg.head_dim, 'fb_ms'):.1f} "
                     f"| {r.get('entries', float('nan')):.1f} "
                     f"| {r.get('check', '')} {r.get('error', '') if 'error' in r else ''} |")
    md = "\n".join(lines)
    print(md)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "seq", "heads", "kv_heads", "head_dim", "impl", "fwd_ms", "fwd_tflops", "fb_ms",
                    "fb_tflops", "pairs", "entries", "error", "check", "perm_ms"])
        for cfg, r in table:
            w.writerow([cfg.name, cfg.seq, cfg.heads, cfg.kv_heads, cfg.head_dim, r["impl"], r["fwd_ms"],
                        tflops(r, cfg.head_dim, "fwd_ms"), r["fb_ms"], tflops(r, cfg.head_dim, "fb_ms"),
                        r["pairs"], r.get("entries", ""), r.get("error", ""), r.get("check", ""),
                        r.get("perm_ms", "")])
    with open(os.path.join(args.out, "env.txt"), "w") as f:
        f.write(f"host: {platform.node()}\npython: {sys.version.split()[0]}\ncommand: {' '.join(sys.argv)}\n")
        if torch is not None:
            f.write(f"torch: {torch.__version__} cuda {torch.version.cuda}\n"
                    f"gpu: {torch.cuda.get_device_name()}\n")
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        f.write(f"nvidia-smi: {smi.stdout.strip()}\n")
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        f.write(f"commit: {git.stdout.strip() or 'unknown'}\n")
    return 1 if any(r.get("check") == "WRONG" for _, r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
