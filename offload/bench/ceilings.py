"""Measured machine ceilings for the physical-limit columns of the sweep.

    python -m offload.bench.ceilings [--device cpu|cuda] [--mib 1024]

- h2d_bytes_per_s: bytes copied per second host -> device. cuda: a page-locked host tensor copied into
  device memory with non_blocking=True, timed with CUDA events. cpu: the engine's "copy into the cache"
  is a memcpy, so this is a plain memcpy of a buffer far larger than the caches (bytes copied / s).
- mem_bytes_per_s: device memory bandwidth, counted as read + write bytes per second of a large copy
  (cuda: device-to-device copy timed with CUDA events; cpu: the same memcpy as above, 2 x bytes / s).
  The matmuls of a decode step read every weight byte once; a copy's read+write rate is the usual
  stand-in for the achievable read rate (STREAM "copy" convention).
Each ceiling is the best of several timed repetitions after a warm-up (a ceiling, not a typical run).
"""
import argparse
import time

import torch


def _best(times: list[float]) -> float:
    return min(times)


def measure(device, nbytes: int | None = None, reps: int = 5) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(device, nbytes or (1 << 30), reps)
    return _measure_cpu(nbytes or (256 << 20), reps)


def _measure_cuda(device, nbytes: int, reps: int) -> dict:
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = max(1 << 20, min(nbytes, free // 4))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stream = torch.cuda.current_stream(device)

    def timed(fn) -> float:
        fn()  # warm-up
        torch.cuda.synchronize(device)
        out = []
        for _ in range(reps):
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return _best(out)

    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = timed(lambda: host.copy_(dev, non_blocking=True))
    d2d = timed(lambda: dev2.copy_(dev))
    del host, dev, dev2
    torch.cuda.empty_cache()
    return {
        "device": str(device), "name": torch.cuda.get_device_name(device), "buffer_bytes": nbytes,
        "h2d_bytes_per_s": nbytes / h2d, "d2h_bytes_per_s": nbytes / d2h,
        "mem_bytes_per_s": 2 * nbytes / d2d,
        "h2d_method": "page-locked host -> device copy_(non_blocking), CUDA events, bytes copied / s",
        "mem_method": "device -> device copy, CUDA events, (read + write) bytes / s",
    }


def _measure_cpu(nbytes: int, reps: int) -> dict:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up, faults the pages in
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    best = _best(times)
    return {
        "device": "cpu", "name": "cpu", "buffer_bytes": nbytes, "threads": torch.get_num_threads(),
        "h2d_bytes_per_s": nbytes / best, "mem_bytes_per_s": 2 * nbytes / best,
        "h2d_method": f"memcpy of {nbytes >> 20} MiB (torch copy_, {torch.get_num_threads()} threads), bytes copied / s",
        "mem_method": "the same memcpy, (read + write) bytes / s",
    }


def limit_tokens_per_s(batch: int, streamed_bytes_per_step: float, read_bytes_per_step: float, ceilings: dict) -> float:
    """Decode tokens/s bound: batch / max(streamed / h2d_bw, read / mem_bw) (one step makes `batch` tokens)."""
    t = max(streamed_bytes_per_step / ceilings["h2d_bytes_per_s"], read_bytes_per_step / ceilings["mem_bytes_per_s"])
    return batch / t if t > 0 else float("inf")


def describe(c: dict) -> str:
    return (f"ceilings on {c['name']}: h2d {c['h2d_bytes_per_s'] / 1e9:.2f} GB/s ({c['h2d_method']}); "
            f"memory {c['mem_bytes_per_s'] / 1e9:.2f} GB/s ({c['mem_method']})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mib", type=int, default=None, help="buffer size (default 1024 MiB on cuda, 256 MiB on cpu)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    c = measure(args.device, args.mib << 20 if args.mib else None, args.reps)
    print(describe(c))
    if "d2h_bytes_per_s" in c:
        print(f"d2h {c['d2h_bytes_per_s'] / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
