"""Fused int4 Triton kernels and their torch references (import name `offload.kernels`).

`int4_linear` is the function the engine's streamed linears call; it picks the decode (gemv) or
prefill (gemm) kernel by the number of activation rows. `int8_linear` serves an int8 output
projection. Nothing here imports the engine.
"""
from .dequant import dequantize, dequantize_ref
from . import ops  # noqa: F401 - registers the offload:: custom ops the compiled decode step calls
from .dispatch import (FORCE_TRITON_ENV, cpu_int4_linear, int4_backend, int4_dequantize, int4_linear,
                       int4_linear_ref, int8_dequantize_ref, int8_linear, int8_linear_ref, triton_forced, use_triton)
from .gemm import fused_gemm, gemm_ref
from .gemv import fused_gemv, gemv_ref

__all__ = [
    "FORCE_TRITON_ENV",
    "cpu_int4_linear",
    "dequantize",
    "dequantize_ref",
    "fused_gemm",
    "fused_gemv",
    "gemm_ref",
    "gemv_ref",
    "int4_backend",
    "int4_dequantize",
    "int4_linear",
    "int4_linear_ref",
    "int8_dequantize_ref",
    "int8_linear",
    "int8_linear_ref",
    "triton_forced",
    "use_triton",
]
