"""Fast int4 matmul on CPU through PyTorch's tinygemm-style kernel (`aten::_weight_int4pack_mm_for_cpu`).

How our format maps onto the op (checked against the op with asymmetric patterns in tests/test_cpu_int4.py;
timings below: 2-core AMD EPYC with AVX2, torch 2.13, 2 threads, in a quiet moment):
  * Values: the op takes an unsigned nibble u in [0, 15] and computes w = (u - 8) * scale + zero. Our stored
    nibble is already u = q + 8, so nibbles copy over unchanged, scale is our bf16 scale, and zero is 0.
    The dequantized value is exact: (u - 8) * scale fits a float32 mantissa.
  * scales_and_zeros: [K / group, N, 2] in the activation dtype, last dim (scale, zero). It must be bf16 for
    the vectorized kernel: fp32/fp16 inputs run a scalar loop, ~12x slower (1051 vs 89 us, 1536x576, M=1).
  * Group size must be 32, 64, 128 or 256 and divide K. Our 128-blocks can be expressed as any smaller group
    by repeating each scale, so we pick the largest group dividing both the block and K rounded up to 32.
    Padding K is not free (1536x576 at M=1: 67 us with group 64 on K=576, 74 us with group 128 on K=640),
    and the group itself costs nothing measurable (576x1536: 66-67 us for every group size).
  * The op needs N % 16 == 0 and K even. We pad N to a multiple of 64 (zero-scale rows, cropped from the
    output) so that every block of the packed weight is full on both the AVX2 (32-row) and AVX512 (64-row)
    layouts, and K to a multiple of 32 (q = 0 columns; the activation is zero-padded to match).
  * Packed order (machine-specific, never serialize it): [N / BN, K, BN / 2] bytes, BN = 32 (AVX2) or 64
    (AVX512); byte j of row k in a block holds row j (low nibble) and row j + BN / 2 (high nibble) at column k.
    `_layout()` confirms this against the op once per process. We then pack with uint8 ops (~3x faster than
    the op's int32 input path: 0.57 vs 1.7 ms for 1536x576) and can dequantize for prefill. On any other
    layout we pack through the op and always use the int4 kernel.
"""
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import quant

_GROUP_SIZES = (256, 128, 64, 32)
_N_ALIGN = 64
_K_ALIGN = 32
_PACKED_ZERO = 0x88  # two nibbles of q = 0

# From this M on, dequantizing into a scratch buffer and using fp32 BLAS beats the int4 kernel, whose cost grows
# linearly in M (it re-dequantizes W for every 4 rows of x) while the dequant is paid once per call.
# Measured on a 2-core x86 CPU (AMD EPYC, AVX2, torch 2.13, 1 thread: the 2 cores are shared with other jobs
# and 2-thread timings were not reproducible), best-of microseconds, int4 kernel / dequant + fp32 F.linear:
#   M              16         32          48          64         128
#   1536x576   712/1076  1372/1381   2032/1803   2680/1984   5454/3310
#   576x1536   683/1106  1356/1549   2080/2042   2730/2206   5578/3988
#   576x576    286/892    553/662     826/791    1087/976    2203/1509
PREFILL_MIN_M = 64
# Largest dequantized chunk (fp32 elements, 16 MiB): bigger matrices are dequantized and multiplied in column chunks.
SCRATCH_ELEMS = 1 << 22

_scratch = torch.empty(0)
# The overload, resolved once: calling it skips the packet's overload lookup (a few us per call at M=1).
_int4_mm = getattr(getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None), "default", None)


