"""Bits per weight of a weights dir and of a GGUF file, defined the same way for both.

  linears  the weight matrices of the decoder layers (q, k, v, o, gate, up, down): their stored bytes
           (int4 packed values + bf16 scales here; the GGUF tensors' bytes, whatever their types) x 8 /
           their number of weights (N x K, no padding). Block 32 with a bf16 scale is 4.5, 64 is 4.25,
           128 is 4.125 (a K not a multiple of the block pads and costs a little more).
  model    every stored tensor's bytes (embeddings, norms, the output projection, a tied one's own copy
           here) x 8 / the model's parameter count (a tied embedding counted once): the whole file per
           parameter, what a download or the host RAM pays.
"""
import re
from pathlib import Path

import torch

from .modules import empty_model, linear_modules
from .weights import WeightsDir

# GGUF names of the decoder layers' matrices (llama.cpp's tensor names, fused variants included)
GGUF_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down|gate_up))\.weight")


def weights_dir_bits(weights: WeightsDir, config) -> dict:
    """{"linears", "model"} bits per weight of a weights dir (see the module docstring); config: its HF config."""
    skeleton = empty_model(config)
    head = skeleton.get_output_embeddings()
    decoder = {f"{n}.weight" for n, m in linear_modules(skeleton).items() if m is not head}
    nbytes = weights.stored_nbytes()
    linear_weights = sum(torch.Size(weights.tensors[n].shape).numel() for n in decoder)
    params = {id(p): p.numel() for p in skeleton.parameters()}
    tied = getattr(config, "tie_word_embeddings", False) and head is not None
    if tied and head.weight is not skeleton.get_input_embeddings().weight:
        params.pop(id(head.weight))  # the meta skeleton holds an untied copy: a tied embedding counts once
    return {"linears": 8 * sum(nbytes[n] for n in decoder) / linear_weights,
            "model": 8 * sum(nbytes.values()) / sum(params.values())}


def gguf_bits(path: Path) -> dict:
    """{"linears", "model", "types", "output_type"} of a GGUF file: bits per weight as for a weights dir, how
    many decoder-linear weights each tensor type holds, and the output projection's type (the token
    embedding's when it is tied)."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    linear_bytes = linear_weights = all_bytes = all_weights = 0
    types = {}
    for t in reader.tensors:
        n, size = int(t.n_elements), int(t.n_bytes)
        all_bytes, all_weights = all_bytes + size, all_weights + n
        if GGUF_LINEAR.fullmatch(t.name):
            linear_bytes, linear_weights = linear_bytes + size, linear_weights + n
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + n
    by_name = {t.name: t.tensor_type.name for t in reader.tensors}
    return {"linears": 8 * linear_bytes / linear_weights, "model": 8 * all_bytes / all_weights, "types": types,
            "output_type": by_name.get("output.weight", by_name.get("token_embd.weight"))}
