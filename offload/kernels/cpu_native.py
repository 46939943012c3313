"""Our own cpu int4 decode matmul (cpu_int4_avx.cpp), built on first use, and its weight layout.

The kernel quantizes each activation row to int8 per 32 columns and takes integer dot products with the
int4 weights (llama.cpp's Q4_0 x Q8_0 arithmetic; the C++ file documents the layout and the formula). It is
registered as the torch op `offload_native::int4_mm`, with a fake implementation, so torch.compile traces it
as one node. It serves M <= MAX_M rows of x; more rows (prefill) dequantize into fp32 and use BLAS.
`offload_native::int8_mm` does the same for the int8 format (the output projection with `--lm-head int8`),
straight from the stored layout: one pass over its bytes instead of one PyTorch int8 call per column block.

Built with torch.utils.cpp_extension (-O3 -march=native) into <offload cache>/ext/<key>, key = hash of the
source, torch version and cpu flags. Without a compiler or on a cpu without AVX2/FMA (one warning line), or
with OFFLOAD_CPU_KERNEL=torch, `available()` is False and the engine keeps PyTorch's int4 op
(offload.kernels.cpu_int4).
"""
import functools
import hashlib
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import quant

ENV = "OFFLOAD_CPU_KERNEL"  # "native" (default) or "torch": PyTorch's int4 op, for comparison
SOURCE = Path(__file__).with_name("cpu_int4_avx.cpp")
QK = 32  # columns per activation scale
CHUNK = 64  # columns per 32 bytes of weight
PACKED_ZERO = 0x88  # two nibbles of q = 0
MAX_M = 8  # rows of x up to which the kernel beats dequantize + BLAS (see benchmarks/bench_cpu_int4.py)
REQUIRED_FLAGS = ("avx2", "fma")
NAME = "offload_native"  # the library, and the namespace of its op


def cpu_flags() -> set[str]:
    """The flags of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _build_dir(flags: set[str]) -> Path:
    from ..demo import cache_root
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(sorted(flags)).encode())
    return cache_root() / "ext" / key.hexdigest()[:16]


def _build() -> None:
    """Compile (once per key) and load the library; raises what cpp_extension raises on a failed build."""
    from torch.utils import cpp_extension
    build_dir = _build_dir(cpu_flags())
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not (build_dir / f"{NAME}.so").exists()
    if fresh:
        print("offload: building the cpu kernel (once, ~30 s)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(build_dir), is_python_module=False,
                       extra_cflags=["-O3", "-march=native"], verbose=False)
    if fresh:
        print(f"offload: built the cpu kernel in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def _loaded() -> bool:
    """Build and load the kernel once per process; False (with one warning) where it cannot run."""
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        warnings.warn(f"offload: no native cpu kernel (the cpu lacks {', '.join(missing)}); using PyTorch's int4 op",
                      RuntimeWarning, stacklevel=3)
        return False
    try:
        _build()
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:  # no compiler, no ninja, ...
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        warnings.warn(f"offload: the native cpu kernel did not build ({first}); using PyTorch's int4 op",
                      RuntimeWarning, stacklevel=3)
        return False
    _register_fake()
    _op()  # resolved here, outside any trace: a first resolution inside torch.compile would recompile the step
    return True


@functools.lru_cache(maxsize=None)
def _register_fake() -> None:
    """Shapes for torch.compile's tracing (once per process: a second registration is an error)."""
    def shape(x, w, scales, in_features):
        return x.new_empty(x.shape[0], w.shape[0])  # [M, N] in x.dtype

    torch.library.register_fake(f"{NAME}::int4_mm")(shape)
    torch.library.register_fake(f"{NAME}::int8_mm")(shape)
    torch.library.register_fake(f"{NAME}::decode_attention")(lambda q, k, v, mask, scale: torch.empty_like(q))


def available() -> bool:
    """True when the native kernel is wanted (OFFLOAD_CPU_KERNEL) and runs here (AVX2 + FMA, and it built)."""
    choice = os.environ.get(ENV, "native")
    if choice not in ("native", "torch"):
        raise ValueError(f"{ENV}={choice!r}: choose native or torch")
    return choice == "native" and _loaded()


_OVERLOAD = []  # the op's overload once resolved (a plain global: torch.compile traces it, not an lru_cache)


def _op():
    """The op's overload, resolved once: calling it skips the packet's overload lookup (~2 us per call)."""
    if not _OVERLOAD:
        _OVERLOAD.append(torch.ops.offload_native.int4_mm.default)
    return _OVERLOAD[0]


