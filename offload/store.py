"""The weights dir: a streaming quantizer (HF safetensors -> int4 shards + JSON manifest) and its reader.

weights/
  offload.json                  manifest: format version, block size, source, per-tensor shape/role/shard
  model-00001.safetensors ...   "<name>.qweight" uint8 [N, Kp/2] + "<name>.scales" bf16 [N, Kp/128] per linear,
                                unquantized tensors (embeddings, norms, biases) under their own names
  config.json, tokenizer files  copied so the dir is self-contained
A linear's manifest record says its "quant": int4 (every decoder linear), or for the output projection
also int8 ("<name>.qweight" int8 [N, Kp] + "<name>.scales", see offload.quant) or bf16 ("<name>.weight").
The manifest also records the method (absmax, mse, gptq: offload.methods) and its options.
Only safetensors and JSON are read: no pickle anywhere.
"""
import hashlib
import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm
from transformers import AutoConfig

from . import methods, quant
from .errors import OffloadError
from .modules import empty_model, linear_modules
from .source import check_no_custom_code, contained, regular_file, source_files, source_fingerprint
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


ROLES = ("linear", "bias", "embedding", "norm", "other")
MIN_BLOCK_SIZE = 64  # the smallest scale block the fused kernels take (offload/kernels/gemm.py MIN_GROUP)
SHARD_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "BOOL": torch.bool}
READ_CHUNK = 16 << 20  # bytes per read while hashing a shard


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
        self.sha256: dict[str, str] = {}

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
        data = save(self.pending, metadata={"format": "offload-int4"})  # the bytes hashed are the bytes written
        (self.out / name).write_bytes(data)
        self.shards[name], self.sha256[name] = len(data), hashlib.sha256(data).hexdigest()
        del data
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
    leaves a weights dir that looks complete; an existing weights dir (force) is replaced only then.
    Refuses an output that is the model dir, contains it or the current dir, or is a non-empty dir
    that is not a weights dir (nothing it did not write is ever deleted).
    """
    model_dir, out = Path(model_dir), Path(weights_dir)
    if not (model_dir / "config.json").exists():
        raise OffloadError(f"{model_dir} is not a model dir (no config.json)")
    _check_output(model_dir, out, force)
    if not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise OffloadError(f"block size must be a power of two, at least {MIN_BLOCK_SIZE} (the kernels' "
                           f"smallest scale block), got {block_size}")
    options = _method_options(method, calibration, lm_head)
    check_no_custom_code(model_dir)
    regular_file(model_dir / "config.json", "config")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    skeleton = empty_model(config)
    linears = linear_modules(skeleton)
    head_module = skeleton.get_output_embeddings()
    if not any(m is not head_module for m in linears.values()):
        raise OffloadError(f"{model_dir} ({config.model_type}) has no nn.Linear layers in its decoder to quantize: "
                           "offload supports decoders built from nn.Linear (Llama, Qwen2, Mistral, Gemma families), "
                           "not GPT-2 style Conv1D")
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


def _check_output(model_dir: Path, out: Path, force: bool) -> None:
    src, dst = model_dir.resolve(), out.resolve()
    if src.is_relative_to(dst):
        raise OffloadError(f"output {out} is the model dir or contains it: choose a new dir")
    if Path.cwd().resolve().is_relative_to(dst):
        raise OffloadError(f"output {out} is the current dir or contains it: choose a new dir")
    if out.exists() or out.is_symlink():
        if not force:
            raise OffloadError(f"{out} already exists (use --force to replace it)")
        _check_replaceable(out, MANIFEST)


def _check_replaceable(out: Path, marker: str) -> None:
    if out.is_symlink() or not out.is_dir():
        raise OffloadError(f"{out} exists and is not a directory: not replacing it")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise OffloadError(f"{out} is not empty and has no {marker}: not replacing a dir offload did not write")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Temp dirs of runs that were killed: `.NAME.tmp-PID` is removed; `.NAME.old-PID` (a run killed
    between moving the old dir aside and the new one in) is put back when NAME is missing."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m is None or not p.is_dir() or p.is_symlink() or _pid_alive(int(m[2])):
            continue
        if m[1] == "old" and not out.exists():
            os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path, marker: str = MANIFEST):
    """Yield a temporary sibling dir that replaces `out` only when the block completes.

    An existing `out` must be empty or hold `marker` (it is something this program wrote); it is
    moved aside, the new dir moved in, and only then removed, so a kill at any moment leaves a
    complete dir (or, between the two renames, one the next run puts back). Temp dirs of killed
    runs are removed first.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        _check_replaceable(out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


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
        qweight, scales = quant.quantize_int8(src.to(device), block_size)
    else:
        qweight, scales = methods.quantize_weight(src.to(device), options["method"], block_size)
    record["keys"] = [f"{stem}.qweight", f"{stem}.scales"]
    return record, {f"{stem}.qweight": qweight.cpu(), f"{stem}.scales": scales.cpu()}


def _quantize_tensors(model_dir, tmp, config, wanted, linear_keys, modules, block_size, device,
                      shard_bytes, progress, options) -> dict:
    files = source_files(model_dir)
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
            "source_model": model_dir.resolve().name, "source_sha256": source_fingerprint(model_dir, files),
            "model_type": config.model_type, "architectures": getattr(config, "architectures", None),
            "quantize_seconds": round(time.time() - t0, 2), "shards": writer.shards,
            "shard_sha256": writer.sha256, "tensors": tensors}


