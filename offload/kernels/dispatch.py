"""The entry points the engine calls: y = x @ W.T + bias with W held as int4 blocks (int8 for an
int8 output projection: `int8_linear`).

Shapes and dtypes:
  x       bf16/fp16/fp32 [..., K]     any leading dims
  packed  uint8 [N, Kp // 2]          (offload/quant.py defines the layout)
  scales  bf16  [N, Kp // GROUP]
  bias    any float [N] or None
  result  x.dtype [..., N]

Every choice of how a product runs is made here. `int4_backend` picks, per device and dtype:
  triton    cuda (or cpu with OFFLOAD_FORCE_TRITON=1: tests, under TRITON_INTERPRET=1); then by
            M = x.numel() // K the fused decode kernel (gemv) for M <= 16, the fused prefill kernel
            (gemm) above, and dequantize + F.linear for block sizes the fused kernels do not handle
  cpu_native  bf16 on cpu: our AVX2 kernel (offload.kernels.cpu_native, its own host layout:
            offload.formats.NativeInt4Format) when it builds here and OFFLOAD_CPU_KERNEL is not "torch"
  cpu_int4  bf16 on cpu otherwise: PyTorch's CPU int4 kernel (its host layout: offload.formats.CpuInt4Format)
  torch     everything else (float32 on cpu): the exact fp32 torch reference
"""
import os

import torch
import torch.nn.functional as F

from . import gemm as _gemm
from . import gemv as _gemv
from .. import quant
from . import cpu_int4, cpu_int8, cpu_native
from ._common import INTERPRET
from .dequant import dequantize, dequantize_ref

FORCE_TRITON_ENV = "OFFLOAD_FORCE_TRITON"


def triton_forced() -> bool:
    """OFFLOAD_FORCE_TRITON=1, for tests only: the Triton kernels also take cpu tensors (interpreted)."""
    return os.environ.get(FORCE_TRITON_ENV) == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether a product with activations `x` runs the Triton kernels (cuda, or forced) or torch code."""
    if x.is_cuda:
        return True
    if not triton_forced():
        return False
    if not INTERPRET:
        raise RuntimeError(f"{FORCE_TRITON_ENV}=1 on a CPU tensor needs TRITON_INTERPRET=1 set before import")
    return True


def int4_backend(device: torch.device, dtype: torch.dtype, block_size: int) -> str:
    """"triton", "cpu_native", "cpu_int4" or "torch": how int4 products with `dtype` activations on `device` run."""
    if device.type == "cuda" or triton_forced():
        return "triton"
    if dtype == torch.bfloat16 and cpu_native.supported_block(block_size) and cpu_native.available():
        return "cpu_native"
    if dtype == torch.bfloat16 and block_size % 32 == 0 and cpu_int4.cpu_int4_available():
        return "cpu_int4"
    return "torch"


def _rows(x, weight, scales, in_features):
    """x [..., K] -> x2 [M, K] with unit stride along K, after checking it against the weight."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    if weight.device != x.device or scales.device != x.device:
        raise ValueError(f"x on {x.device}, weight on {weight.device}/{scales.device}")
    x2 = x.reshape(-1, in_features)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _traced(y, bias):
    return y if bias is None else y + bias.to(y.dtype)


def int4_linear(x, packed, scales, in_features, bias=None):
    """x [..., K] @ dequant(packed, scales)[:, :K].T (+ bias) -> [..., N] in x.dtype."""
    if torch.compiler.is_compiling():  # one opaque node in the graph (kernels/ops.py)
        return _traced(torch.ops.offload.int4_linear(x, packed, scales, in_features), bias)
    x2 = _rows(x, packed, scales, in_features)  # [M, K]
    lead, n, m = x.shape[:-1], packed.shape[0], x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)

    if not use_triton(x):
        out = int4_linear_ref(x2, packed, scales, in_features, bias)
    else:
        group = 2 * packed.shape[1] // scales.shape[1]
        if m <= _gemv.MAX_M and _gemv.supported_group(group):
            out = _gemv.fused_gemv(x2, packed, scales, in_features, bias)
        elif _gemm.supported_group(group):
            out = _gemm.fused_gemm(x2, packed, scales, in_features, bias)
        else:
            w = dequantize(packed, scales, in_features, dtype=x.dtype)  # [N, K]
            out = F.linear(x2, w, bias.to(x.dtype) if bias is not None else None)
    return out.view(*lead, n)


def cpu_int4_linear(x, w, bias=None):
    """x [..., K] @ W.T (+ bias) -> [..., N] for a weight repacked by cpu_int4.repack_for_cpu."""
    if torch.compiler.is_compiling():
        if not w.fast:
            return int4_linear(x, w.packed, w.scales, w.in_features, bias)
        return cpu_int4.traced_linear(x, w, bias)
    return cpu_int4.cpu_int4_linear(x, w, bias)


def int4_dequantize(packed, scales, in_features, dtype):
    """(packed uint8 [N, Kp/2], scales [N, Kp/block]) -> dtype [N, K]: the Triton kernel on cuda, else the reference."""
    if use_triton(packed):
        return dequantize(packed, scales, in_features, dtype=dtype)
    return quant.dequantize(packed, scales, (packed.shape[0], in_features), dtype)


