"""GPTQ's memory: the bytes gptq() allocates, counted on cpu with a dispatch mode that follows every
tensor storage it creates until it is freed, against `gptq_peak_bytes`; then that arithmetic for the
32B model's layers, which must fit a 24 GB card."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from offload import methods

GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by storages created inside the mode (views and in-place ops add nothing)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def correlated_hessian(k, rows=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k))
    h = methods.Hessian(k)
    h.add(x)
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gptq_peak_matches_the_arithmetic(dtype):
    n, k = 96, 512  # K >> N, as down_proj: the [K, K] matrices dominate
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    h = correlated_hessian(k)
    expect = methods.gptq(w, h.h.clone(), factor_dtype=torch.float64)  # the float64 reference, not consumed
    with LiveBytes() as mode:
        got = methods.gptq(w, h, factor_dtype=dtype)
    assert h.h is None  # consumed: its memory is the factorization's
    predicted = methods.gptq_peak_bytes(n, k, dtype=dtype)
    # the arithmetic is an upper bound, and tight (within the small per-block temporaries)
    assert predicted * 0.9 <= mode.peak <= predicted * 1.02, (mode.peak, predicted)
    # float32 factorization: the same int4 values almost everywhere, the same scales
    same = (got[0] == expect[0]).float().mean().item()
    assert same > (0.999 if dtype == torch.float64 else 0.98), same


def test_gptq_on_the_32b_layers_fits_24gb():
    # Qwen2.5-32B: hidden 5120, intermediate 27648, 8 KV heads x 128, vocab 152064, untied lm_head
    hidden, inter, kv, vocab = 5120, 27648, 1024, 152064
    linears = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
               "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    layer = 4 * sum(n * k for n, k in linears.values())  # one float32 decoder layer on the device
    non_layer = 4 * 2 * vocab * hidden  # embedding + lm_head, float32 (gptq_model's LayerwiseModel)
    activations = 4 * methods.GPTQ_MAX_SEQUENCES * methods.GPTQ_SEQ_LEN * hidden
    # Hessians of the layer not yet consumed when down_proj is quantized: only its own (consumed by gptq)
    base = layer + non_layer + activations
    peak32 = base + methods.gptq_peak_bytes(*linears["down"], dtype=torch.float32)
    peak64 = base + methods.gptq_peak_bytes(*linears["down"], dtype=torch.float64)
    print(f"GPTQ peak on the 32B down_proj: float64 factor {peak64 / GB:.1f} GB, float32 {peak32 / GB:.1f} GB")
    card = 24 * 2**30  # a "24 GB" card (RTX 3090/4090): 24 GiB
    assert peak64 < 0.9 * card  # the default, with room for the CUDA context and cuSOLVER's workspace
    assert peak64 - peak32 == 2 * 4 * inter * inter  # what float64 costs more: two K x K, 4 bytes more each
    assert methods.GPTQ_FACTOR_DTYPE == torch.float64
    assert max(methods.gptq_peak_bytes(n, k) for n, k in linears.values()) == methods.gptq_peak_bytes(hidden, inter)
