import json

import pytest
import torch
from safetensors import safe_open

from offload import quant, weights
from offload.errors import OffloadError

import tiny


@pytest.mark.parametrize("block", quant.BLOCK_SIZES)
def test_quantized_tensors_equal_the_reference_functions(blocks, block):
    model_dir, weights_dir = blocks("llama", block)
    m = tiny.manifest(weights_dir)
    assert m["format_version"] == weights.FORMAT_VERSION and m["block_size"] == block
    with safe_open(model_dir / "model.safetensors", framework="pt") as src:
        source = {k: src.get_tensor(k) for k in src.keys()}
    w = weights.WeightsDir(weights_dir)
    for name, info in m["tensors"].items():
        stored = w.read(name)
        # tied embeddings: lm_head is a quantized copy of the input embedding
        original = source.get(name, source["model.embed_tokens.weight"])
        if info["role"] == "linear":
            packed, scales = quant.quantize(original, block)
            assert scales.shape == (original.shape[0], quant.padded_k(original.shape[1], block) // block)
            assert torch.equal(stored[0], packed) and torch.equal(stored[1], scales)
        else:  # unquantized tensors are stored in bf16 (the source is float32 here)
            assert stored[0].dtype == torch.bfloat16 and info["dtype"] == "bfloat16"
            assert torch.equal(stored[0], original.to(torch.bfloat16))
    roles = {info["role"] for info in m["tensors"].values()}
    assert roles == {"linear", "embedding", "norm"}
    assert "lm_head.weight" in w.linears and "lm_head.weight" not in source
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (weights_dir / f).exists()


def test_unquantized_tensors_keep_float16_and_the_dir_stays_small(llama, tmp_path):
    """A float16 source keeps float16 embeddings and norms; any source's dir is about its int4 bytes plus
    the unquantized tensors at 2 bytes an element."""
    model_dir, weights_dir = llama
    from transformers import AutoModelForCausalLM
    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).save_pretrained(half)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (half / f).write_bytes((model_dir / f).read_bytes())
    out = weights.quantize_model(half, tmp_path / "w", progress=False, method="absmax", lm_head="int4")
    for d, dtype in ((out, torch.float16), (weights_dir, torch.bfloat16)):
        w = weights.WeightsDir(d)
        small = [t for n, info in w.tensors.items() if info.role != "linear" for t in w.read(n)]
        assert small and all(t.dtype == dtype for t in small)
        int4 = sum(sum(quant.quantized_nbytes(t.shape)) for t in w.linears.values())
        shards = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        assert shards <= 1.1 * int4 + sum(t.numel() * 2 for t in small)


def test_sharded_sources_and_outputs(llama, tmp_path):
    model_dir, _ = llama
    from transformers import AutoModelForCausalLM
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    out = weights.quantize_model(sharded, tmp_path / "w", shard_bytes=50_000, progress=False, method="absmax",
                               lm_head="int4")
    w = weights.WeightsDir(out)
    assert len(w.manifest["shards"]) > 1
    ref = weights.WeightsDir(llama[1])
    for name in ref.tensors:
        assert all(torch.equal(a, b) for a, b in zip(w.read(name), ref.read(name)))


def test_interrupted_quantization_leaves_nothing_that_looks_complete(llama, tmp_path, monkeypatch):
    model_dir, _ = llama
    calls = []

    def failing(w, block_size=128):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(w, block_size)

    real = quant.quantize
    monkeypatch.setattr(quant, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        weights.quantize_model(model_dir, tmp_path / "w", progress=False, method="absmax")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("block", [16, 48, 96, 256, 0, 128.0, True])
def test_block_size_is_one_of_the_supported_sizes(llama, tmp_path, block):
    with pytest.raises(OffloadError, match=r"block size must be one of 32, 64, 128 .*, got"):
        weights.quantize_model(llama[0], tmp_path / "w", block_size=block, progress=False)
    assert not (tmp_path / "w").exists()


def test_refuses_to_overwrite_and_rejects_non_models(llama, tmp_path):
    model_dir, weights_dir = llama
    with pytest.raises(OffloadError, match="already exists"):
        weights.quantize_model(model_dir, weights_dir, progress=False)
    with pytest.raises(OffloadError, match="not a model dir"):
        weights.quantize_model(tmp_path, tmp_path / "w", progress=False)


def test_reader_rejects_damaged_dirs(llama, tmp_path):
    import shutil
    _, weights_dir = llama
    with pytest.raises(OffloadError, match="does not exist"):
        weights.WeightsDir(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(weights_dir, bad)
    shard = next(bad.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(OffloadError, match="truncated"):
        weights.WeightsDir(bad)
    (bad / "offload.json").write_text("{not json")
    with pytest.raises(OffloadError, match="corrupt"):
        weights.WeightsDir(bad)
    m = tiny.manifest(weights_dir)
    m["format_version"] = 99
    (bad / "offload.json").write_text(json.dumps(m))
    with pytest.raises(OffloadError, match="format version"):
        weights.WeightsDir(bad)
