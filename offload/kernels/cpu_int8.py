"""The int8 output projection on cpu through PyTorch's int8 kernel (`aten::_weight_int8pack_mm`).

The op computes x @ (q * scale).T with ONE scale per output row; our int8 format has one scale per
block of the input dimension (offload/quant.py). So the weight is repacked once into its column
blocks, each a contiguous int8 [N, block] with that block's scales [N], and the product is the sum of
one op call per block (fp32 accumulation across blocks). At decode it reads the int8 bytes once:
measured on the demo's head (49152 x 576, 1 thread, 2-core AVX2 EPYC, torch 2.13): 1.4 ms, against
3.0 ms for F.linear on a dense bf16 copy (the previous path), which also held 2x the bytes.
"""
import functools

import torch
import torch.nn.functional as F

_int8_mm = getattr(getattr(torch.ops.aten, "_weight_int8pack_mm", None), "default", None)


@functools.lru_cache(maxsize=None)
def cpu_int8_available() -> bool:
    """True when torch has the cpu int8 op and it computes what it should here (checked once)."""
    if _int8_mm is None:
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    s = torch.full((16,), 0.25, dtype=torch.bfloat16)
    x = torch.randn(2, 32, generator=gen).to(torch.bfloat16)
    try:
        y = _int8_mm(x, q, s)
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(y.float(), x.float() @ (q.float() * 0.25).T, rtol=1e-2, atol=1e-1))


def repack(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qweight int8 [N, Kp], scales bf16 [N, Kp / block] -> (int8 [nb, N, block], bf16 [nb, N]), contiguous."""
    n, kp = qweight.shape
    nb = scales.shape[1]
    blocks = qweight.view(n, nb, kp // nb).transpose(0, 1).contiguous()  # [nb, N, block]
    return blocks, scales.t().to(torch.bfloat16).contiguous()


def cpu_int8_linear(x: torch.Tensor, blocks: torch.Tensor, block_scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """bf16 x [M, K] -> bf16 [M, N]: sum over column blocks b of x_b @ (q_b * s_b).T, accumulated in fp32."""
    nb, n, block = blocks.shape
    xb = F.pad(x, (0, nb * block - in_features)) if nb * block != in_features else x  # [M, Kp]
    xb = xb.view(x.shape[0], nb, block).transpose(0, 1).contiguous()  # [nb, M, block]
    out = _int8_mm(xb[0], blocks[0], block_scales[0]).float()  # [M, N]
    for b in range(1, nb):
        out += _int8_mm(xb[b], blocks[b], block_scales[b])
    return out.to(x.dtype)
