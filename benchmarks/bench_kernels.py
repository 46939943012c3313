"""GPU roofline benchmark of the int4 kernels on Qwen2.5-32B weight shapes.

For each weight (N x K) and activation rows M, three ways to compute y = x @ W.T in bf16:
  bf16 linear     F.linear on a bf16 copy of the weight (cuBLAS; reads 2 B/param)
  dequant+linear  offload.kernels.dequantize into a bf16 buffer, then F.linear
  fused int4      offload.kernels.int4_linear (gemv for M <= 16, gemm above)
and for the output projection also
  fused int8      offload.kernels.int8_linear on the int8 format of `--lm-head int8` (the default)
Times are CUDA-event medians with L2 flushed before every call (the engine streams weights, so
nothing is hot in L2), after warm-up calls that also run the autotuner. GB/s is the int4 bytes of
the weight (packed + scales) divided by the time, for every column, so columns compare as "how fast
would this read our int4 matrix" (the int8 row: its own int8 bytes + scales); frac_bw divides that by
the measured device-to-device copy bandwidth (bytes read + written). TFLOP/s is 2*M*N*K / time.

    python benchmarks/bench_kernels.py [--m 1 4 16 256 2048] [--reps 50] [--block-size 32|64|128]
Prints a table and writes benchmarks/results/<device-name>-kernels.csv (-kernels-b<block>.csv for a block
size other than 128). Decode is memory-bound, so at a given share of the bandwidth a block size's decode
speed is inversely proportional to its bytes per weight (4 + 16 / block bits): the int4 GB/s column
compares block sizes directly.
"""
import argparse
import csv
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from offload import quant

LM_HEAD = "lm_head 152064x5120"
SHAPES = {  # name: (N, K)
    "attn_o 5120x5120": (5120, 5120),
    "attn_kv 1024x5120": (1024, 5120),
    "mlp_up 27648x5120": (27648, 5120),
    "mlp_down 5120x27648": (5120, 27648),
    LM_HEAD: (152064, 5120),
}
MLP_SHAPES = ("mlp_up 27648x5120", "mlp_down 5120x27648")
L2_FLUSH_BYTES = 256 << 20


def time_us(fn, reps: int, flush: torch.Tensor) -> float:
    """Median microseconds of fn() over `reps` calls, each timed alone with CUDA events after an L2 flush."""
    for _ in range(3):  # warm-up: compiles and autotunes outside the timed region
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth(reps: int, flush: torch.Tensor) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second, on 1 GiB."""
    src = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), reps, flush)
    del src, dst
    return 2 * (1 << 30) / (us * 1e-6)


def random_int4(n: int, k: int, block: int):
    """packed uint8 [N, K/2] of random bytes and positive bf16 scales [N, K/block]: no zero weights."""
    from offload.kernels import dequantize

    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n, k // block, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    return packed, scales, dequantize(packed, scales, k, dtype=torch.bfloat16)


HEADER = f"{'shape':22s} {'M':>5s} {'impl':15s} {'us':>10s} {'int4 GB/s':>10s} {'frac_bw':>8s} " \
         f"{'TFLOP/s':>8s} {'vs bf16':>8s} {'rel err':>9s}"


def print_row(r):
    print(f"{r['shape']:22s} {r['M']:5d} {r['impl']:15s} {r['us']:10.1f} {r['int4_GBps']:10.0f} "
          f"{r['frac_bw']:8.2f} {r['TFLOPs']:8.1f} {r['speedup_vs_bf16']:7.2f}x {r['max_rel_err']:>9s}")


def random_int8(n: int, k: int, block: int):
    """int8 [N, K] of random values in [-127, 127] and positive bf16 scales [N, K/block]."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    return q, (torch.rand(n, k // block, device="cuda") * 0.001 + 0.0001).to(torch.bfloat16)


