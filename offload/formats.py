"""What a cache slot holds and how a layer computes with it.

  int4 (default)  the slot holds the entry's bytes exactly as in the host buffer (packed int4 + bf16
                  scales). cuda: fused Triton kernels. cpu with bfloat16: our native kernel
                  (NativeInt4Format), else PyTorch's int4 CPU kernel (CpuInt4Format), each in its own
                  layout, repacked once at load; cpu with float32: the exact torch reference.
  bf16            the prefetch thread dequantizes each entry into a slot of the compute dtype on the
                  copy stream (the reference blog's design); F.linear computes. Slots are 4x larger.
The budget counts the bytes each slot really holds (`slot_nbytes`).
"""
import torch
import torch.nn.functional as F

from . import host, kernels
from .errors import OffloadError
from .kernels import cpu_int4, cpu_native

FORMATS = ("int4", "bf16")


class Int4Format:
    """Packed int4 + scales in the slot; fused int4 matmul."""
    name = "int4"
    views_host = True  # materialize returns views of the entry's bytes: the cpu can compute from the host buffer

    def __init__(self, block_size: int, device: torch.device, dtype: torch.dtype):
        self.block_size = block_size

    def slot_nbytes(self, entry) -> int:
        return entry.nbytes

    def materialize(self, raw: torch.Tensor, entry):
        """Entry bytes on the device (uint8 [nbytes]) -> what `linear` takes. Runs on the copy stream."""
        packed, scales = entry.views(raw, self.block_size)
        return packed, scales, entry.shape[1]

    def linear(self, x: torch.Tensor, data, bias) -> torch.Tensor:  # x [..., K] -> [..., N]
        packed, scales, k = data
        return kernels.int4_linear(x, packed, scales, k, bias)


class CpuInt4Format(Int4Format):
    """int4 on cpu with bf16 activations: PyTorch's CPU int4 kernel.

    Its layout is repacked once at load, in the host store (the on-disk format is unchanged): a slot is
    then a plain copy, where repacking on every copy-in would cost ~5x the matmul of a streamed matrix.
    Host bytes of an entry: [int4pack uint8 [Np, Kc/2] | pad | scales_and_zeros bf16 [Kc/group, Np, 2]].
    """

    def _geometry(self, shape):
        np_, kc, group = cpu_int4.geometry(*shape, self.block_size)
        scales_offset = host.aligned(np_ * kc // 2)
        return np_, kc, group, scales_offset

    def host_nbytes(self, shape) -> int:
        np_, kc, group, scales_offset = self._geometry(shape)
        return scales_offset + (kc // group) * np_ * 4

    def write_host(self, raw: torch.Tensor, packed, scales, shape) -> None:
        w = cpu_int4.repack_for_cpu(packed, scales, shape[1])
        np_, kc, group, scales_offset = self._geometry(shape)
        raw[: w.int4pack.numel()].copy_(w.int4pack.reshape(-1))
        raw[scales_offset:].view(torch.bfloat16).copy_(w.scales_and_zeros.reshape(-1))

    def materialize(self, raw: torch.Tensor, entry):
        np_, kc, group, scales_offset = self._geometry(entry.shape)
        int4pack = raw[: np_ * kc // 2].view(np_, kc // 2)
        scales_and_zeros = raw[scales_offset:].view(torch.bfloat16).view(kc // group, np_, 2)
        return cpu_int4.CpuInt4Weight(int4pack, scales_and_zeros, group, entry.shape[1], entry.shape[0])

    def linear(self, x: torch.Tensor, data, bias) -> torch.Tensor:
        return kernels.cpu_int4_linear(x, data, bias)


class NativeInt4Format(Int4Format):
    """int4 on cpu with bf16 activations: our native kernel (offload.kernels.cpu_native).

    Its layout is made once at load, in the host store, as for CpuInt4Format. Host bytes of an entry:
    [w uint8 [N, Kq/2] | pad | scales bf16 [N, Kq/block]], Kq = the stored K padded to 64: the stored bytes,
    plus a 32-column pad per row for block 32 with an odd number of blocks.
    """

    def _sizes(self, shape) -> tuple[int, int, int]:
        w_nbytes, scales_nbytes = cpu_native.nbytes(shape, self.block_size)
        return w_nbytes, host.aligned(w_nbytes), scales_nbytes

    def host_nbytes(self, shape) -> int:
        _, scales_offset, scales_nbytes = self._sizes(shape)
        return scales_offset + scales_nbytes

    def write_host(self, raw: torch.Tensor, packed, scales, shape) -> None:
        w, kernel_scales = cpu_native.repack(packed, scales)
        _, scales_offset, _ = self._sizes(shape)
        raw[: w.numel()].copy_(w.reshape(-1))
        raw[scales_offset: scales_offset + kernel_scales.numel() * 2].view(torch.bfloat16).copy_(kernel_scales.reshape(-1))

    def materialize(self, raw: torch.Tensor, entry):
        w_nbytes, scales_offset, scales_nbytes = self._sizes(entry.shape)
        n = entry.shape[0]
        w = raw[:w_nbytes].view(n, -1)  # uint8 [N, Kq/2]
        scales = raw[scales_offset: scales_offset + scales_nbytes].view(torch.bfloat16).view(n, -1)  # [N, Kq/block]
        return cpu_native.NativeInt4Weight(w, scales, entry.shape[1])

    def linear(self, x: torch.Tensor, data, bias) -> torch.Tensor:
        return cpu_native.native_int4_linear(x, data, bias)


class Bf16Format:
    """A dequantized weight [N, K] of the compute dtype in the slot; F.linear."""
    name = "bf16"
    views_host = False

    def __init__(self, block_size: int, device: torch.device, dtype: torch.dtype):
        self.block_size, self.device, self.dtype = block_size, device, dtype

    def slot_nbytes(self, entry) -> int:
        n, k = entry.shape
        return n * k * torch.finfo(self.dtype).bits // 8

    def materialize(self, raw: torch.Tensor, entry):
        packed, scales = entry.views(raw, self.block_size)
        return kernels.int4_dequantize(packed, scales, entry.shape[1], self.dtype)  # [N, K]

    def linear(self, x: torch.Tensor, w, bias) -> torch.Tensor:
        return F.linear(x, w, bias)


def make_format(name: str, block_size: int, device: torch.device, dtype: torch.dtype):
    if name not in FORMATS:
        raise OffloadError(f"unknown cache format {name!r} (choose from {', '.join(FORMATS)})")
    if name == "bf16":
        return Bf16Format(block_size, device, dtype)
    backend = kernels.int4_backend(device, dtype, block_size)
    if backend == "cpu_native":
        return NativeInt4Format(block_size, device, dtype)
    if backend == "cpu_int4":
        return CpuInt4Format(block_size, device, dtype)
    return Int4Format(block_size, device, dtype)