@dataclass
class TensorInfo:
    name: str
    role: str
    shape: tuple
    shard: Path
    keys: list
    quant: str | None = None  # linears: int4 (streamed through the cache), int8 or bf16 (resident)


def _check_manifest(manifest_path: Path, block_size, shards, tensors, sha256) -> dict[str, TensorInfo]:
    """Every field the reader uses, with the type it needs -> {name: TensorInfo}."""
    def bad(what):
        return OffloadError(f"{manifest_path} is corrupt: {what}")

    root = manifest_path.parent
    if type(block_size) is not int or block_size <= 0 or block_size % 2:
        raise bad(f"block_size {block_size!r} is not a positive even integer")
    if not isinstance(shards, dict) or not isinstance(tensors, dict):
        raise bad("shards and tensors must be objects")
    for shard, size in shards.items():
        if type(size) is not int or size < 0:
            raise bad(f"shard {shard} has size {size!r}, not a byte count")
    if sha256 is not None and (not isinstance(sha256, dict) or set(sha256) != set(shards)
                               or not all(isinstance(v, str) for v in sha256.values())):
        raise bad("shard_sha256 does not list one hash per shard")
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, dict):
            raise bad(f"tensor {name} is not an object")
        for field in ("role", "shape", "shard", "keys"):
            if field not in t:
                raise bad(f"tensor {name} has no {field}")
        if t["role"] not in ROLES:
            raise bad(f"tensor {name} has role {t['role']!r} (one of {', '.join(ROLES)})")
        if (not isinstance(t["shape"], list) or not t["shape"]
                or not all(type(d) is int and d > 0 for d in t["shape"])):
            raise bad(f"tensor {name} has shape {t['shape']!r}")
        if t["shard"] not in shards:
            raise bad(f"tensor {name} is in shard {t['shard']!r}, which the shards list does not have")
        if not isinstance(t["keys"], list) or not all(isinstance(k, str) for k in t["keys"]) or not t["keys"]:
            raise bad(f"tensor {name} has keys {t['keys']!r}")
        out[name] = TensorInfo(name, t["role"], tuple(t["shape"]), root / t["shard"], t["keys"],
                               t.get("quant", "int4") if t["role"] == "linear" else None)
    return out


