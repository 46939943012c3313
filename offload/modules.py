"""`OffloadedLinear` and the module swap: an HF model built without weights whose nn.Linear
layers fetch their int4 weight from the device cache on every call."""
import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from . import kernels, quant


@contextlib.contextmanager
def _params_on_meta():
    # Parameters go to the meta device as they are registered (no full-precision weight is ever
    # filled in); buffers such as rotary inv_freq are computed for real, they are small.
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config, dtype=torch.float32, attn_implementation="sdpa") -> nn.Module:
    """The HF causal LM for `config` with every parameter on the meta device."""
    with _params_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def kv_cache(kwargs: dict):
    """The KV cache in the keyword arguments of an HF forward or generate call, or None: transformers 5.25
    renamed `past_key_values` to `cache` (the old name still works there, deprecated)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def kv_cache_kwarg(model: nn.Module) -> str:
    """The name this transformers version's forward takes the KV cache by: "cache" or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model (decoder projections and lm_head), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


class OffloadedLinear(nn.Module):
    """nn.Linear whose weight lives in the offload cache: its provider (the prefetcher) computes
    x @ W.T + bias with the weight's slot."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool, provider):
        super().__init__()
        self.key, self.in_features, self.out_features = key, in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self._provider = provider  # the Prefetcher; a plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        return self._provider.linear(self.key, x, self.bias)

    def extra_repr(self) -> str:
        return f"{self.key}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (offload.quant's int8 layout) kept on the device: resident, never
    streamed. Used for the output projection with `--lm-head int8`; kernels.int8_linear computes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int = quant.BLOCK_SIZE):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kp = quant.padded_k(in_features, block_size)
        # Filled by load_state_dict(assign=True) from the weights dir; meta until then.
        self.qweight = nn.Parameter(torch.empty(out_features, kp, dtype=torch.int8, device="meta"), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, kp // block_size, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self._prepared = {}  # what kernels.int8_linear makes once from the weight on cpu (a repack or a dense copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        return kernels.int8_linear(x, self.qweight, self.scales, self.in_features, self.bias, prepared=self._prepared)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def replace_module(model: nn.Module, name: str, make) -> None:
    """Put make(old module) in place of the submodule called `name` ('a.b.c')."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, make(getattr(parent, child)))


def swap_linears(model: nn.Module, keys, provider) -> None:
    """Replace the nn.Linear named in `keys` (weight names 'a.b.weight') with OffloadedLinear."""
    for key in keys:
        replace_module(model, key.removesuffix(".weight"), lambda old: OffloadedLinear(
            key, old.in_features, old.out_features, old.bias is not None, provider))


def swap_int8_linears(model: nn.Module, keys, block_size: int = quant.BLOCK_SIZE) -> None:
    """Replace the nn.Linear named in `keys` (weight names 'a.b.weight') with Int8Linear."""
    for key in keys:
        replace_module(model, key.removesuffix(".weight"),
                       lambda old: Int8Linear(old.in_features, old.out_features, old.bias is not None, block_size))


class HostEmbedding(nn.Module):
    """nn.Embedding whose table stays in host RAM; each call gathers the rows it needs there and
    copies only those ([B, T, D], a few KiB per decode step) to the device. A 32B model's table is
    1.56 GB that the device cache gets instead."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx, device, runtime=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.device = torch.device(device)
        # [V, D] on the cpu, set by the engine. A plain attribute, not a parameter, so that
        # model.to(device) leaves it where it is.
        self.table = None
        # cuda: page-locked staging through offload.cudart (a fake in tests); None on cpu
        if runtime is None and self.device.type == "cuda":
            from .cudart import CudaRuntime
            runtime = CudaRuntime(self.device)
        self.runtime = runtime

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids long [B, T] -> [B, T, D] on the device
        if self.runtime is None:
            return F.embedding(ids.cpu(), self.table, self.padding_idx).to(self.device)
        # The rows are gathered on the host, so the host needs the ids the device sampled: this is
        # the one wait per step, for the sampler's work only (an event on the copy, no device-wide
        # synchronize, no pageable copy). Both copies go through page-locked buffers (torch's caching
        # host allocator keeps a buffer until the copy out of it has finished).
        host_ids = self.runtime.page_locked_empty(ids.numel() * ids.element_size()).view(ids.dtype).view(ids.shape)
        host_ids.copy_(ids, non_blocking=True)
        self.runtime.record_event().synchronize()
        d = self.embedding_dim
        rows = self.runtime.page_locked_empty(ids.numel() * d * self.table.element_size()).view(self.table.dtype)
        rows = rows.view(*ids.shape, d)  # [B, T, D]
        torch.index_select(self.table, 0, host_ids.reshape(-1), out=rows.view(-1, d))  # = F.embedding's forward
        return rows.to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host"


def swap_host_embedding(model: nn.Module, device) -> str | None:
    """Replace the input embedding with a HostEmbedding if it is a plain nn.Embedding (subclasses
    such as scaled embeddings stay as they are); -> its weight name, or None."""
    old = model.get_input_embeddings()
    if type(old) is not nn.Embedding:
        return None
    name = next(n for n, m in model.named_modules() if m is old)
    replace_module(model, name, lambda old: HostEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx,
                                                          device))
    return f"{name}.weight"
