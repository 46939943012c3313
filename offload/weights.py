"""The weights dir: a streaming quantizer (HF safetensors -> int4 shards + JSON manifest) and its reader.

weights/
  offload.json                  manifest: format version, block size, source, per-tensor shape/role/shard
  model-00001.safetensors ...   "<name>.qweight" uint8 [N, Kp/2] + "<name>.scales" bf16 [N, Kp/128] per linear,
                                unquantized tensors (embeddings, norms, biases) under their own names
  config.json, tokenizer files  copied so the dir is self-contained
A linear's manifest record says its "quant": int4 (the decoder linears), int8 ("<name>.qweight" int8 [N, Kp] +
"<name>.scales", see offload.quant: the output projection by default, decoder linears named by `int8`) or, for
the output projection, bf16 ("<name>.weight").
The manifest also records the method (absmax, mse, gptq, awq, awq+gptq: offload.methods) and its options.
Only safetensors and JSON are read: no pickle anywhere.
"""
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import methods, quant
from .errors import OffloadError
from .gguf_source import GGUFSource, is_gguf
from .modules import empty_model, linear_modules
from .source import SourceModel, contained, regular_file
from .units import fmt_bytes

MANIFEST = "offload.json"
FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Defaults chosen by measurement (benchmarks/README.md, "Quantization methods" and "Block sizes and the
# llama.cpp anchors"): "auto" is awq+gptq on an HF dir (methods.default_method), which on the demo model loses
# a third of mse's perplexity increase at block 128 and less than llama.cpp's Q4_0; an int8 output projection,
# as an int4 one costs the most accuracy per byte.
DEFAULT_METHOD = "auto"
DEFAULT_LM_HEAD = "int8"
LM_HEAD_PRECISIONS = ("int4", "int8", "bf16")
LINEAR_QUANTS = LM_HEAD_PRECISIONS  # what a linear's manifest record may say


ROLES = ("linear", "bias", "embedding", "norm", "other")
SHARD_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SHARD_DTYPES.items()}
READ_CHUNK = 16 << 20  # bytes per read while hashing a shard
QUANT_CHUNK = 32 << 20  # float32 bytes of a weight quantized at once (the methods' temporaries are a few times this)


def stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """How an unquantized tensor (embedding, norm, bias) is stored: float16 when the source is float16, else bf16."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


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
        """Write the pending tensors as one safetensors shard, streamed from the tensors themselves (no
        second copy of the shard in memory), hashing the bytes as they are written."""
        if not self.pending:
            return
        self.count += 1
        name = f"model-{self.count:05d}.safetensors"
        # widest elements first, as safetensors orders them, so every tensor's data stays aligned
        items = sorted(self.pending.items(), key=lambda kv: -kv[1].element_size())
        header, offset = {"__metadata__": {"format": "offload-int4"}}, 0
        for key, t in items:
            n = t.numel() * t.element_size()
            header[key] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        h, size = hashlib.sha256(), 0
        with open(self.out / name, "wb") as f:
            chunks = [len(head).to_bytes(8, "little"), head]
            chunks += [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for _, t in items]
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
        self.shards[name], self.sha256[name] = size, h.hexdigest()
        for record in self.pending_names:
            record["shard"] = name
        self.pending, self.pending_names, self.size = {}, [], 0


def quantize_model(model_dir, weights_dir, *, block_size=quant.BLOCK_SIZE, device="cpu",
                   shard_bytes=1 << 30, force=False, progress=True, method=DEFAULT_METHOD,
                   calibration=None, lm_head=DEFAULT_LM_HEAD, int8=()) -> Path:
    """Quantize an HF safetensors model dir, or a GGUF file (a dir holding one, a split set), into a
    weights dir, one tensor at a time. A GGUF's tensors are dequantized one by one (offload.gguf_source)
    and its config and tokenizer files are built from its metadata.

    method: "auto" (default: methods.default_method) | "absmax" | "mse" | "gptq" | "awq" | "awq+gptq" (see
    offload.methods); every method writes the
    same int4 layout (awq also rescales the norm weights before q/k/v and gate/up, stored unquantized).
    calibration: a plain text file for the calibrated methods (gptq, awq, awq+gptq): their activations
    drive the method; None takes the built-in text (offload/data/calibration.txt).
    lm_head: precision of the output projection: "int8" (default) or "bf16", kept resident on the
    device, or "int4", streamed through the cache like every other linear.
    int8: decoder linears stored in int8 instead of int4, each name "sensitive" (the measured mix of
    methods.sensitive_linears), a module's own name (down_proj: in every layer) or a glob on its full name
    (model.layers.0.*); resident on the device like an int8 output projection. More accuracy for more bytes.
    Writes into a temporary sibling dir and renames it at the end, so an interrupted run never
    leaves a weights dir that looks complete; an existing weights dir (force) is replaced only then.
    Refuses an output that is the model dir, contains it or the current dir, or is a non-empty dir
    that is not a weights dir (nothing it did not write is ever deleted).
    """
    model_dir, out = Path(model_dir), Path(weights_dir)
    gguf = is_gguf(model_dir)
    if not gguf and not (model_dir / "config.json").exists():
        raise OffloadError(f"{model_dir} is not a model dir (no config.json) nor a GGUF file")
    _check_output(model_dir, out, force)
    if type(block_size) is not int or block_size not in quant.BLOCK_SIZES:
        raise OffloadError(f"block size must be one of {', '.join(map(str, quant.BLOCK_SIZES))} (the sizes every "
                           f"kernel is compiled and tested for), got {block_size}")
    if gguf and method in methods.CALIBRATED:
        raise OffloadError(f"method {method} reads an HF safetensors model dir, not a GGUF file: use mse or absmax")
    source = GGUFSource(model_dir) if gguf else SourceModel(model_dir)
    config = source.config
    if method == "auto":
        method = methods.default_method(gguf, config.model_type)
    options = _method_options(method, calibration, lm_head)
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
    options["int8_keys"] = int8_linears([n for n, m in linears.items() if m is not head], int8)
    if int8:
        options["int8"] = list(int8)

    with atomic_dir(out) as tmp:
        manifest = _quantize_tensors(source, tmp, config, wanted, linear_keys, modules,
                                     block_size, device, shard_bytes, progress, options)
        source.save_side_files(tmp)
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


def int8_linears(decoder_linears: list[str], names) -> set[str]:
    """The weight keys of the decoder linears (module names) that `names` choose for int8: a name matches a
    module's own name (down_proj) or, as a glob, its full name (model.layers.0.*); "sensitive" is the measured mix
    of `methods.sensitive_linears`. A name matching none fails."""
    chosen = set()
    for name in names:
        if name == "sensitive":
            hits = methods.sensitive_linears(decoder_linears)
        else:
            hits = [m for m in decoder_linears if m.rpartition(".")[2] == name or fnmatch.fnmatchcase(m, name)]
        if not hits:
            own = sorted({m.rpartition(".")[2] for m in decoder_linears})
            raise OffloadError(f"--int8 {name}: no decoder linear is called that (this model's: {', '.join(own)}; "
                               "a glob on the full name, e.g. 'model.layers.0.*'; or sensitive)")
        chosen.update(f"{m}.weight" for m in hits)
    return chosen


def _method_options(method, calibration, lm_head) -> dict:
    if method not in methods.METHODS:
        raise OffloadError(f"unknown quantization method {method!r} (choose from {', '.join(methods.METHODS)})")
    if lm_head not in LM_HEAD_PRECISIONS:
        raise OffloadError(f"unknown lm_head precision {lm_head!r} (choose from {', '.join(LM_HEAD_PRECISIONS)})")
    options = {"method": method, "lm_head": lm_head}
    if method in methods.CALIBRATED:
        path = Path(calibration) if calibration is not None else methods.CALIBRATION_TEXT
        if not path.is_file():
            raise OffloadError(f"calibration file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        options.update(calibration_text=text, calibration=path.name if calibration is not None else "built-in",
                       calibration_sha256=hashlib.sha256(text.encode()).hexdigest(),
                       seq_len=methods.GPTQ_SEQ_LEN, scale_search=methods.default_scale_search(method))
        if method.endswith("gptq"):
            options.update(damp=methods.GPTQ_DAMP, act_order=True)
    elif calibration is not None:
        raise OffloadError(f"--calibration is used by the methods {', '.join(methods.CALIBRATED)} only, not {method}")
    if method == "mse":
        options["grid"] = [min(methods.MSE_GRID), max(methods.MSE_GRID), len(methods.MSE_GRID)]
    return options


def _by_rows(quantize, w: torch.Tensor, device):
    """quantize(rows) -> (qweight, scales) applied to row chunks of w [N, K] and concatenated: every method
    here scales each row's blocks on their own, so the result is the same and the float32 temporaries stay
    at QUANT_CHUNK bytes whatever the matrix."""
    step = max(1, QUANT_CHUNK // (4 * w.shape[1]))
    parts = [tuple(t.cpu() for t in quantize(rows.to(device))) for rows in w.split(step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _linear_record(key, src, options, block_size, device):
    """Quantize one linear weight the way `options` says -> (manifest record, tensors to store)."""
    stem = key.removesuffix(".weight")
    precision = options["lm_head"] if key == options["head_key"] else "int8" if key in options["int8_keys"] else "int4"
    record = {"role": "linear", "shape": list(src.shape), "quant": precision}
    if precision == "bf16":
        record.update(dtype="bfloat16", keys=[key])
        return record, {key: src.to(torch.bfloat16)}
    if precision == "int8":
        qweight, scales = _by_rows(lambda w: quant.quantize_int8(w, block_size), src, device)
    else:
        qweight, scales = _by_rows(lambda w: methods.quantize_weight(w, options["method"], block_size), src, device)
    record["keys"] = [f"{stem}.qweight", f"{stem}.scales"]
    return record, {f"{stem}.qweight": qweight, f"{stem}.scales": scales}


def _quantize_tensors(source, tmp, config, wanted, linear_keys, modules, block_size, device,
                      shard_bytes, progress, options) -> dict:
    model_dir, names = source.path, source.keys()
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
    # A calibrated method needs each layer's activations: its int4 linears (and, for awq, the norms that take
    # its scales) are quantized after this loop, layer by layer.
    deferred = set()
    if options["method"] in methods.CALIBRATED:
        deferred = {k for k in linear_keys if not (k == options["head_key"] and options["lm_head"] != "int4")}
    if options["method"].startswith("awq"):
        deferred |= {k for k in wanted if k.endswith(tuple(f".{n}.weight" for n in methods.AWQ_NORMS))}
    deferred_dtypes = {}  # key -> stored dtype of a deferred tensor, taken from the loop's read (no second read)
    jobs = [k for k in names if k in wanted] + tied
    for key in tqdm(jobs, desc="quantizing", unit="tensor", disable=not progress):
        src = source.tensor(key, embed_key)
        where = source.label(embed_key if key in tied else key)
        if tuple(src.shape) != wanted[key]:
            raise OffloadError(f"{key}: shape {tuple(src.shape)} in {where} but the config wants {wanted[key]}")
        if src.dtype not in FLOAT_DTYPES:
            raise OffloadError(f"{key}: unsupported dtype {src.dtype} (bf16, fp16 or fp32 expected)")
        if key in deferred:
            deferred_dtypes[key] = stored_dtype(src.dtype)  # a norm that takes AWQ scales is stored as it would be
            del src
            continue
        if key in linear_keys:
            record, stored = _linear_record(key, src, options, block_size, device)
            writer.add(record, stored)
        else:
            module = modules.get(key.rpartition(".")[0])
            dtype = stored_dtype(src.dtype)
            record = {"role": tensor_role(key, module), "shape": list(src.shape),
                      "dtype": str(dtype).removeprefix("torch."), "keys": [key]}
            writer.add(record, {key: src.to(dtype)})
        tensors[key] = record
        del src
    if deferred:
        results = methods.calibrated_model(model_dir, options["calibration_text"], deferred & set(linear_keys),
                                           int8_keys=options["int8_keys"],
                                           method=options["method"], block_size=block_size, device=device,
                                           seq_len=options["seq_len"], damp=options.get("damp", methods.GPTQ_DAMP),
                                           scale_search=options["scale_search"],
                                           act_order=options.get("act_order", True), progress=progress)
        for key, value in results:
            stem = key.removesuffix(".weight")
            if isinstance(value, tuple):  # a linear: int4, or int8 where asked
                tensors[key] = {"role": "linear", "shape": list(wanted[key]),
                                "quant": "int8" if key in options["int8_keys"] else "int4",
                                "keys": [f"{stem}.qweight", f"{stem}.scales"]}
                writer.add(tensors[key], {f"{stem}.qweight": value[0], f"{stem}.scales": value[1]})
            else:  # a norm weight that took AWQ scales
                dtype = deferred_dtypes[key]
                tensors[key] = {"role": "norm", "shape": list(value.shape), "dtype": str(dtype).removeprefix("torch."),
                                "keys": [key]}
                writer.add(tensors[key], {key: value.cpu().to(dtype)})
    writer.flush()
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise OffloadError(f"{model_dir} has no tensor for {missing[0]} ({len(missing)} missing)")
    return {"format": "offload-int4", "format_version": FORMAT_VERSION, "block_size": block_size,
            "method": options["method"], "lm_head": options["lm_head"],
            "method_options": {k: v for k, v in options.items() if k not in ("method", "lm_head", "head_key",
                                                                               "calibration_text", "int8_keys")},
            "source_model": model_dir.resolve().name, "source_sha256": source.fingerprint(),
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

    def stored_nbytes(self) -> dict[str, int]:
        """{tensor name: bytes its stored tensors take in the shards}, from the shards' headers."""
        sizes = {}
        for shard in dict.fromkeys(t.shard for t in self.tensors.values()):
            try:
                with open(shard, "rb") as f:
                    header, _ = _read_header(f, self.shard_sizes[shard])
            except OSError as e:
                raise OffloadError(f"cannot read {shard}: {e}") from e
            for key, info in header.items():
                try:
                    begin, end = (int(o) for o in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise OffloadError(f"shard {shard} has no readable tensor {key}") from None
                sizes[key] = end - begin
        try:
            return {name: sum(sizes[k] for k in t.keys) for name, t in self.tensors.items()}
        except KeyError as e:
            raise OffloadError(f"{self.path}: no stored tensor {e.args[0]} in its shard") from None

    def describe(self) -> str:
        sizes = [quant.quantized_nbytes(t.shape, self.block_size) for t in self.linears.values()]
        counts = {}  # resident linears: one name for a single one (the output projection), else a count
        for n, t in self.resident_linears.items():
            counts.setdefault(t.quant, []).append(n)
        resident = "".join(f" + {names[0]} {q}" if len(names) == 1 else f" + {len(names)} {q} matrices"
                           for q, names in counts.items())
        method = self.manifest.get("method", "absmax")
        return f"{len(sizes)} int4 matrices ({method}), {fmt_bytes(sum(a + b for a, b in sizes))}{resident}"