def run(ms, reps, block=128):
    from offload.kernels import dequantize, int4_linear, int8_linear

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    copy_bw = copy_bandwidth(reps, flush)
    print(f"device: {torch.cuda.get_device_name()}   measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s   "
          f"block size {block}")
    print(HEADER)
    rows = []
    for name, (n, k) in SHAPES.items():
        packed, scales, w_bf16 = random_int4(n, k, block)
        int4_bytes = packed.numel() + 2 * scales.numel()
        scratch = torch.empty_like(w_bf16)
        int8_weight = random_int8(n, k, block) if name == LM_HEAD else None
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w_bf16).float()
            err = ((int4_linear(x, packed, scales, k).float() - ref).abs().max() / ref.abs().max()).item()
            impls = {
                "bf16 linear": lambda: F.linear(x, w_bf16),
                "dequant+linear": lambda: F.linear(x, dequantize(packed, scales, k, out=scratch)),
                "fused int4": lambda: int4_linear(x, packed, scales, k),
            }
            weight_bytes = dict.fromkeys(impls, int4_bytes)
            if int8_weight is not None:
                impls["fused int8"] = lambda: int8_linear(x, *int8_weight, k)
                weight_bytes["fused int8"] = int8_weight[0].numel() + 2 * int8_weight[1].numel()
            times = {impl: time_us(fn, reps, flush) for impl, fn in impls.items()}
            for impl, us in times.items():
                gbps = weight_bytes[impl] / (us * 1e-6) / 1e9
                rows.append({
                    "shape": name, "N": n, "K": k, "M": m, "block": block, "impl": impl, "us": round(us, 2),
                    "int4_GBps": round(gbps, 1), "frac_bw": round(gbps * 1e9 / copy_bw, 3),
                    "TFLOPs": round(2 * m * n * k / (us * 1e-6) / 1e12, 2),
                    "speedup_vs_bf16": round(times["bf16 linear"] / us, 2),
                    "max_rel_err": f"{err:.2e}" if impl == "fused int4" else "",
                })
                print_row(rows[-1])
        del packed, scales, w_bf16, scratch, int8_weight
        torch.cuda.empty_cache()
    return rows, copy_bw


def check_targets(rows):
    """The kernel targets (benchmarks/README.md), where this run measured the rows they need."""
    fused = {(r["shape"], r["M"]): r for r in rows if r["impl"] == "fused int4"}
    checks = []
    for shape in MLP_SHAPES:
        if (shape, 1) in fused:
            r = fused[(shape, 1)]
            checks.append((f"{shape} M=1 >= 70% of copy bandwidth", r["frac_bw"] >= 0.70, r["frac_bw"]))
            checks.append((f"{shape} M=1 >= 3x bf16 F.linear", r["speedup_vs_bf16"] >= 3, r["speedup_vs_bf16"]))
    for (shape, m), r in fused.items():
        if m == 16:
            checks.append((f"{shape} M=16 >= 2.5x bf16 F.linear", r["speedup_vs_bf16"] >= 2.5, r["speedup_vs_bf16"]))
        if m == 2048:
            checks.append((f"{shape} M=2048 >= 0.7x bf16 cuBLAS", r["speedup_vs_bf16"] >= 0.7, r["speedup_vs_bf16"]))
    print("\ntargets:")
    for label, ok, value in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}  (measured {value})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 256, 2048], help="activation rows")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--block-size", type=int, default=128, choices=quant.BLOCK_SIZES,
                        help="elements per scale of the int4 and int8 weights (default 128)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/<device>-kernels.csv)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark times GPU kernels; nothing to do on cpu")
        return 2
    if min(args.m) < 1 or args.reps < 1:
        parser.error("--m and --reps must be positive")

    rows, copy_bw = run(args.m, args.reps, args.block_size)
    check_targets(rows)
    device = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    suffix = "" if args.block_size == 128 else f"-b{args.block_size}"
    out = args.out or Path(__file__).resolve().parent / "results" / f"{device}-kernels{suffix}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "copy_GBps", *rows[0].keys()])
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": torch.cuda.get_device_name(), "copy_GBps": round(copy_bw / 1e9, 1), **r})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
