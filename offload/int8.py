"""int8: the second weight format, for the output projection (`offload-quantize --lm-head int8`).

Symmetric int8 in [-127, 127], one bf16 scale = absmax / 127 per block of 128 consecutive elements
along the input dimension (the int4 blocks, with 8 bits). A weight W[N, K] (K zero-padded to Kp,
a multiple of the block) is stored as
  qweight  int8 [N, Kp]
  scales   bf16 [N, Kp / block]      w ~= q * scale
An int8 (and a `--lm-head bf16`) output projection is not streamed through the cache: it stays
resident on the device in an `Int8Linear` (an unquantized one in a plain nn.Linear): the fused
int8 decode kernel on a GPU, a once-dequantized copy on the CPU.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .modules import replace_module
from .kernels import int8_dequantize_ref, int8_linear, use_triton

QMAX8 = 127


def quantize(w: torch.Tensor, block_size: int = quant.BLOCK_SIZE):
    """[N, K] float -> (qweight int8 [N, Kp], scales bf16 [N, Kp / block]); rounded with the stored bf16 scale."""
    n, k = w.shape
    kp = quant.padded_k(k, block_size)
    wb = F.pad(w.float(), (0, kp - k)).view(n, kp // block_size, block_size)
    scales = (wb.abs().amax(dim=-1) / QMAX8).to(torch.bfloat16)
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wb / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-QMAX8, QMAX8)
    return q.to(torch.int8).view(n, kp), scales


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Reference: (qweight int8 [N, Kp], scales [N, Kp / block]) -> dtype [N, K] with K = shape[1]."""
    if qweight.shape[0] != shape[0]:
        raise ValueError(f"qweight has {qweight.shape[0]} rows, shape says {shape[0]}")
    return int8_dequantize_ref(qweight, scales, shape[1], dtype)


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight kept on the device.

    On a GPU the fused kernel reads the int8 bytes (no dequantized copy). On the CPU the weight is
    dequantized once, at the first call, into the activation dtype and kept: host RAM is not the
    scarce memory there, and a dequantize per token made decode ~3x slower.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int = quant.BLOCK_SIZE):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kp = quant.padded_k(in_features, block_size)
        # Filled by load_state_dict(assign=True) from the weights dir; meta until then.
        self.qweight = nn.Parameter(torch.empty(out_features, kp, dtype=torch.int8, device="meta"), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, kp // block_size, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

        self._dense = None  # CPU: the dequantized weight, in the activation dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        if use_triton(x):
            return int8_linear(x, self.qweight, self.scales, self.in_features, self.bias)
        if self._dense is None or self._dense.dtype != x.dtype:
            self._dense = dequantize(self.qweight, self.scales, (self.out_features, self.in_features), x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self._dense, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def swap_int8_linears(model: nn.Module, keys, block_size: int = quant.BLOCK_SIZE) -> None:
    """Replace the nn.Linear named in `keys` (weight names 'a.b.weight') with Int8Linear."""
    for key in keys:
        replace_module(model, key.removesuffix(".weight"),
                       lambda old: Int8Linear(old.in_features, old.out_features, old.bias is not None, block_size))
