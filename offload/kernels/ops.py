"""The Triton products as PyTorch custom ops, for the compiled decode step (offload/compiled.py).

torch.compile traces Python; the Triton path is Python with launch plans, lookups and launchers in
it. Registered as custom ops with a fake (shape-only) implementation, each product is one opaque node
of the graph: inductor and CUDA graphs see a kernel call, never the Python behind it. Eager code calls
the functions directly (an op call costs a few microseconds of dispatch per product); kernels.dispatch
calls these only under `torch.compiler.is_compiling()`. The cpu kernels need no wrapper: they are aten
ops already (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), traced as such, with no Python at
run time (cpu_int4.traced_linear, cpu_int8.cpu_int8_linear).

  offload::int4_linear  x [..., K] -> [..., N]   our int4 layout (kernels.int4_linear)
  offload::int8_linear  x [..., K] -> [..., N]   the int8 output projection (kernels.int8_linear)
Biases are added by the caller, outside the op, where inductor fuses the add.
"""
import torch

from . import dispatch


@torch.library.custom_op("offload::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    return dispatch.int4_linear(x, packed, scales, in_features)


@int4_linear.register_fake
def _(x, packed, scales, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("offload::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    return dispatch.int8_linear(x, qweight, scales, in_features)


@int8_linear.register_fake
def _(x, qweight, scales, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])

