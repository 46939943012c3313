"""A GGUF file (llama.cpp's format) as a source of HF tensors, read one tensor at a time.

The files are memory-mapped by the `gguf` package's reader. Each tensor is dequantized to float32 in
row chunks, the layout changes llama.cpp's converter made are undone by transformers' own tensor
processors (e.g. the Llama q/k rotary permutation), and its GGUF name is mapped to the HF parameter
name with transformers' name map. Config and tokenizer come from the GGUF metadata, built by
transformers (`gguf_file=`). Split models (`NAME-00001-of-00003.gguf` ...) are read as one.

Memory: one tensor in float32 (plus a permuted copy for q/k) and a row chunk of dequantization
temporaries; the mapped file pages a tensor touched are dropped from the process after it is read
(they stay in the page cache), so the resident size does not grow with the file.
"""
import hashlib
import json
import mmap
import re
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import OffloadError

SUFFIX = ".gguf"
SPLIT = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
DEQUANT_CHUNK = 32 << 20  # float32 bytes dequantized per step: bounds the temporaries of gguf's numpy code
HEADER_HASH_LIMIT = 64 << 20  # bytes of metadata + tensor infos hashed per file by `fingerprint`
_READ_ERRORS = (ValueError, IndexError, KeyError, TypeError, OSError, struct.error, UnicodeDecodeError)


def is_gguf(path) -> bool:
    """Whether `path` names a GGUF model: a .gguf file, or a dir with a .gguf and no config.json."""
    path = Path(path)
    if path.is_dir():
        return not (path / "config.json").exists() and any(path.glob(f"*{SUFFIX}"))
    return path.suffix == SUFFIX