def native_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [M, K] (bf16 or fp32, M <= MAX_M) @ (qweight int8 [N, Kp] * scales bf16 [N, Kp / block])[:, :K].T
    -> [M, N] in x.dtype, x quantized to int8 per 32 columns as for int4_mm."""
    return torch.ops.offload_native.int8_mm.default(x if x.is_contiguous() else x.contiguous(), qweight, scales,
                                                     in_features)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One query position: q [B, H, D] against k/v [B, Hk, T, D] (H a multiple of Hk), positions where
    mask bool [B, T] is set (all if None) -> [B, H, D] in q's dtype, computed in fp32 over the positions up to
    the last one set (a static cache's empty tail is not read)."""
    return torch.ops.offload_native.decode_attention.default(q, k, v, mask, scale)


@dataclass(frozen=True)
class NativeInt4Weight:
    """A weight in the kernel's layout (`repack`): `w` uint8 [N, Kq/2], `scales` bf16 [N, Kq/block],
    `in_features` K."""

    w: torch.Tensor
    scales: torch.Tensor
    in_features: int


def padded_k(kp: int) -> int:
    """Kq: the stored K (a multiple of the block) padded to the kernel's 64-column chunks."""
    return -(-kp // CHUNK) * CHUNK


def supported_block(block: int) -> bool:
    return block == QK or block % CHUNK == 0


def repack(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 (packed uint8 [N, Kp/2]: byte j = columns 2j, 2j+1; scales bf16 [N, Kp/block]) -> the
    kernel's (uint8 [N, Kq/2]: per 64 columns, byte j = column j (low nibble) | column j + 32 (high);
    scales bf16 [N, Kq/block], zero for the padding)."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    block = kp // scales.shape[1]
    if not supported_block(block):
        raise ValueError(f"block size {block} is not supported by the native kernel (32 or a multiple of 64)")
    kq = padded_k(kp)
    packed = F.pad(packed, (0, (kq - kp) // 2), value=PACKED_ZERO)  # [N, Kq/2]
    scales = F.pad(scales, (0, (kq - kp) // block))  # [N, Kq/block]
    u = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(n, kq // CHUNK, 2, CHUNK // 2)  # u[n, c, half, j]
    return (u[:, :, 0] | (u[:, :, 1] << 4)).view(n, kq // 2), scales.contiguous()


def unpack(w: torch.Tensor) -> torch.Tensor:
    """The kernel's order uint8 [N, Kq/2] -> int8 q [N, Kq] in [-8, 7] (inverse of `repack`'s reorder)."""
    n, kq = w.shape[0], w.shape[1] * 2
    chunks = w.view(n, kq // CHUNK, CHUNK // 2)
    u = torch.cat((chunks & 0x0F, chunks >> 4), dim=-1)  # [N, Kq/64, 64]
    return u.view(n, kq).to(torch.int8) - 8


def nbytes(shape, block: int) -> tuple[int, int]:
    """(weight bytes, scale bytes) of the kernel's layout of an [N, K] matrix with blocks of `block`."""
    n, k = shape
    kq = padded_k(quant.padded_k(k, block))
    return n * kq // 2, n * (kq // block) * 2


def _dequant_matmul(x: torch.Tensor, w: NativeInt4Weight) -> torch.Tensor:
    """x fp32 [M, K] -> fp32 [M, N]: row chunks of W dequantized into the shared fp32 scratch, then BLAS."""
    from .cpu_int4 import SCRATCH_ELEMS, _scratch_view
    n, kq, k = w.w.shape[0], w.w.shape[1] * 2, w.in_features
    block = kq // w.scales.shape[1]
    rows = max(1, SCRATCH_ELEMS // kq)
    out = torch.empty(x.shape[0], n)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        wf = _scratch_view((r1 - r0, kq))  # fp32 [rows, Kq]
        wf.copy_(unpack(w.w[r0:r1]))
        wf.view(r1 - r0, kq // block, block).mul_(w.scales[r0:r1].float().unsqueeze(-1))
        out[:, r0:r1] = x @ wf[:, :k].T
    return out


def native_int4_linear(x: torch.Tensor, w: NativeInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [..., K] (bf16 or fp32) -> [..., N] in x.dtype: the kernel for up to MAX_M
    rows of x, dequantize + fp32 BLAS above."""
    k, n = w.in_features, w.w.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    # Each step is skipped when it has nothing to do: at M=1 a call on a small matrix takes ~10 us and every
    # extra tensor op ~1 us.
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # [M, K]
    if x2.shape[0] <= MAX_M and x2.dtype in (torch.bfloat16, torch.float32):
        y = _op()(x2 if x2.is_contiguous() else x2.contiguous(), w.w, w.scales, k)  # [M, N], x.dtype
    else:
        y = _dequant_matmul(x2.float(), w)  # fp32 [M, N]
    if bias is not None:
        y = y + bias
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