@dataclass(frozen=True)
class CpuInt4Weight:
    """A weight repacked for `cpu_int4_linear`.

    Fast path: `int4pack` uint8 [Np, Kc / 2] (the op's order) and `scales_and_zeros` bf16 [Kc / group, Np, 2],
    with Np = N padded to 64 and Kc = K padded to 32. Fallback (op unavailable): `packed`/`scales` in our format.
    """

    int4pack: torch.Tensor | None
    scales_and_zeros: torch.Tensor | None
    group_size: int
    in_features: int
    out_features: int
    packed: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def fast(self) -> bool:
        return self.int4pack is not None

    @property
    def nbytes(self) -> int:
        tensors = (self.int4pack, self.scales_and_zeros, self.packed, self.scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pack_halves(packed: torch.Tensor, bn: int) -> torch.Tensor:
    """Our bytes uint8 [Np, Kc/2] -> the op's order uint8 [Np, Kc/2] (see module docstring), Np % bn == 0."""
    n, kc = packed.shape[0], packed.shape[1] * 2
    rows = packed.view(n // bn, 2, bn // 2, kc // 2)
    top, bottom = rows[:, 0], rows[:, 1]  # rows j and j + bn/2 of each block: [NB, bn/2, Kc/2]
    even = (top & 0x0F) | (bottom << 4)  # column 2c
    odd = (top >> 4) | (bottom & 0xF0)  # column 2c + 1
    cols = torch.stack((even, odd), dim=-1).view(n // bn, bn // 2, kc)
    return cols.transpose(1, 2).reshape(n, kc // 2)


def _pack_with_op(packed: torch.Tensor) -> torch.Tensor:
    """Our bytes uint8 [Np, Kc/2] -> the op's order, through the op's int32 [Np, Kc] input (stored nibbles q + 8)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant.unpack_nibbles(packed).to(torch.int32) + 8, 2)


@functools.lru_cache(maxsize=None)
def cpu_int4_available() -> bool:
    """True when torch has the CPU int4 pack/mm ops and they run here (checked once on a tiny matrix)."""
    aten = torch.ops.aten
    if not (hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")):
        return False
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (16, 32), dtype=torch.uint8, generator=gen)  # [N=16, K=64]
    scale = torch.full((1, 16, 2), 0.5, dtype=torch.bfloat16)
    scale[..., 1] = 0
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
    try:
        y = aten._weight_int4pack_mm_for_cpu(x, _pack_with_op(packed), 64, scale)
    except (RuntimeError, NotImplementedError):
        return False
    ref = x.float() @ (quant.unpack_nibbles(packed).float() * 0.5).T
    return bool(torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-1))


@functools.lru_cache(maxsize=None)
def _layout() -> int | None:
    """Block rows BN of the op's packed order on this machine if it is the "halves" order, else None."""
    gen = torch.Generator().manual_seed(1)
    probe = torch.randint(0, 256, (128, 48), dtype=torch.uint8, generator=gen)  # [N=128, K=96]
    expected = _pack_with_op(probe)
    for bn in (64, 32):
        if torch.equal(_pack_halves(probe, bn), expected):
            return bn
    return None


_warned = False


def _warn_fallback(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"offload: no fast CPU int4 matmul ({reason}); using the slow dequantize + F.linear path",
                      RuntimeWarning, stacklevel=3)


def repack_for_cpu(packed: torch.Tensor, scales: torch.Tensor, in_features: int) -> CpuInt4Weight:
    """Repack one of our int4 weights (uint8 [N, Kp/2], bf16 [N, Kp/block]) for `cpu_int4_linear`.

    Returns a fast-path weight, or a fallback one holding `packed`/`scales` (with a one-time warning) when the
    op is missing or the block size is not a multiple of 32.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.device.type != "cpu":
        raise ValueError(f"packed must be 2-D uint8 on cpu, got {packed.dtype} {tuple(packed.shape)} {packed.device}")
    n, kp = packed.shape[0], packed.shape[1] * 2
    if scales.shape[0] != n or kp % scales.shape[1]:
        raise ValueError(f"scales {tuple(scales.shape)} do not match packed {tuple(packed.shape)}")
    block = kp // scales.shape[1]
    if not kp - block < in_features <= kp:
        raise ValueError(f"in_features={in_features} does not fit packed K={kp} with block {block}")
    reason = None if cpu_int4_available() else "torch lacks aten::_weight_int4pack_mm_for_cpu"
    if reason is None and block % _K_ALIGN:
        reason = f"block size {block} is not a multiple of {_K_ALIGN}"
    if reason is not None:
        _warn_fallback(reason)
        return CpuInt4Weight(None, None, block, in_features, n, packed.contiguous(), scales.contiguous())

    np_, kc, group = geometry(n, in_features, block)
    body = F.pad(packed[:, : kc // 2], (0, 0, 0, np_ - n), value=_PACKED_ZERO)  # uint8 [Np, Kc/2]
    bn = _layout()
    int4pack = _pack_halves(body, bn) if bn is not None else _pack_with_op(body)
    group_scales = scales.repeat_interleave(block // group, dim=1)[:, : kc // group]  # [N, Kc/group]
    group_scales = F.pad(group_scales.to(torch.bfloat16), (0, 0, 0, np_ - n))  # [Np, Kc/group]
    scales_and_zeros = torch.stack((group_scales.T, torch.zeros_like(group_scales.T)), dim=-1).contiguous()
    return CpuInt4Weight(int4pack, scales_and_zeros, group, in_features, n)


def geometry(out_features: int, in_features: int, block: int = 128) -> tuple[int, int, int]:
    """(Np, Kc, group) of the fast-path tensors `repack_for_cpu` makes for an [N, K] weight."""
    kc, np_ = _round_up(in_features, _K_ALIGN), _round_up(out_features, _N_ALIGN)
    return np_, kc, next(g for g in _GROUP_SIZES if block % g == 0 and kc % g == 0)


def repacked_nbytes(out_features: int, in_features: int, block: int = 128) -> int:
    """Bytes `repack_for_cpu` will hold for an [N, K] weight (what a cache slot must budget)."""
    if not cpu_int4_available() or block % _K_ALIGN:
        kp = _round_up(in_features, block)
        return out_features * kp // 2 + out_features * (kp // block) * 2
    np_, kc, group = geometry(out_features, in_features, block)
    return np_ * kc // 2 + (kc // group) * np_ * 2 * 2


def _scratch_view(shape: tuple[int, int]) -> torch.Tensor:
    """An fp32 view of the shared scratch buffer (grown on demand, reused across calls and layers).

    Not thread-safe: concurrent prefill calls from several Python threads would share it.
    """
    global _scratch
    numel = shape[0] * shape[1]
    if _scratch.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable both inside and outside inference mode
            _scratch = torch.empty(numel)
    return _scratch[:numel].view(shape)


def _dequant_matmul(x: torch.Tensor, w: CpuInt4Weight, bn: int) -> torch.Tensor:
    """x fp32 [M, K] -> fp32 [M, N]: dequantize column chunks of W.T into the scratch buffer, then BLAS."""
    np_, kc = w.int4pack.shape[0], w.int4pack.shape[1] * 2
    k, n, g = w.in_features, w.out_features, w.group_size
    blocks = w.int4pack.view(np_ // bn, kc, bn // 2)  # byte [b, k, j] = rows b*bn + j (low), + bn/2 (high)
    signed = (blocks ^ _PACKED_ZERO).view(torch.int8)  # offset binary -> two's complement nibbles
    scale = w.scales_and_zeros[..., 0]  # bf16 [Kc/g, Np]; made fp32 per chunk, as an fp32 mul_ is ~20% faster
    chunk_blocks = max(1, SCRATCH_ELEMS // (kc * bn))
    out = torch.empty(x.shape[0], n)
    for b0 in range(0, np_ // bn, chunk_blocks):
        b1 = min(b0 + chunk_blocks, np_ // bn)
        c0, c1 = b0 * bn, min(b1 * bn, n)
        if c0 >= n:
            break
        wt = _scratch_view((kc, (b1 - b0) * bn))  # W.T chunk, fp32 [Kc, cols]
        halves = wt.view(kc, b1 - b0, 2, bn // 2)
        part = signed[b0:b1].transpose(0, 1)  # [Kc, blocks, bn/2]
        halves[:, :, 0].copy_((part << 4) >> 4)  # arithmetic shift sign-extends the low nibble
        halves[:, :, 1].copy_(part >> 4)
        wt.view(kc // g, g, -1).mul_(scale[:, c0 : b1 * bn].float().unsqueeze(1))
        out[:, c0:c1] = x @ wt[:k, : c1 - c0]
    return out


def cpu_int4_linear(x: torch.Tensor, w: CpuInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [..., K] (bf16 or fp32) -> [..., N] in x.dtype.

    Small M (decode) runs the int4 kernel in bf16 (fp32 accumulate); M >= PREFILL_MIN_M dequantizes into a
    reused fp32 scratch buffer and uses BLAS, which is faster there (see PREFILL_MIN_M).
    """
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if not w.fast:
        _warn_fallback("weight was repacked without the fast op")
        y = F.linear(x2, quant.dequantize(w.packed, w.scales, (n, k), x.dtype), bias)
        return y.reshape(*lead, n)

    bn = _layout()
    if x2.shape[0] >= PREFILL_MIN_M and bn is not None:
        y = _dequant_matmul(x2.float(), w, bn)  # fp32 [M, N]
    else:
        # Each step is skipped when it has nothing to do: at M=1 the op itself takes ~20 us on small
        # matrices, and every extra tensor op costs 1-5 us.
        xb = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
        kc = w.int4pack.shape[1] * 2
        if kc != k:
            xb = F.pad(xb, (0, kc - k))  # [M, Kc]: zeros cancel whatever the padded columns of W hold
        y = _int4_mm(xb.contiguous(), w.int4pack, w.group_size, w.scales_and_zeros)  # bf16 [M, Np]
        if y.shape[1] != n:
            y = y[:, :n].contiguous()  # drop the zero-scale rows padded onto W
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, n)


def traced_linear(x: torch.Tensor, w: CpuInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`cpu_int4_linear`'s int4-kernel path as plain aten ops, for torch.compile: x [..., K] -> [..., N]."""
    k, n = w.in_features, w.out_features
    x2 = x.reshape(-1, k).to(torch.bfloat16)  # [M, K]
    kc = w.int4pack.shape[1] * 2
    if kc != k:
        x2 = F.pad(x2, (0, kc - k))  # [M, Kc]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.int4pack, w.group_size, w.scales_and_zeros)[:, :n]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
