"""Run an HF model from its safetensors dir one decoder layer at a time, with bounded memory.

Only the parameters outside the decoder layers (embedding, final norm, lm_head) stay loaded; each
decoder layer is read from the source files, run on every sequence, and dropped before the next.
GPTQ calibration and the unquantized reference of `offload-eval` both walk the model this way, so
neither needs the full-precision model in memory at once.

How a layer is called without re-implementing the transformer: every decoder layer's `forward` is
replaced by a stub and the HF model runs as usual. The stubs record the arguments the model passes
to each layer (attention mask, rotary position embeddings, ...) and hand hidden states through, so
the model's own code computes everything around the layers.
"""
import contextlib

import torch
from torch import nn

from .errors import OffloadError
from .modules import empty_model
from .source import SourceModel


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (its output is not needed)."""


def _decoder_layers(model) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        raise OffloadError(f"{type(model).__name__}: no decoder layer list at base_model.layers "
                           "(layer-by-layer runs support the Llama/Qwen/Mistral family)")
    return layers


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class LayerwiseModel:
    """The HF model of `source` with only its non-layer parameters loaded.

    Typical use: `h = m.embed(ids)` per sequence, then for each `i, layer in m.layers()`:
    `h = m.run_layer(i, layer, h)`, and finally `m.logits(ids, h)`.
    """

    def __init__(self, source: SourceModel, device="cpu", dtype=torch.float32):
        self.source, self.device, self.dtype = source, torch.device(device), dtype
        self.model = empty_model(source.config, dtype, "sdpa")
        self.decoder_layers = _decoder_layers(self.model)
        index = {id(layer): i for i, layer in enumerate(self.decoder_layers)}
        self.layer_prefix = {index[id(m)]: f"{n}." for n, m in self.model.named_modules() if id(m) in index}
        self.head = self.model.get_output_embeddings()
        names = {id(m): n for n, m in self.model.named_modules()}
        self.head_key = f"{names[id(self.head)]}.weight"
        tied = getattr(source.config, "tie_word_embeddings", False)
        self.tied_to = f"{names[id(self.model.get_input_embeddings())]}.weight" if tied else None
        in_layers = tuple(self.layer_prefix.values())
        self._load(self.model, "", skip=in_layers)
        for module in self.model.modules():  # buffers (rotary tables) were built on the host
            for name, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[name] = buf.to(self.device)
        self.model.eval()
        self.kwargs = None  # what the model passes to each layer, recorded by `embed`

    def _load(self, module: nn.Module, prefix: str, skip=()) -> None:
        state = {}
        for name, _ in module.named_parameters(remove_duplicate=False):
            key = prefix + name
            if skip and key.startswith(skip):
                continue
            # a tied lm_head has no tensor of its own: it is the input embedding
            fallback = self.tied_to if key == self.head_key else None
            state[name] = self.source.tensor(key, fallback).to(self.device, self.dtype)
        module.load_state_dict(state, strict=False, assign=True)

    @contextlib.contextmanager
    def _stubbed(self, fn):
        # Instance attributes shadow nn.Module.forward; deleting them restores the real layers.
        for i, layer in enumerate(self.decoder_layers):
            layer.forward = (lambda i: lambda hidden_states, *args, **kwargs: fn(i, hidden_states, args, kwargs))(i)
        try:
            yield
        finally:
            for layer in self.decoder_layers:
                del layer.forward

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [1, L] -> the first decoder layer's input [1, L, H]. Records the per-layer arguments.

        Every sequence run through one LayerwiseModel must have the same length: the recorded
        arguments (causal mask, positions) are reused for all of them.
        """
        if self.kwargs is not None and ids.shape[1] != self.kwargs[0][2]:
            raise OffloadError(f"sequences of one layer-by-layer run must have one length "
                               f"({ids.shape[1]} != {self.kwargs[0][2]})")
        seen, first = [], []

        def record(i, hidden, args, kwargs):
            if i == 0:
                first.append(hidden)
            seen.append((args, kwargs, ids.shape[1]))
            if i == len(self.decoder_layers) - 1:
                raise StopForward  # the final norm is not needed yet
            return hidden

        with self._stubbed(record), contextlib.suppress(StopForward):
            self.model.base_model(input_ids=ids.to(self.device), use_cache=False)
        if self.kwargs is None:
            self.kwargs = seen
        return first[0]

    def layers(self):
        """(index, decoder layer with its weights loaded) for each layer in order; dropped after use."""
        for i, layer in enumerate(self.decoder_layers):
            self._load(layer, self.layer_prefix[i])
            try:
                yield i, layer
            finally:
                for module in layer.modules():  # back to meta: frees the layer's memory
                    for name, p in module._parameters.items():
                        if p is not None:
                            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    @torch.no_grad()
    def run_layer(self, i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, L, H] -> layer i's output [1, L, H], with the arguments the model passes it."""
        args, kwargs, _ = self.kwargs[i]
        return _layer_output(layer(hidden, *args, **kwargs))

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits [1, L, V] given the last decoder layer's output [1, L, H] for `ids` [1, L]."""
        last = len(self.decoder_layers) - 1

        def passthrough(i, hidden, args, kwargs):
            return final_hidden if i == last else hidden

        with self._stubbed(passthrough):
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    @torch.no_grad()
    def head_input(self, ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        """What the output projection receives [1, L, H] for `ids` [1, L]; the projection itself is skipped."""
        got = []

        def grab(module, args):
            got.append(args[0])
            raise StopForward

        handle = self.head.register_forward_pre_hook(grab)
        try:
            with contextlib.suppress(StopForward):
                self.logits(ids, final_hidden)
        finally:
            handle.remove()
        return got[0]