def int8_linear(x, qweight, scales, in_features, bias=None, chunk_elems=1 << 24, prepared=None):
    """x [..., K] @ (qweight int8 [N, Kp] * block scales)[:, :K].T (+ bias) -> [..., N] in x.dtype.

    On the Triton path, M <= 16 (decode; the output projection of a prefill too, since generate keeps
    only the last position's logits) reads the int8 bytes once in the fused kernel; larger M dequantizes
    `chunk_elems` weights at a time into x.dtype for F.linear, so the transient stays small.
    On cpu with bf16 activations and `prepared` given, M <= cpu_native.MAX_M rows go through our native
    int8 kernel (kernels.cpu_native) on the stored layout. Otherwise `prepared` (a dict the caller owns) keeps
    what is made once from the weight: with bf16 activations the weight repacked for PyTorch's int8 kernel
    (kernels.cpu_int8), else a copy dequantized
    into x.dtype (host RAM is not the scarce memory there; a dequantize per token made decode ~3x slower).
    Without `prepared`, the fp32 reference.
    """
    x2 = _rows(x, qweight, scales, in_features)  # [M, K]
    lead, n, m = x.shape[:-1], qweight.shape[0], x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    group = qweight.shape[1] // scales.shape[1]
    bf16_cpu = prepared is not None and x.dtype == torch.bfloat16 and not use_triton(x)
    if bf16_cpu and "native" not in prepared and not torch.compiler.is_compiling():  # decided by the first eager call
        prepared["native"] = group % cpu_native.QK == 0 and cpu_native.available()
    if bf16_cpu and m <= cpu_native.MAX_M and prepared.get("native"):
        return _traced(cpu_native.native_int8_linear(x2, qweight, scales, in_features), bias).view(*lead, n)
    if bf16_cpu and "blocks" not in prepared and not torch.compiler.is_compiling() and cpu_int8.cpu_int8_available():
        prepared["blocks"] = cpu_int8.repack(qweight, scales)  # ([nb, N, block], [nb, N]); by the first eager call
    fast_cpu = bf16_cpu and "blocks" in prepared
    if torch.compiler.is_compiling() and (fast_cpu or use_triton(x)):
        y = cpu_int8.cpu_int8_linear(x2, *prepared["blocks"], in_features) if fast_cpu else \
            torch.ops.offload.int8_linear(x2, qweight, scales, in_features)
        return _traced(y, bias).view(*lead, n)
    if not use_triton(x):
        if prepared is None:
            out = int8_linear_ref(x2, qweight, scales, in_features, bias, chunk_elems)
        elif fast_cpu:
            out = _traced(cpu_int8.cpu_int8_linear(x2, *prepared["blocks"], in_features), bias)
        else:
            if prepared.get("dense") is None or prepared["dense"].dtype != x.dtype:
                prepared["dense"] = quant.dequantize_int8(qweight, scales, in_features, x.dtype)  # [N, K]
            out = F.linear(x2, prepared["dense"], bias.to(x.dtype) if bias is not None else None)
    elif m <= _gemv.MAX_M and _gemv.supported_group(group):
        out = _gemv.fused_gemv(x2, qweight, scales, in_features, bias, bits=8)
    else:
        out = x2.new_empty(m, n)
        rows = max(1, chunk_elems // qweight.shape[1])
        for i in range(0, n, rows):
            w = int8_dequantize_ref(qweight[i:i + rows], scales[i:i + rows], in_features, x.dtype)  # [rows, K]
            b = bias[i:i + rows].to(x.dtype) if bias is not None else None
            out[:, i:i + rows] = F.linear(x2, w, b)
    return out.view(*lead, n)


int8_dequantize_ref = quant.dequantize_int8


def int8_linear_ref(x, qweight, scales, in_features, bias=None, chunk_elems=1 << 24):
    """Pure torch, fp32 arithmetic, `chunk_elems` weights dequantized at a time: x [M, K] -> [M, N] in x.dtype."""
    xf = x.float()
    rows = max(1, chunk_elems // qweight.shape[1])
    out = torch.cat([xf @ int8_dequantize_ref(qweight[i:i + rows], scales[i:i + rows], in_features).t()
                     for i in range(0, qweight.shape[0], rows)], dim=1)  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int4_linear_ref(x, packed, scales, in_features, bias=None, chunk_elems=1 << 24):
    """Pure torch, fp32 arithmetic: x [..., K] -> [..., N] in x.dtype.

    Dequantizes `chunk_elems` weights at a time so a CPU run never holds the whole matrix in fp32.
    """
    lead, n = x.shape[:-1], packed.shape[0]
    xf = x.reshape(-1, in_features).float()  # [M, K]
    rows = max(1, chunk_elems // (2 * packed.shape[1]))
    parts = [
        xf @ dequantize_ref(packed[i:i + rows], scales[i:i + rows], in_features, torch.float32).t()
        for i in range(0, n, rows)
    ]
    out = torch.cat(parts, dim=1)  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*lead, n)
