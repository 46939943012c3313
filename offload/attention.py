"""Which attention implementation the model gets: flash-attn 2 only where a tiny call of it works
(a wheel built against another torch fails at import with an undefined symbol, or at the first
launch on a GPU it has no kernels for), else PyTorch's SDPA, with a one-line notice."""
import importlib.util
import sys

import torch
import torch.nn.functional as F


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


def choose_attention(device: torch.device, dtype: torch.dtype) -> str:
    """'flash_attention_2' on cuda in 16-bit where flash-attn is installed and works, else 'sdpa'."""
    if device.type != "cuda" or dtype == torch.float32 or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    why = probe_flash_attn(device, dtype)
    if why is None:
        return "flash_attention_2"
    print(f"offload: flash-attn is installed but does not work here ({why}): using PyTorch SDPA attention",
          file=sys.stderr)
    return "sdpa"
