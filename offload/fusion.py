"""Fewer, larger matmuls: the q/k/v projections of an attention block and the gate/up projections of
an MLP read the same input, so at load their int4 rows are concatenated into one matrix (rows and
scales concatenate: the format is unchanged) and one product serves all of them. The HF model stays
the model: each original linear becomes a `FusedPart` that returns its columns of the shared product.

Only families whose forward calls the parts of a group one after another on the same tensor are fused
(`FUSED_FAMILIES`); any other architecture keeps one matrix per linear.
"""
import torch
from torch import nn

from .modules import replace_module

FUSED_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


def fusion_groups(model: nn.Module, streamed) -> dict[str, list[str]]:
    """{fused weight name: [part weight names]} for every q/k/v and gate/up set of streamed linears with
    the same input size and bias presence; {} for families outside FUSED_FAMILIES."""
    if getattr(model.config, "model_type", None) not in FUSED_FAMILIES:
        return {}
    groups = {}
    for prefix, module in model.named_modules():
        for fused, names in GROUPS:
            parts = [getattr(module, n, None) for n in names]
            keys = [f"{prefix}.{n}.weight" for n in names]
            if not all(isinstance(p, nn.Linear) for p in parts) or not all(k in streamed for k in keys):
                continue
            if len({p.in_features for p in parts}) == 1 and len({p.bias is None for p in parts}) == 1:
                groups[f"{prefix}.{fused}.weight"] = keys
    return groups


class FusedProduct:
    """One product x @ W_fused.T for the parts of a group; each part takes its columns.

    The first part called with a new input computes the whole product; the others get column views of
    it as long as they are called with the same tensor. A part called with another input recomputes, so
    any call order stays correct (only slower).
    """

    def __init__(self, key: str, out_features: list[int], provider):
        self.key, self.provider = key, provider
        self.bounds = [(sum(out_features[:i]), sum(out_features[:i + 1])) for i in range(len(out_features))]
        self.bias = None  # [sum N] concatenated from the parts' biases once they are loaded
        self._x = self._y = None
        self._left = 0

    def columns(self, i: int, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N_i]
        if x is not self._x or self._left == 0:
            self._y = self.provider.linear(self.key, x, self.bias)  # [..., sum N]
            self._x, self._left = x, len(self.bounds)
        self._left -= 1
        y = self._y[..., self.bounds[i][0]:self.bounds[i][1]]
        if self._left == 0:
            self._x = self._y = None  # keep no activation alive between passes
        return y


class FusedPart(nn.Module):
    """One linear of a fused group: its own bias parameter (loaded as usual), its columns of the product."""

    def __init__(self, product: FusedProduct, index: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.product, self.index = product, index
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        return self.product.columns(self.index, x)

    def extra_repr(self) -> str:
        return f"{self.product.key}[{self.index}], in_features={self.in_features}, out_features={self.out_features}"


def swap_fused(model: nn.Module, groups: dict[str, list[str]], provider) -> list[FusedProduct]:
    """Replace the parts of each group with FusedParts sharing one FusedProduct; -> the products."""
    products = []
    for fused, keys in groups.items():
        parts = [model.get_submodule(k.removesuffix(".weight")) for k in keys]
        product = FusedProduct(fused, [p.out_features for p in parts], provider)
        for i, (key, old) in enumerate(zip(keys, parts)):
            replace_module(model, key.removesuffix(".weight"), lambda old, i=i: FusedPart(
                product, i, old.in_features, old.out_features, old.bias is not None))
        products.append(product)
    return products


def gather_biases(model: nn.Module, products: list[FusedProduct]) -> None:
    """After the state dict is loaded: each product's bias is its parts' biases concatenated."""
    parts = {}
    for module in model.modules():
        if isinstance(module, FusedPart):
            parts.setdefault(id(module.product), []).append(module)
    for product in products:
        members = sorted(parts[id(product)], key=lambda m: m.index)
        if members[0].bias is not None:
            product.bias = torch.cat([m.bias for m in members])
