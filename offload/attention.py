"""Which attention implementation the model gets: flash-attn 2 only where a tiny call of it works
(a wheel built against another torch fails at import with an undefined symbol, or at the first
launch on a GPU it has no kernels for), else PyTorch's SDPA, with a one-line notice. On cpu in 16 bits,
SDPA with the decode step's attention computed in float32 (`sdpa_fp32_decode`, or our cpu kernel:
`native_decode`)."""
import importlib.util
import sys

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .kernels import cpu_native

CPU_DECODE_FP32 = "offload_sdpa_fp32_decode"  # the names the model's config gets
CPU_DECODE_NATIVE = "offload_native_decode"


def probe_flash_attn(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run flash-attn once on a tiny causal problem and compare it with SDPA: None if it works,
    else why not (one line)."""
    try:
        from flash_attn import flash_attn_func
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, 2, 64, generator=g).to(device, dtype) for _ in range(3))  # [B, T, H, D]
        out = flash_attn_func(q, k, v, causal=True)  # [B, T, H, D]
        ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)),
                                             is_causal=True).transpose(1, 2)
    except Exception as e:  # ImportError/OSError from a mismatched build, RuntimeError from a kernel
        text = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {text}"[:200]
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return "its output is not finite"
    err = (out.float() - ref).abs().max().item()
    if err > 2e-2 * ref.abs().max().item():
        return f"its output differs from SDPA's (max error {err:.3g})"
    return None


def sdpa_fp32_decode(module, query, key, value, attention_mask, **kwargs):
    """HF's SDPA attention, with a decode step's (one query position) 16-bit q/k/v computed in float32.

    PyTorch's cpu SDPA is 3-5x slower in bfloat16 than in float32 at decode shapes where the cpu has no AMX
    (measured on an AMD EPYC: 246 against 54 us a layer, 256 cached positions, casts included; the
    compiled decode step's attention went from 7.6 to ~1.5 ms): the casts are small, the kernel's
    16-bit path is not. Prefill keeps the 16-bit kernel (a GEMM-sized problem, where bf16 units help)."""
    if query.shape[2] != 1 or query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights  # [B, 1, heads, head_dim]


def native_decode(module, query, key, value, attention_mask, **kwargs):
    """`sdpa_fp32_decode`, with a bf16 decode step's attention in our cpu kernel (`cpu_native.decode_attention`):
    fp32 like it, but reading the bf16 cache in place and only up to the last position attended. The compiled
    step's static cache is at least 256 positions: SDPA there read all of them plus their fp32 copies (~100 us a
    layer on an AMD EPYC at 1 thread, 3 ms of a 13 ms step at a 70-token context), the kernel ~14 us."""
    b, h, q_len, d = query.shape
    t = key.shape[2]
    plain_mask = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[-1] == t)
    if (q_len != 1 or query.dtype != torch.bfloat16 or key.dtype != value.dtype or d % 8 or not plain_mask
            or kwargs.get("dropout") or kwargs.get("s_aux") is not None):  # attention sinks: HF's own paths
        return sdpa_fp32_decode(module, query, key, value, attention_mask, **kwargs)
    mask = None if attention_mask is None else attention_mask[:, 0, -1, :].expand(b, t)  # [B, T]
    scale = kwargs.get("scaling") or d ** -0.5
    out = cpu_native.decode_attention(query.reshape(b, h, d), key, value, mask, scale)  # [B, H, D]
    return out.view(b, 1, h, d), None  # [B, 1, heads, head_dim]


for _name, _fn in ((CPU_DECODE_FP32, sdpa_fp32_decode), (CPU_DECODE_NATIVE, native_decode)):
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, sdpa_mask)


def choose_attention(device: torch.device, dtype: torch.dtype) -> str:
    """'flash_attention_2' on cuda in 16-bit where flash-attn is installed and works; on cpu in 16-bit,
    SDPA with the decode step in float32, in our kernel where it runs (`native_decode`, else
    `sdpa_fp32_decode`); else 'sdpa'."""
    if device.type == "cpu" and dtype != torch.float32:
        return CPU_DECODE_NATIVE if cpu_native.available() else CPU_DECODE_FP32
    if device.type != "cuda" or dtype == torch.float32 or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    why = probe_flash_attn(device, dtype)
    if why is None:
        return "flash_attention_2"
    print(f"offload: flash-attn is installed but does not work here ({why}): using PyTorch SDPA attention",
          file=sys.stderr)
    return "sdpa"