def _read_header(f, size: int) -> tuple[dict, int]:
    """A safetensors header -> ({key: {dtype, shape, data_offsets}}, offset of the data)."""
    n = int.from_bytes(f.read(8), "little")
    if not 0 < n <= size - 8:
        raise OffloadError(f"cannot read {f.name}: bad safetensors header length {n}")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise OffloadError(f"cannot read {f.name}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise OffloadError(f"cannot read {f.name}: safetensors header is not an object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_range(f, start: int, end: int) -> torch.Tensor:
    data = torch.empty(end - start, dtype=torch.uint8)
    f.seek(start)
    if f.readinto(memoryview(data.numpy())) != end - start:
        raise OffloadError(f"shard {f.name} is truncated")
    return data


def _tensor(header: dict, key: str, base: int, fetch) -> torch.Tensor:
    """Tensor `key` of a shard; fetch(start, end) gives the shard's bytes [start, end) as uint8."""
    info = header.get(key)
    try:
        dtype = SHARD_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise OffloadError(f"shard has no readable tensor {key}") from None
    count = torch.Size(shape).numel()
    if not 0 <= begin <= end or end - begin != count * dtype.itemsize:
        raise OffloadError(f"shard tensor {key}: offsets {begin}..{end} do not fit {info['dtype']} {shape}")
    raw = fetch(base + begin, base + end)
    if raw.numel() != end - begin:
        raise OffloadError(f"shard tensor {key} lies past the end of its file")
    if not count:
        return torch.empty(shape, dtype=dtype)
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()  # a misaligned tensor in the shard buffer: viewed from its own copy
    return raw.view(dtype).view(shape)


class WeightsDir:
    """Reads and checks a weights dir written by `quantize_model`.

    Every shard path must stay inside the dir (a symlink to another file in the dir is fine, one
    leading out is refused) and be a regular file. The first read of a shard hashes all its bytes
    as they are read and compares the manifest's sha256 before any tensor is used; `verify=False`
    skips that. A dir from an older offload without hashes loads with a one-line notice.
    """

    def __init__(self, path, verify=True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise OffloadError(f"weights dir {self.path} does not exist (create it with offload-quantize)")
        if not manifest_path.exists():
            raise OffloadError(f"{self.path} is not a weights dir: no {MANIFEST} (create it with offload-quantize)")
        try:
            m = json.loads(regular_file(manifest_path, "manifest").read_text())
            version, self.block_size = m["format_version"], m["block_size"]
            shards, tensors = m["shards"], m["tensors"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise OffloadError(f"{manifest_path} is corrupt ({type(e).__name__}: {e})") from e
        if version != FORMAT_VERSION:
            raise OffloadError(f"{manifest_path}: format version {version}, this offload reads {FORMAT_VERSION}")
        self.manifest = m
        self.tensors = _check_manifest(manifest_path, self.block_size, shards, tensors, m.get("shard_sha256"))
        self.shard_sizes, self.sha256 = {}, {}
        for shard, size in shards.items():
            f = regular_file(contained(self.path, shard, "shard"), "shard")
            if f.stat().st_size != size:
                raise OffloadError(f"shard {f} is corrupt or truncated ({f.stat().st_size} bytes, manifest says {size})")
            self.shard_sizes[f] = size
            if verify and m.get("shard_sha256"):
                self.sha256[f] = m["shard_sha256"][shard]
        if verify and not m.get("shard_sha256"):
            print(f"offload: {self.path} has no shard checksums (made by an older offload): not verified",
                  file=sys.stderr)
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
        """(name, stored tensors) for each of `names`, reading each shard once.

        A shard not yet verified is read whole (its bytes hashed on the way, checked before any
        tensor is handed out); a verified one has only the wanted tensors' bytes read.
        """
        names = list(names)
        for shard in dict.fromkeys(self.tensors[n].shard for n in names):
            wanted = [n for n in names if self.tensors[n].shard == shard]
            try:
                with open(shard, "rb") as f:
                    header, base = _read_header(f, self.shard_sizes[shard])
                    if shard in self.sha256:
                        data = self._read_verified(f, shard)
                        fetch = lambda start, end: data[start:end]  # noqa: E731
                    else:
                        fetch = lambda start, end: _read_range(f, start, end)  # noqa: E731
                    for name in wanted:
                        yield name, [_tensor(header, k, base, fetch) for k in self.tensors[name].keys]
            except OSError as e:
                raise OffloadError(f"cannot read {shard}: {e}") from e

    def _read_verified(self, f, shard: Path) -> torch.Tensor:
        """The whole shard (uint8 [size]), hashed as it is read; raises on a mismatch."""
        size = self.shard_sizes[shard]
        data = torch.empty(size, dtype=torch.uint8)
        view, h, done = memoryview(data.numpy()), hashlib.sha256(), 0
        f.seek(0)
        while done < size:
            n = f.readinto(view[done:done + READ_CHUNK])
            if not n:
                raise OffloadError(f"shard {shard} is truncated")
            h.update(view[done:done + n])
            done += n
        if h.hexdigest() != self.sha256[shard]:
            raise OffloadError(f"shard {shard} is corrupt: its sha256 does not match the manifest "
                               "(quantize again, or --no-verify to load it anyway)")
        del self.sha256[shard]  # verified: later reads take only the bytes they need
        return data

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
