"""The weights dir: a streaming quantizer (HF safetensors -> int4 shards + JSON manifest) and its reader.

weights/
  offload.json                  manifest: format version, block size, source, per-tensor shape/role/shard
  model-00001.safetensors ...   "<name>.qweight" uint8 [N, Kp/2] + "<name>.scales" bf16 [N, Kp/128] per linear,
                                unquantized tensors (embeddings, norms, biases) under their own names
  config.json, tokenizer files  copied so the dir is self-contained
A linear's manifest record says its "quant": int4 (every decoder linear), or for the output projection
also int8 ("<name>.qweight" int8 [N, Kp] + "<name>.scales", see offload.int8) or bf16 ("<name>.weight").
The manifest also records the method (absmax, mse, gptq: offload.methods) and its options.
Only safetensors and JSON are read: no pickle anywhere.
"""
import hashlib
import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from . import int8, methods, quant
from .errors import OffloadError
from .modules import empty_model, linear_modules
from .units import fmt_bytes

MANIFEST = "offload.json"
FORMAT_VERSION = 1
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
              "added_tokens.json", "chat_template.jinja", "chat_template.json")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Defaults chosen by measurement (benchmarks/README.md, "Quantization methods"): mse decoder linears and
# an int8 output projection come within a point of GPTQ's perplexity at a fraction of its cost, with
# no calibration text and no forward pass; an int4 output projection costs the most accuracy per byte.
DEFAULT_METHOD = "mse"
DEFAULT_LM_HEAD = "int8"
LM_HEAD_PRECISIONS = ("int4", "int8", "bf16")
LINEAR_QUANTS = LM_HEAD_PRECISIONS  # what a linear's manifest record may say


def _source_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise OffloadError(f"no *.safetensors files in {model_dir} (offload reads safetensors only, never pickle)")
    return files


def tensor_role(name: str, module) -> str:
    """The manifest role of an unquantized tensor: bias, embedding, norm or other."""
    if name.endswith(".bias"):
        return "bias"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return "other"


