"""Micro-benchmark of the CPU int4 matmul (offload.kernels.cpu_int4) on SmolLM2-135M weight shapes.

--native: PyTorch's int4 op against our native kernel (offload.kernels.cpu_native), per matrix of the demo's
decode step (fused q/k/v and gate/up included), hot and cold, interleaved in one process; min and median.
--decode: the whole demo decode (64 greedy tokens), engines with each kernel loaded side by side, interleaved.

Decode (M=1): fp32 F.linear, bf16 F.linear, reference dequantize + fp32 F.linear, and the fast path.
GB/s is the int4 bytes of the weight (packed + bf16 scales) divided by the time, for every column, so the
columns compare as "how fast would this read our int4 matrix". Prefill (M > 1): the two fast-path options,
int4 kernel vs dequantize into scratch + fp32 BLAS, which sets cpu_int4.PREFILL_MIN_M.

    python benchmarks/bench_cpu_int4.py [--prefill-m 8 16 32 64 128] [--threads 2]
    python benchmarks/bench_cpu_int4.py --native [--decode] [--reps 7] [--threads 1]
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from offload import quant
from offload.kernels import cpu_int4, cpu_native

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N, K)
# the int4 products of one demo decode layer as the engine runs them: q/k/v and gate/up fused
DECODE_SHAPES = {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536)}
COLD_BYTES = 96 << 20  # 3x the 32 MiB L3 of the machine measured


def bench_us(fn, min_time=0.02, rounds=9) -> float:
    """Best over `rounds` windows of the mean time per call (robust to a shared, noisy machine)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time:
            fn()
            calls += 1
        best = min(best, elapsed / calls)
    return best * 1e6


def weights(n: int, k: int):
    """(fp32 weight [N, K], packed uint8 [N, Kp/2], scales bf16 [N, Kp/128])."""
    w = torch.randn(n, k) * 0.02
    return (w, *quant.quantize(w))


def cycling(fn, items):
    """A call that runs fn on the next item each time, so a pool larger than the L3 cache streams from RAM."""
    it = iter(())

    def call():
        nonlocal it
        item = next(it, None)
        if item is None:
            it = iter(items)
            item = next(it)
        return fn(item)
    return call


