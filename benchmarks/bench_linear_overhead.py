"""Host time of one offloaded linear call on cpu, by path: the bare matmul, a bound matrix (pin's
resident set, zero-copy), and a matrix served through the prefetcher's acquire/release. The matrix
is small (64 x 64) so the figure is the Python/lock overhead, not the arithmetic.

    python benchmarks/bench_linear_overhead.py [--calls 20000] [--threads 1]
"""
import argparse
import time

import torch

from offload import quant
from offload.cache import DeviceCache, parse_budget
from offload.formats import make_format
from offload.host import HostStore
from offload.modules import OffloadedLinear
from offload.prefetch import Prefetcher


def per_call_us(fn, calls: int) -> float:
    for _ in range(calls // 10):  # warm-up
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device, dtype, n = torch.device("cpu"), torch.bfloat16, 64
    fmt = make_format("int4", quant.BLOCK_SIZE, device, dtype)
    packed, scales = quant.quantize(torch.randn(n, n))
    store = HostStore({"w": (n, n)}, quant.BLOCK_SIZE, pin=False, host_nbytes=getattr(fmt, "host_nbytes", None))
    fmt.write_host(store.raw("w"), packed, scales, (n, n))
    sizes = {"w": fmt.slot_nbytes(store.entries["w"])}
    x = torch.randn(1, 1, n, dtype=dtype)
    data = fmt.materialize(store.raw("w"), store.entries["w"])
    rows = [("bare matmul (fmt.linear)", lambda: fmt.linear(x, data, None))]
    with torch.inference_mode():
        for label, zero_copy in (("bound (resident / zero-copy)", True), ("acquire/release (streamed)", False)):
            pre = Prefetcher(DeviceCache(sizes, parse_budget("full", sizes), "lru"), store, fmt, device, zero_copy)
            lin = OffloadedLinear("w", n, n, False, pre)
            pre.begin_pass()
            lin(x)
            pre.end_pass()  # the recorded order starts the prefetch thread, as after a first forward
            rows.append((label, lambda lin=lin: lin(x)))
        print(f"cpu, {a.threads} thread(s), {dtype}, [{n} x {n}] int4 ({type(fmt).__name__}), M=1, {a.calls} calls")
        base = None
        for label, fn in rows:
            us = per_call_us(fn, a.calls)
            base = us if base is None else base
            print(f"  {label:30s} {us:8.1f} us/call  (+{us - base:.1f} us over the bare matmul)")
        pre.close()


if __name__ == "__main__":
    main()
