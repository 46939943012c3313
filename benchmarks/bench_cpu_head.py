"""The demo's int8 output projection shape (49152 x 576) on cpu, 1 thread: our native int8 kernel vs PyTorch's int8
op called per column block, at block 128 and 32. Random weights; median of 5 rounds of 40 calls.

    python benchmarks/bench_cpu_head.py
"""
import statistics
import time

import torch

from offload import quant
from offload.kernels import cpu_int8, cpu_native
torch.set_num_threads(1)
assert cpu_native.available()
g = torch.Generator().manual_seed(0)
w = torch.randn(49152, 576, generator=g) * 0.05
for block in (128, 32):
    q, s = quant.quantize_int8(w, block)
    blocks = cpu_int8.repack(q, s)
    x = torch.randn(1, 576, generator=g).bfloat16()
    fns = {"native": lambda: cpu_native.native_int8_linear(x, q, s, 576), "aten": lambda: cpu_int8.cpu_int8_linear(x, *blocks, 576)}
    res = {k: [] for k in fns}
    for _ in range(5):
        for k, fn in fns.items():
            for _ in range(3): fn()
            t = time.perf_counter()
            for _ in range(40): fn()
            res[k].append((time.perf_counter() - t) / 40 * 1e3)
    print(f"block {block}: " + ", ".join(f"{k} {statistics.median(v):.2f} ms (min {min(v):.2f})" for k, v in res.items()),
          f"bytes {q.numel() + s.numel()*2} -> native {(q.numel() + s.numel()*2) / statistics.median(res['native']) / 1e6:.1f} GB/s")
