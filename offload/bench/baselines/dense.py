"""The dense weight a peer computes with: every stored linear dequantized exactly as offload reads it,
so offload and its peers compute the same model."""
import torch

from offload import quant


def linear_weight(info, parts, dtype, device=None) -> torch.Tensor:
    """Stored tensors of a linear -> dense [N, K] of `dtype` (dequantized on `device` when given)."""
    kind = getattr(info, "quant", None) or "int4"
    if device is not None:
        parts = [p.to(device) for p in parts]
    if kind == "int4":
        packed, scales = parts
        return quant.dequantize(packed, scales, info.shape, dtype)
    if kind == "int8":
        qweight, scales = parts
        return quant.dequantize_int8(qweight, scales, info.shape[1], dtype)
    (w,) = parts
    return w.to(dtype)


def resident_linears(weights) -> dict:
    """Linears stored outside the int4 store (an int8 or bf16 lm_head): resident on the device."""
    return dict(getattr(weights, "resident_linears", {}) or {})