def decode_table() -> None:
    print("\nDecode, M=1: microseconds (GB/s on the int4 bytes). hot: one matrix, cache-resident when it fits;")
    print(f"cold: a pool of copies >= {COLD_BYTES >> 20} MiB per format, cycled, so weights come from RAM "
          "as in a real decode")
    cols = ["fp32 linear", "bf16 linear", "ref dequant+linear", "fast int4", "fp32 cold", "fast int4 cold"]
    print(f"{'N x K':>12} " + " ".join(f"{c:>18}" for c in cols))
    for n, k in SHAPES:
        w, packed, scales = weights(n, k)
        cw = cpu_int4.repack_for_cpu(packed, scales, k)
        x = torch.randn(1, k)
        xb, wb = x.bfloat16(), w.bfloat16()
        cold_fp32 = [w.clone() for _ in range(max(2, COLD_BYTES // w.nbytes))]
        cold_int4 = [cpu_int4.repack_for_cpu(packed, scales, k) for _ in range(max(2, COLD_BYTES // cw.nbytes))]
        fns = [
            lambda: F.linear(x, w),
            lambda: F.linear(xb, wb),
            lambda: F.linear(x, quant.dequantize(packed, scales, (n, k))),
            lambda: cpu_int4.cpu_int4_linear(xb, cw),
            cycling(lambda wc: F.linear(x, wc), cold_fp32),
            cycling(lambda wc: cpu_int4.cpu_int4_linear(xb, wc), cold_int4),
        ]
        int4_bytes = sum(quant.quantized_nbytes((n, k)))
        cells = []
        for fn in fns:
            us = bench_us(fn)
            cells.append(f"{us:8.1f} ({int4_bytes / us / 1e3:5.2f})")
        del cold_fp32, cold_int4
        print(f"{n:>6} x {k:<4} " + " ".join(f"{c:>18}" for c in cells))


def prefill_table(ms: list[int]) -> None:
    print("\nPrefill: microseconds, int4 kernel (bf16) / dequant into scratch + fp32 BLAS, and fp32 F.linear")
    print(f"{'N x K':>12} " + " ".join(f"{'M=' + str(m):>22}" for m in ms))
    default = cpu_int4.PREFILL_MIN_M
    for n, k in SHAPES[:-1]:  # the 49152-row lm_head sees M=1 in generate (only the last position's logits)
        w, packed, scales = weights(n, k)
        cw = cpu_int4.repack_for_cpu(packed, scales, k)
        cells = []
        for m in ms:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            cpu_int4.PREFILL_MIN_M = 1 << 30
            kernel = bench_us(lambda: cpu_int4.cpu_int4_linear(xb, cw))
            cpu_int4.PREFILL_MIN_M = 1
            dequant = bench_us(lambda: cpu_int4.cpu_int4_linear(xb, cw))
            fp32 = bench_us(lambda: F.linear(x, w))
            cells.append(f"{kernel:.0f}/{dequant:.0f}/{fp32:.0f}")
        cpu_int4.PREFILL_MIN_M = default
        print(f"{n:>6} x {k:<4} " + " ".join(f"{c:>22}" for c in cells))


def timed_rounds(fns: dict, rounds: int) -> dict:
    """name -> seconds per call of each round; the fns run in turn within every round (noise hits them alike)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < 0.05 or calls < 3:
                fn()
                calls += 1
            times[name].append(elapsed / calls)
    return times


def native_table(rounds: int) -> None:
    print(f"\nDecode products, M=1: PyTorch's int4 op vs the native kernel, microseconds min/median of {rounds} "
          f"interleaved rounds (GB/s of int4 bytes at the min). cold: a pool of copies >= {COLD_BYTES >> 20} MiB, "
          "cycled, so weights come from RAM as in a real decode")
    print(f"{'':>8} {'N x K':>11} " + " ".join(f"{c:>22}" for c in ("torch op", "native", "torch op cold",
                                                                      "native cold")) + f" {'cold speedup':>13}")
    for name, (n, k) in DECODE_SHAPES.items():
        _, packed, scales = weights(n, k)
        int4_bytes = sum(quant.quantized_nbytes((n, k)))
        copies = max(2, COLD_BYTES // int4_bytes)
        ours = [cpu_native.NativeInt4Weight(*cpu_native.repack(packed, scales), k) for _ in range(copies)]
        theirs = [cpu_int4.repack_for_cpu(packed, scales, k) for _ in range(copies)]
        x = torch.randn(1, k).bfloat16()
        times = timed_rounds({
            "torch": lambda: cpu_int4.cpu_int4_linear(x, theirs[0]),
            "native": lambda: cpu_native.native_int4_linear(x, ours[0]),
            "torch cold": cycling(lambda w: cpu_int4.cpu_int4_linear(x, w), theirs),
            "native cold": cycling(lambda w: cpu_native.native_int4_linear(x, w), ours),
        }, rounds)
        cells = [f"{min(t) * 1e6:6.1f}/{statistics.median(t) * 1e6:6.1f} ({int4_bytes / min(t) / 1e9:4.1f})"
                 for t in times.values()]
        speedup = statistics.median(times["torch cold"]) / statistics.median(times["native cold"])
        print(f"{name:>8} {n:>5} x {k:<4} " + " ".join(f"{c:>22}" for c in cells) + f" {speedup:12.2f}x")


def native_prefill_table(ms: list[int], rounds: int) -> None:
    print(f"\nM rows on the native layout: kernel / dequantize + fp32 BLAS, microseconds (median of {rounds}); "
          f"cpu_native.MAX_M = {cpu_native.MAX_M}")
    print(f"{'N x K':>12} " + " ".join(f"{'M=' + str(m):>14}" for m in ms))
    for n, k in DECODE_SHAPES.values():
        _, packed, scales = weights(n, k)
        w = cpu_native.NativeInt4Weight(*cpu_native.repack(packed, scales), k)
        cells = []
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            times = timed_rounds({"kernel": lambda: torch.ops.offload_native.int4_mm(x, w.w, w.scales, k),
                                  "dequant": lambda: cpu_native._dequant_matmul(x.float(), w)}, rounds)
            cells.append("/".join(f"{statistics.median(t) * 1e6:.0f}" for t in times.values()))
        print(f"{n:>6} x {k:<4} " + " ".join(f"{c:>14}" for c in cells))


def decode_comparison(reps: int, new_tokens: int = 64) -> None:
    """The demo's decode with each kernel (engines loaded side by side: OFFLOAD_CPU_KERNEL at load time)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cpu import PROMPT, decode_tokens_per_s

    import offload
    from offload import demo
    model_dir, weights_dir = demo.prepare()
    engines = {}
    for kernel in ("torch", "native"):
        os.environ[cpu_native.ENV] = kernel
        engines[kernel] = offload.load(model_dir, weights_dir, cache="full", device="cpu", dtype=torch.bfloat16,
                                       progress=False, threads=torch.get_num_threads())
    os.environ.pop(cpu_native.ENV)
    ids = engines["native"].encode(PROMPT, chat=True)["input_ids"]
    speeds = {kernel: [] for kernel in engines}
    for e in engines.values():
        decode_tokens_per_s(e.model, ids, 4)  # warm-up
    for _ in range(reps):
        for kernel, e in engines.items():
            speeds[kernel].append(decode_tokens_per_s(e.model, ids, new_tokens))
    print(f"\nDemo decode, {new_tokens} greedy tokens, {torch.get_num_threads()} threads, {reps} interleaved runs: "
          "tokens/s max / median (ms per token at the median)")
    for kernel, v in speeds.items():
        fmt = type(engines[kernel].fmt).__name__
        print(f"  {kernel:>6} ({fmt}): {max(v):6.1f} / {statistics.median(v):6.1f} tok/s "
              f"({1e3 / statistics.median(v):5.1f} ms)")
    for e in engines.values():
        e.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-m", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--native", action="store_true", help="PyTorch's op vs the native kernel (only)")
    parser.add_argument("--decode", action="store_true", help="with --native: also the whole demo decode")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds of --native / --decode")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"fast op available: {cpu_int4.cpu_int4_available()}, packed block rows: {cpu_int4._layout()}, "
          f"native kernel: {cpu_native.available()}, load average {os.getloadavg()[0]:.1f}")
    if args.native:
        native_table(args.reps)
        native_prefill_table(args.prefill_m, 3)
        if args.decode:
            decode_comparison(args.reps)
        return
    packed, scales = quant.quantize(torch.randn(1536, 576))
    cw = cpu_int4.repack_for_cpu(packed, scales, 576)
    repack_us = bench_us(lambda: cpu_int4.repack_for_cpu(packed, scales, 576))
    print(f"repack 1536x576: {repack_us:.0f} us; repacked bytes {cw.nbytes} "
          f"(int4 format: {packed.nbytes + scales.nbytes})")
    decode_table()
    prefill_table(args.prefill_m)


if __name__ == "__main__":
    main()
