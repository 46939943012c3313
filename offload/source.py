"""The inputs a user hands us, read safely: the checks every input path goes through (regular files
only, names kept inside their dir, no custom code) and the HF source model dir (its safetensors
shards listed once, fingerprinted, read one tensor at a time). Never reads pickle files."""
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from .errors import OffloadError

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
              "added_tokens.json", "chat_template.jinja", "chat_template.json")


def regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file (or a link to one); a FIFO or device would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise OffloadError(f"{what} {path} is missing") from None
    except OSError as e:
        raise OffloadError(f"cannot open {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise OffloadError(f"{what} {path} is not a regular file")
    return path


def contained(root: Path, name, what: str, links_out: bool = False) -> Path:
    """root/name, refusing names that leave `root` (absolute, `..`); with links_out False the path
    after following symlinks must stay inside `root` too (a link to another file in the dir is fine)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise OffloadError(f"{what} {name!r} is not a file name inside {root}")
    path = root / name
    if not links_out and not path.resolve().is_relative_to(root.resolve()):
        raise OffloadError(f"{what} {name!r} leads outside {root}")
    return path


def check_no_custom_code(model_dir: Path) -> None:
    """Refuse a model whose config or tokenizer config points at its own Python code (auto_map)."""
    for name in ("config.json", "tokenizer_config.json"):
        f = model_dir / name
        if not f.exists():
            continue
        try:
            data = json.loads(regular_file(f, name).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise OffloadError(f"{f} is not valid JSON ({e})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise OffloadError(f"custom-code models are not supported ({f} has auto_map)")


def source_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model dir (its index's, else every *.safetensors), checked."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(regular_file(index, "index").read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OffloadError(f"{index} is corrupt ({type(e).__name__}: {e})") from None
        # a hub cache snapshot links its files to blobs elsewhere: links may leave the dir, names may not
        return [regular_file(contained(model_dir, f, "weight_map file", links_out=True), "weight file")
                for f in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise OffloadError(f"no *.safetensors files in {model_dir} (offload reads safetensors only, never pickle)")
    return [regular_file(f, "weight file") for f in files]


def source_fingerprint(model_dir: Path, files: list[Path]) -> str:
    """sha256 over config.json and each source file's name, size and safetensors header (every
    tensor's name, dtype, shape and offsets): identifies the source without reading its data twice."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            h.update(fh.read(min(n, 100 << 20)))
    return h.hexdigest()


class SourceModel:
    """An HF safetensors model dir, read one tensor at a time. Never reads pickle files."""

    def __init__(self, model_dir):
        self.path = Path(model_dir)
        if not (self.path / "config.json").exists():
            raise OffloadError(f"{self.path} is not a model dir (no config.json)")
        check_no_custom_code(self.path)
        regular_file(self.path / "config.json", "config")
        self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        self.files = {}
        for f in source_files(self.path):
            with safe_open(f, framework="pt") as sf:
                self.files.update({k: f for k in sf.keys()})

    def keys(self):
        return self.files.keys()

    def label(self, key: str) -> str:
        """Where `key` is read from (for messages)."""
        return self.files[key].name

    def fingerprint(self) -> str:
        return source_fingerprint(self.path, list(dict.fromkeys(self.files.values())))

    def save_side_files(self, out: Path) -> None:
        """Copy the config, generation config and tokenizer files into the weights dir `out`."""
        for f in SIDE_FILES:
            if (self.path / f).exists():
                shutil.copy2(self.path / f, out / f)

    def tensor(self, key: str, fallback: str | None = None) -> torch.Tensor:
        """The stored tensor `key`; `fallback` (a tied embedding) when the dir has no `key`."""
        name = key if key in self.files else fallback
        if name not in self.files:
            raise OffloadError(f"{self.path} has no tensor for {key}")
        with safe_open(self.files[name], framework="pt") as sf:
            return sf.get_tensor(name)
