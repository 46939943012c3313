"""`OffloadedLinear` and the module swap: an HF model built without weights whose nn.Linear
layers fetch their int4 weight from the device cache on every call."""
import contextlib

import torch
from torch import nn
from transformers import AutoModelForCausalLM


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


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model (decoder projections and lm_head), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


class OffloadedLinear(nn.Module):
    """nn.Linear whose weight lives in the offload cache: acquire the slot, compute, release."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool, provider):
        super().__init__()
        self.key, self.in_features, self.out_features = key, in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self._provider = provider  # the Prefetcher; a plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        slot = self._provider.acquire(self.key)
        try:
            return self._provider.fmt.linear(x, slot.data, self.bias)
        finally:
            self._provider.release(slot)

    def extra_repr(self) -> str:
        return f"{self.key}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(model: nn.Module, keys, provider) -> None:
    """Replace the nn.Linear named in `keys` (weight names 'a.b.weight') with OffloadedLinear."""
    for key in keys:
        module_name = key.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, OffloadedLinear(key, old.in_features, old.out_features, old.bias is not None, provider))
