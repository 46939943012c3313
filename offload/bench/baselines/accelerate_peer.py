"""The `accelerate` peer: the same HF model in the compute dtype through accelerate's big-model
dispatch, `max_memory` set to the same device budget and the rest on the CPU: what users reach for
(`from_pretrained(device_map="auto", max_memory=...)`).

Same model: the dense weights are the dequantized int4 weights (for synthetic and real models alike), with
an untied lm_head (offload quantizes lm_head into its own int4 matrix while the input embedding stays exact).
The dense host copy is built once (`DenseHostModel`) and dispatched again for every budget; its tensors are
shared, not copied, by every dispatch.

On cpu, device and host memory are the same: there is nothing to offload, max_memory has no effect, and the
peer is the plain dense HF model (the "dense" baseline).
"""
import copy

import psutil
import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import set_module_tensor_to_device

from offload.modules import empty_model

from .dense import linear_weight
from offload.timing import PassTimer

RAM_HEADROOM = 2 << 30


class Skip(Exception):
    """The peer cannot run here; the message says why."""


def dense_nbytes(weights, dtype) -> int:
    elt = torch.finfo(dtype).bits // 8
    return sum(torch.Size(t.shape).numel() * elt for t in weights.tensors.values())


class DenseHostModel:
    """The dense model's tensors in host RAM: linears dequantized from int4 into `dtype`."""

    def __init__(self, config, weights, dtype, device):
        need = dense_nbytes(weights, dtype)
        available = psutil.virtual_memory().available
        if need + RAM_HEADROOM > available:
            raise Skip(f"the {str(dtype).removeprefix('torch.')} model needs {need / 2**30:.1f} GiB of host RAM "
                       f"(+{RAM_HEADROOM >> 30} GiB headroom), {available / 2**30:.1f} GiB available")
        self.config = copy.deepcopy(config)
        self.config.tie_word_embeddings = False
        self.dtype = dtype
        device = torch.device(device)
        self.tensors = {}
        for name, parts in weights.iter_read(list(weights.tensors)):
            info = weights.tensors[name]
            if info.role == "linear":  # dequantized on the GPU where there is one: much faster
                w = linear_weight(info, parts, dtype, device if device.type == "cuda" else None).cpu()
            else:
                (w,) = parts
                w = w.to(dtype) if w.is_floating_point() else w
            self.tensors[name] = w.contiguous()
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())


class AcceleratePeer:
    name = "accelerate"

    def __init__(self, host: DenseHostModel, budget_bytes: int, device):
        self.device, self.dtype = torch.device(device), host.dtype
        model = empty_model(host.config, host.dtype)
        for name, t in host.tensors.items():
            set_module_tensor_to_device(model, name, "cpu", value=t)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"accelerate peer: no tensor for {missing[0]}")
        model.eval()
        self.offloaded_bytes = 0
        self.device_map = {"": "cpu"}
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            max_memory = {index: int(budget_bytes), "cpu": psutil.virtual_memory().total}
            self.device_map = infer_auto_device_map(
                model, max_memory=max_memory, no_split_module_classes=getattr(model, "_no_split_modules", None) or [],
                dtype=host.dtype)
            sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
            self.offloaded_bytes = sum(size for n, size in sizes.items()
                                       if self._placement(n) in ("cpu", "disk"))
            # as from_pretrained(device_map=...) does; forced hooks when nothing fits, so that the offloaded
            # modules still execute on the GPU
            model = dispatch_model(model, device_map=self.device_map, main_device=f"cuda:{index}",
                                   skip_keys=getattr(model, "_skip_keys_device_placement", None) or "past_key_values",
                                   force_hooks=set(self.device_map.values()) <= {"cpu", "disk"})
        self.model = model
        self.timer = PassTimer(model, self.device)
        self._param_bytes = host.nbytes

    def _placement(self, param_name: str):
        best = None
        for prefix, dev in self.device_map.items():
            if prefix == "" or param_name == prefix or param_name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, dev)
        return best[1] if best else None

    def reset_stats(self) -> None:
        self.timer.reset()

    @property
    def stats(self) -> dict:
        s = self.timer.stats()
        # every forward moves the offloaded weights to the device once (shared by the batch)
        s["offloaded_bytes_per_step"] = self.offloaded_bytes
        s["h2d_bytes_per_token"] = (self.offloaded_bytes * s["decode_steps"] / s["decode_tokens"]
                                    if s["decode_tokens"] else 0.0)
        s["hit_rate"] = None
        if s["peak_device_bytes"] is None:
            s["peak_device_bytes"] = self._param_bytes
        return s

    def describe(self) -> str:
        if self.device.type != "cuda":
            return f"accelerate: cpu, everything in RAM (dense {str(self.dtype).removeprefix('torch.')} HF model)"
        on_device = sorted({str(d) for d in self.device_map.values()})
        return (f"accelerate: device_map over {', '.join(on_device)}, "
                f"{self.offloaded_bytes / 2**30:.2f} GiB offloaded to the CPU (moved to the device every forward)")

    def close(self) -> None:
        self.timer.remove()
        self.model = None
