import os

import pytest
import torch

# Triton kernels run under the interpreter where there is no GPU; this must be set before any
# kernel module is imported, so it lives here, before the tests import anything from offload.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# compile="auto" on cpu stays eager, unmeasured, in tests and the processes they start, whatever this machine
# recorded: each measurement compiles for seconds (tests/test_compiled.py tests the measurement itself)
os.environ["OFFLOAD_COMPILE_PROBE"] = "0"

import tiny  # noqa: E402 - imports offload, so after TRITON_INTERPRET
from offload import methods, quant  # noqa: E402
from offload.weights import quantize_model  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="session")
def short_calibration():
    """The calibrated methods read at most 4 calibration sequences in tests (the default reads up to 128): the
    tests check that the engine computes what a weights dir holds, not how good the method's choice is
    (benchmarks/eval_methods.py measures that)."""
    old, methods.GPTQ_MAX_SEQUENCES = methods.GPTQ_MAX_SEQUENCES, 4
    yield
    methods.GPTQ_MAX_SEQUENCES = old


def _files(root) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _tiny_model(kind: str, tmp_path_factory):
    """Build `kind` once for the whole run; fail the run if a test changed the shared files."""
    root = tmp_path_factory.mktemp(f"tiny-{kind}")
    dirs = tiny.make(kind, root)
    before = _files(root)
    yield dirs
    assert _files(root) == before, f"a test changed the shared tiny {kind} model: copy it before changing it"


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """The tiny random Llama (tied embeddings, hidden size not a multiple of the block) saved and quantized:
    (model_dir, weights_dir), built once per test run and shared: copy a dir before changing anything in it."""
    yield from _tiny_model("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory):
    """The tiny random Qwen2 (q/k/v biases, untied lm_head), as `llama`."""
    yield from _tiny_model("qwen2", tmp_path_factory)


@pytest.fixture(scope="session")
def models(llama, qwen2):
    """kind -> (model_dir, weights_dir) of every tiny model."""
    return {"llama": llama, "qwen2": qwen2}


@pytest.fixture(scope="session")
def blocks(models, tmp_path_factory):
    """blocks(kind, block_size) -> (model_dir, weights_dir): the tiny `kind` model quantized at that block size
    (absmax, int4 lm_head, as the shared dirs; the default block is the shared dir), made once per run on first use."""
    root = tmp_path_factory.mktemp("blocks")
    made = {}

    def get(kind, block_size):
        if block_size == quant.BLOCK_SIZE:
            return models[kind]
        if (kind, block_size) not in made:
            model_dir, _ = models[kind]
            weights_dir = root / f"{kind}-w{block_size}"
            quantize_model(model_dir, weights_dir, block_size=block_size, progress=False, method="absmax",
                           lm_head="int4")
            made[kind, block_size] = model_dir, weights_dir
        return made[kind, block_size]

    return get