class _ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `shard_bytes` is reached."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_names: list[dict] = []  # manifest records waiting for their shard name
        self.size, self.count = 0, 0
        self.shards: dict[str, int] = {}

    def add(self, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.pending.update({k: v.contiguous() for k, v in tensors.items()})
        self.pending_names.append(record)
        self.size += sum(v.numel() * v.element_size() for v in tensors.values())
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.count += 1
        name = f"model-{self.count:05d}.safetensors"
        save_file(self.pending, str(self.out / name), metadata={"format": "offload-int4"})
        self.shards[name] = (self.out / name).stat().st_size
        for record in self.pending_names:
            record["shard"] = name
        self.pending, self.pending_names, self.size = {}, [], 0


def quantize_model(model_dir, weights_dir, *, block_size=quant.BLOCK_SIZE, device="cpu",
                   shard_bytes=1 << 30, force=False, progress=True, method=DEFAULT_METHOD,
                   calibration=None, lm_head=DEFAULT_LM_HEAD) -> Path:
    """Quantize an HF safetensors model dir into a weights dir, one tensor at a time.

    method: "absmax" | "mse" | "gptq" (see offload.methods); every method writes the same int4 layout.
    calibration: a plain text file, required by gptq (its activations drive the error compensation).
    lm_head: precision of the output projection: "int8" (default) or "bf16", kept resident on the
    device, or "int4", streamed through the cache like every other linear.
    Writes into a temporary sibling dir and renames it at the end, so an interrupted run never
    leaves a weights dir that looks complete.
    """
    model_dir, out = Path(model_dir), Path(weights_dir)
    if not (model_dir / "config.json").exists():
        raise OffloadError(f"{model_dir} is not a model dir (no config.json)")
    if out.exists() and not force:
        raise OffloadError(f"{out} already exists (use --force to replace it)")
    options = _method_options(method, calibration, lm_head)
    config = AutoConfig.from_pretrained(model_dir)
    skeleton = empty_model(config)
    linears = linear_modules(skeleton)
    modules = dict(skeleton.named_modules())
    wanted = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    linear_keys = {f"{name}.weight" for name in linears}
    head = skeleton.get_output_embeddings()
    options["head_key"] = next((f"{n}.weight" for n, m in linears.items() if m is head), None)

    with atomic_dir(out) as tmp:
        manifest = _quantize_tensors(model_dir, tmp, config, wanted, linear_keys, modules,
                                     block_size, device, shard_bytes, progress, options)
        for f in SIDE_FILES:
            if (model_dir / f).exists():
                shutil.copy2(model_dir / f, tmp / f)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temporary sibling dir that replaces `out` only when the block completes."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _method_options(method, calibration, lm_head) -> dict:
    if method not in methods.METHODS:
        raise OffloadError(f"unknown quantization method {method!r} (choose from {', '.join(methods.METHODS)})")
    if lm_head not in LM_HEAD_PRECISIONS:
        raise OffloadError(f"unknown lm_head precision {lm_head!r} (choose from {', '.join(LM_HEAD_PRECISIONS)})")
    options = {"method": method, "lm_head": lm_head}
    if method == "gptq":
        if calibration is None:
            raise OffloadError("method gptq needs a calibration text file (--calibration FILE)")
        path = Path(calibration)
        if not path.is_file():
            raise OffloadError(f"calibration file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        options.update(calibration_text=text, calibration=path.name,
                       calibration_sha256=hashlib.sha256(text.encode()).hexdigest(),
                       damp=methods.GPTQ_DAMP, seq_len=methods.GPTQ_SEQ_LEN)
    elif calibration is not None:
        raise OffloadError(f"--calibration is used by method gptq only, not {method}")
    if method == "mse":
        options["grid"] = [min(methods.MSE_GRID), max(methods.MSE_GRID), len(methods.MSE_GRID)]
    return options


def _linear_record(key, src, options, block_size, device):
    """Quantize one linear weight the way `options` says -> (manifest record, tensors to store)."""
    stem = key.removesuffix(".weight")
    precision = options["lm_head"] if key == options["head_key"] else "int4"
    record = {"role": "linear", "shape": list(src.shape), "quant": precision}
    if precision == "bf16":
        record.update(dtype="bfloat16", keys=[key])
        return record, {key: src.to(torch.bfloat16)}
    if precision == "int8":
        qweight, scales = int8.quantize(src.to(device), block_size)
    else:
        qweight, scales = methods.quantize_weight(src.to(device), options["method"], block_size)
    record["keys"] = [f"{stem}.qweight", f"{stem}.scales"]
    return record, {f"{stem}.qweight": qweight.cpu(), f"{stem}.scales": scales.cpu()}


def _quantize_tensors(model_dir, tmp, config, wanted, linear_keys, modules, block_size, device,
                      shard_bytes, progress, options) -> dict:
    files = _source_files(model_dir)
    names = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            names.update({k: f for k in sf.keys()})
    # Tied output embedding: lm_head has no tensor of its own; quantize a copy of the input embedding.
    tied = [k for k in linear_keys if k not in names]
    embed_key = None
    if tied:
        embed_key = next((f"{n}.weight" for n, m in modules.items()
                          if isinstance(m, torch.nn.Embedding) and f"{n}.weight" in names), None)
        if not getattr(config, "tie_word_embeddings", False) or embed_key is None:
            raise OffloadError(f"{model_dir} has no tensor for {sorted(tied)[0]}")

    writer = _ShardWriter(tmp, shard_bytes)
    tensors, t0 = {}, time.time()
    # GPTQ needs each layer's activations: its int4 linears are quantized after this loop, layer by layer.
    deferred = set()
    if options["method"] == "gptq":
        deferred = {k for k in linear_keys if not (k == options["head_key"] and options["lm_head"] != "int4")}
    jobs = [(k, names[k]) for k in names if k in wanted] + [(k, names[embed_key]) for k in tied]
    for key, f in tqdm(jobs, desc="quantizing", unit="tensor", disable=not progress):
        with safe_open(f, framework="pt") as sf:
            src = sf.get_tensor(embed_key if key in tied else key)
        if tuple(src.shape) != wanted[key]:
            raise OffloadError(f"{key}: shape {tuple(src.shape)} in {f.name} but the config wants {wanted[key]}")
        if src.dtype not in FLOAT_DTYPES:
            raise OffloadError(f"{key}: unsupported dtype {src.dtype} (bf16, fp16 or fp32 expected)")
        if key in deferred:
            del src
            continue
        if key in linear_keys:
            record, stored = _linear_record(key, src, options, block_size, device)
            writer.add(record, stored)
        else:
            module = modules.get(key.rpartition(".")[0])
            record = {"role": tensor_role(key, module), "shape": list(src.shape), "dtype": str(src.dtype).removeprefix("torch."),
                      "keys": [key]}
            writer.add(record, {key: src})
        tensors[key] = record
        del src
    if deferred:
        results = methods.gptq_model(model_dir, options["calibration_text"], deferred, block_size=block_size,
                                     device=device, seq_len=options["seq_len"], damp=options["damp"],
                                     progress=progress)
        for key, packed, scales in results:
            stem = key.removesuffix(".weight")
            tensors[key] = {"role": "linear", "shape": list(wanted[key]), "quant": "int4",
                            "keys": [f"{stem}.qweight", f"{stem}.scales"]}
            writer.add(tensors[key], {f"{stem}.qweight": packed, f"{stem}.scales": scales})
    writer.flush()
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise OffloadError(f"{model_dir} has no tensor for {missing[0]} ({len(missing)} missing)")
    return {"format": "offload-int4", "format_version": FORMAT_VERSION, "block_size": block_size,
            "method": options["method"], "lm_head": options["lm_head"],
            "method_options": {k: v for k, v in options.items() if k not in ("method", "lm_head", "head_key",
                                                                               "calibration_text")},
            "source_model": str(model_dir.resolve()),
            "model_type": config.model_type, "architectures": getattr(config, "architectures", None),
            "quantize_seconds": round(time.time() - t0, 2), "shards": writer.shards, "tensors": tensors}


@dataclass
class TensorInfo:
    name: str
    role: str
    shape: tuple
    shard: Path
    keys: list
    quant: str | None = None  # linears: int4 (streamed through the cache), int8 or bf16 (resident)


class WeightsDir:
    """Reads and checks a weights dir written by `quantize_model`."""

    def __init__(self, path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise OffloadError(f"weights dir {self.path} does not exist (create it with offload-quantize)")
        if not manifest_path.exists():
            raise OffloadError(f"{self.path} is not a weights dir: no {MANIFEST} (create it with offload-quantize)")
        try:
            m = json.loads(manifest_path.read_text())
            version, self.block_size = m["format_version"], int(m["block_size"])
            shards, tensors = m["shards"], m["tensors"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise OffloadError(f"{manifest_path} is corrupt ({type(e).__name__}: {e})") from e
        if version != FORMAT_VERSION:
            raise OffloadError(f"{manifest_path}: format version {version}, this offload reads {FORMAT_VERSION}")
        self.manifest = m
        for shard, size in shards.items():
            f = self.path / shard
            if not f.exists():
                raise OffloadError(f"shard {f} is missing")
            if f.stat().st_size != size:
                raise OffloadError(f"shard {f} is corrupt or truncated ({f.stat().st_size} bytes, manifest says {size})")
        self.tensors = {name: TensorInfo(name, t["role"], tuple(t["shape"]), self.path / t["shard"], t["keys"],
                                         t.get("quant", "int4") if t["role"] == "linear" else None)
                        for name, t in tensors.items()}
        for t in self.tensors.values():
            if t.role == "linear" and t.quant not in LINEAR_QUANTS:
                raise OffloadError(f"{manifest_path}: {t.name} has quant {t.quant!r}, this offload reads "
                                   f"{', '.join(LINEAR_QUANTS)}")

    @property
    def linears(self) -> dict[str, TensorInfo]:
        """The int4 matrices: what the host store holds and the device cache streams."""
        return {n: t for n, t in self.tensors.items() if t.role == "linear" and t.quant == "int4"}

    @property
    def resident_linears(self) -> dict[str, TensorInfo]:
        """Linears stored as int8 or bf16 (the output projection): loaded to the device once, never streamed."""
        return {n: t for n, t in self.tensors.items() if t.role == "linear" and t.quant != "int4"}

    def read(self, name: str) -> list[torch.Tensor]:
        """The stored tensors of `name`: [qweight, scales] for a linear, [tensor] otherwise."""
        return next(self.iter_read([name]))[1]

    def iter_read(self, names):
        """(name, stored tensors) for each of `names`, opening each shard once."""
        names = list(names)
        for shard in dict.fromkeys(self.tensors[n].shard for n in names):
            try:
                with safe_open(shard, framework="pt") as sf:
                    for name in names:
                        if self.tensors[name].shard == shard:
                            yield name, [sf.get_tensor(k) for k in self.tensors[name].keys]
            except OffloadError:
                raise
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise OffloadError(f"cannot read {shard}: {e}") from e

    def check_config(self, model) -> None:
        """Fail if the manifest's tensors do not match the model built from the config."""
        linears = {f"{n}.weight": tuple(m.weight.shape) for n, m in linear_modules(model).items()}
        stored = {**self.linears, **self.resident_linears}
        for key, shape in linears.items():
            if key not in stored:
                raise OffloadError(f"manifest of {self.path} does not match the config: no quantized {key}")
            if stored[key].shape != shape:
                raise OffloadError(f"manifest of {self.path} does not match the config: {key} is "
                                   f"{list(stored[key].shape)}, the config wants {list(shape)}")
        extra = sorted(set(stored) - set(linears))
        if extra:
            raise OffloadError(f"manifest of {self.path} does not match the config: unexpected {extra[0]}")

    def describe(self) -> str:
        sizes = [quant.quantized_nbytes(t.shape, self.block_size) for t in self.linears.values()]
        resident = "".join(f" + {n} {t.quant}" for n, t in self.resident_linears.items())
        method = self.manifest.get("method", "absmax")
        return f"{len(sizes)} int4 matrices ({method}), {fmt_bytes(sum(a + b for a, b in sizes))}{resident}"
