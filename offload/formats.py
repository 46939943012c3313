"""What a cache slot holds and how a layer computes with it.

`int4` (default): the slot holds the entry's packed bytes + scales exactly as in the host
buffer; compute with the int4 kernels on cuda, the torch reference on cpu.
"""
import os

import torch
import torch.nn.functional as F

from . import quant

FORMATS = ("int4",)


def force_triton() -> bool:
    # Tests only: run the Triton kernels on cpu tensors (under TRITON_INTERPRET=1).
    return os.environ.get("OFFLOAD_FORCE_TRITON") == "1"


class Int4Format:
    name = "int4"

    def __init__(self, block_size: int):
        self.block_size = block_size

    def slot_nbytes(self, entry) -> int:
        return entry.nbytes

    def materialize(self, raw: torch.Tensor, entry):
        """Entry bytes on the device (uint8 [nbytes]) -> what `linear` takes. Runs on the copy stream."""
        packed, scales = entry.views(raw, self.block_size)
        return packed, scales, entry.shape[1]

    def linear(self, x: torch.Tensor, data, bias) -> torch.Tensor:  # x [..., K] -> [..., N]
        packed, scales, k = data
        if x.is_cuda or force_triton():
            from .kernels import int4_linear  # imported late: TRITON_INTERPRET must be set first
            return int4_linear(x, packed, scales, k, bias)
        w = quant.dequantize(packed, scales, (packed.shape[0], k), x.dtype)
        return F.linear(x, w, bias)


def make_format(name: str, block_size: int):
    from .errors import OffloadError
    if name not in FORMATS:
        raise OffloadError(f"unknown cache format {name!r} (choose from {', '.join(FORMATS)})")
    return Int4Format(block_size)
