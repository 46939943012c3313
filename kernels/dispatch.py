"""The one entry point the engine calls: y = x @ W.T + bias with W held as int4 blocks.

Shapes and dtypes:
  x       bf16/fp16/fp32 [..., K]     any leading dims
  packed  uint8 [N, Kp // 2]          (see kernels/_common.py for the nibble layout)
  scales  bf16  [N, Kp // GROUP]
  bias    any float [N] or None
  result  x.dtype [..., N]

Choice by M = x.numel() // K: the fused decode kernel (gemv) for M <= 16, the fused prefill
kernel (gemm) above, and dequantize + F.linear only for block sizes the fused kernels do not
handle. CPU tensors take a pure-torch path unless OFFLOAD_FORCE_TRITON=1 (tests, which also run
Triton's interpreter with TRITON_INTERPRET=1).
"""
import os

import torch
import torch.nn.functional as F

from . import gemm as _gemm
from . import gemv as _gemv
from ._common import INTERPRET
from .dequant import dequantize, dequantize_ref

FORCE_TRITON_ENV = "OFFLOAD_FORCE_TRITON"


def _use_triton(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return True
    if os.environ.get(FORCE_TRITON_ENV) != "1":
        return False
    if not INTERPRET:
        raise RuntimeError(f"{FORCE_TRITON_ENV}=1 on a CPU tensor needs TRITON_INTERPRET=1 set before import")
    return True


def int4_linear(x, packed, scales, in_features, bias=None):
    """x [..., K] @ dequant(packed, scales)[:, :K].T (+ bias) -> [..., N] in x.dtype."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    if packed.device != x.device or scales.device != x.device:
        raise ValueError(f"x on {x.device}, weight on {packed.device}/{scales.device}")
    lead, n = x.shape[:-1], packed.shape[0]
    x2 = x.reshape(-1, in_features)  # [M, K]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)

    if not _use_triton(x):
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