def gguf_files(path) -> list[Path]:
    """The files of the GGUF model at `path` (a file, any part of a split model, or a dir holding one model)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{SUFFIX}"))
        models = {SPLIT.fullmatch(f.name)["stem"] if SPLIT.fullmatch(f.name) else f.stem for f in found}
        if len(models) != 1:
            raise OffloadError(f"{path} holds {len(models)} GGUF models ({', '.join(sorted(models)) or 'none'}): "
                               "name the .gguf file")
        path = found[0]
    if not path.is_file():
        raise OffloadError(f"GGUF file {path} does not exist" if not path.exists() else f"{path} is not a regular file")
    m = SPLIT.fullmatch(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}{SUFFIX}") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise OffloadError(f"split GGUF model {m['stem']} is incomplete: {missing[0]} is missing "
                           f"({len(missing)} of {count} parts)")
    return files


def _reader(path: Path):
    from gguf import GGUFReader
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise OffloadError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = GGUFReader(path)
    except _READ_ERRORS as e:
        raise OffloadError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    for t in reader.tensors:  # a truncated file maps fewer bytes than its tensor table promises
        if t.data.nbytes != t.n_bytes:
            raise OffloadError(f"{path} is truncated: tensor {t.name} lies past the end of the file")
    return reader


class GGUFSource:
    """The HF model stored in a GGUF file (or split set): config, tokenizer, and its tensors by HF name."""

    def __init__(self, path):
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, load_gguf_checkpoint)
        from .modules import empty_model
        self.files = gguf_files(path)
        self.path = self.files[0]
        match = SPLIT.fullmatch(self.path.name)
        self.name = match["stem"] if match else self.path.stem
        self.readers = [_reader(f) for f in self.files]
        self.gguf_tensors = {t.name: (reader, t) for reader in self.readers for t in reader.tensors}
        arch = self._field("general.architecture")
        try:
            parsed = _quiet(load_gguf_checkpoint, str(self.path), return_tensors=False)
            self.config = _quiet(AutoConfig.from_pretrained, self.path.parent, gguf_file=self.path.name,
                                 trust_remote_code=False)
        except (ValueError, KeyError, TypeError, NotImplementedError) as e:
            raise OffloadError(f"{self.path}: architecture {arch!r} cannot be read "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        # transformers looks for output.weight in the first file only; a split model may hold it in another
        self.config.tie_word_embeddings = "output.weight" not in self.gguf_tensors
        skeleton = empty_model(self.config)
        self.config.architectures = [type(skeleton).__name__]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        try:
            to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        except NotImplementedError as e:
            raise OffloadError(f"{self.path}: architecture {arch!r} has no GGUF name map ({e})") from None
        # the tokenizer's fields are the bulk of the metadata (an object per token): keep only the config
        self._parsed = {"config": parsed["config"]}
        self._header_bytes = [r.data_offset for r in self.readers]
        for r in self.readers:
            r.fields.clear()
        self._to_hf = to_hf
        self.where = {hf: g for g, hf in to_hf.items() if g in self.gguf_tensors}  # HF name -> GGUF name

    def _field(self, key: str):
        field = self.readers[0].fields.get(key)
        if field is None:
            raise OffloadError(f"{self.path} has no {key} in its metadata")
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    def keys(self):
        """The HF parameter names this file has a tensor for."""
        return self.where.keys()

    def label(self, key: str) -> str:
        """Where `key` is stored, for messages."""
        return f"{self.where[key]} in {self.gguf_tensors[self.where[key]][0].data.filename}"

    def tensor(self, key: str, fallback: str | None = None) -> torch.Tensor:
        """The HF tensor `key` (HF layout); `fallback` (a tied embedding) when the file has no `key`.

        float16 when the GGUF stores it as F16, else float32 (dequantized from any GGUF type)."""
        name = key if key in self.where else fallback
        if name not in self.where:
            raise OffloadError(f"{self.path} has no tensor for {key}")
        gguf_name = self.where[name]
        reader, t = self.gguf_tensors[gguf_name]
        try:
            weights = _dequantize(t)
            result = self.processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self._to_hf,
                                            parsed_parameters=self._parsed)
        except (ValueError, NotImplementedError) as e:
            raise OffloadError(f"{self.path}: cannot dequantize {gguf_name} ({t.tensor_type.name}): {e}") from None
        finally:
            _release(reader)
        if result.name != gguf_name:
            raise OffloadError(f"{self.path}: tensor {gguf_name} is stored in a layout offload cannot read "
                               f"(it becomes {result.name})")
        return torch.from_numpy(np.ascontiguousarray(result.weights))

    def fingerprint(self) -> str:
        """sha256 over each file's name, size and metadata + tensor table (everything before the tensor data)."""
        h = hashlib.sha256()
        for f, reader, n in zip(self.files, self.readers, self._header_bytes):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            h.update(reader.data[:min(n, HEADER_HASH_LIMIT)].tobytes())
        return h.hexdigest()

    def save_side_files(self, out: Path) -> None:
        """config.json, generation_config.json and the tokenizer files, built from the GGUF metadata."""
        from transformers import AutoTokenizer, GenerationConfig
        self.config.save_pretrained(out)
        GenerationConfig.from_model_config(self.config).save_pretrained(out)
        try:
            tokenizer = _quiet(AutoTokenizer.from_pretrained, self.path.parent, gguf_file=self.path.name,
                               trust_remote_code=False)
        except (ValueError, KeyError, TypeError, NotImplementedError, OSError) as e:
            raise OffloadError(f"{self.path}: cannot build its tokenizer "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        tokenizer.save_pretrained(out)


def _dequantize(t) -> np.ndarray:
    """One GGUF tensor -> float32 (float16 for F16) ndarray in numpy order (the HF shape), dequantized in row chunks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == GGMLQuantizationType.F16:
        return np.array(t.data, dtype=np.float16).reshape(shape)
    if t.tensor_type == GGMLQuantizationType.F32:
        return np.array(t.data, dtype=np.float32).reshape(shape)
    if t.tensor_type not in GGML_QUANT_SIZES:
        raise NotImplementedError(f"unknown GGML type {t.tensor_type}")
    cols = shape[-1]
    raw = t.data.reshape(-1, t.data.shape[-1])  # [rows, bytes per row]
    out = np.empty((raw.shape[0], cols), dtype=np.float32)
    step = max(1, DEQUANT_CHUNK // (4 * cols))
    for i in range(0, raw.shape[0], step):
        out[i:i + step] = dequantize(raw[i:i + step], t.tensor_type).reshape(-1, cols)
    return out.reshape(shape)


def _release(reader) -> None:
    """Drop the file pages mapped so far from this process (they stay in the page cache)."""
    mm = getattr(reader.data, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)


def _quiet(fn, *args, **kwargs):
    """Call a transformers GGUF loader without its progress and info logging."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def cost_hint(gguf: Path, weights_dir: Path) -> str:
    """What converting costs: the GGUF was quantized already, and int4 rounds its weights once more."""
    return (f"offload: {gguf.name} was quantized already; its weights are quantized to int4 once more: measure "
            f"what that costs with  offload-eval {gguf} {weights_dir} --text FILE")


def converted(path, progress=True) -> Path:
    """The weights dir of the GGUF model at `path`, converted once into the user cache dir and reused after.

    Keyed by the file's name and a hash of its metadata, so another file never reuses it; made again
    when it was made by another format version or with other defaults."""
    from .demo import cache_root
    from .methods import default_method
    from .weights import DEFAULT_LM_HEAD, FORMAT_VERSION, MANIFEST, quantize_model
    source = GGUFSource(path)
    fingerprint = source.fingerprint()
    out = cache_root() / "gguf" / f"{source.name}-{fingerprint[:16]}"
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        m = {}
    if (m.get("format_version"), m.get("method"), m.get("lm_head"), m.get("source_sha256")) != (
            FORMAT_VERSION, default_method(True, None), DEFAULT_LM_HEAD, fingerprint):
        print(f"offload: converting {source.path.name} to {out} (once)", file=sys.stderr)
        quantize_model(source.path, out, force=True, progress=progress)
        print(cost_hint(source.path, out), file=sys.stderr)
    return out
