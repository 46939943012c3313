import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload import quant
from offload.errors import OffloadError
from offload.cli import eval_main as main
from offload.evaluate import evaluate, windows

import tiny

MAX_TOKENS, STRIDE = 64, 32
# The byte-level test tokenizer makes one token per character: 64 + 3 * 32 tokens, so the windows
# of the evaluator and of the Hugging Face guide's loop coincide exactly.
TEXT = ("Sliding windows score each token once, with as much context as a window allows. " * 2)[:MAX_TOKENS + 3 * STRIDE]


def guide_perplexity(model, ids, max_length, stride):
    """Perplexity exactly as the Hugging Face perplexity guide computes it (labels = -100 outside the new tokens)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels).loss
        valid = (labels[:, 1:] != -100).sum().item()  # the model shifts labels by one
        nll += loss.item() * valid
        count += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def test_perplexity_equals_a_direct_computation_with_the_hf_model(llama):
    model_dir, weights_dir = llama
    r = evaluate(model_dir, weights_dir, TEXT, max_tokens=MAX_TOKENS, stride=STRIDE, device="cpu", dtype=torch.float32,
                 progress=False)
    ids = torch.tensor(tiny.byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"])  # one token per byte
    ref_ppl, count = guide_perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
                                      ids, MAX_TOKENS, STRIDE)
    quant_ppl, _ = guide_perplexity(tiny.reference_model(model_dir), ids, MAX_TOKENS, STRIDE)
    assert r["tokens"] == len(TEXT) and r["scored_tokens"] == count == len(TEXT) - 1 and r["windows"] == 4
    assert r["reference_ppl"] == pytest.approx(ref_ppl, rel=1e-5)
    assert r["ppl"] == pytest.approx(quant_ppl, rel=1e-5)
    assert r["ppl_change"] == pytest.approx(quant_ppl / ref_ppl - 1, rel=1e-4, abs=1e-6)
    assert 0.0 <= r["top1_agreement"] <= 1.0 and r["kl_mean"] > 0.0
    assert r["method"] == "absmax" and r["lm_head"] == "int4"


def int4_exact(w: torch.Tensor) -> torch.Tensor:
    """A weight of w's shape that absmax int4 stores without loss: q * s with a 7 in every block. Power-of-two
    scales keep every q * s exact in bf16 too, as the unquantized input embedding is stored."""
    n, k = w.shape
    kp = quant.padded_k(k)
    s = 2.0 ** torch.randint(-7, -3, (n, kp // 128)).float()
    q = torch.randint(-7, 8, (n, kp // 128, 128)).float()
    q[..., 0] = 7
    return (q * s[..., None]).view(n, kp)[:, :k].contiguous()


def test_lossless_weights_give_zero_difference(tmp_path):
    from offload.weights import quantize_model
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny.config("llama"))
    for module in model.modules():  # the tied lm_head is the embedding: make that exact too
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.data = int4_exact(module.weight.data)
    model.save_pretrained(tmp_path / "m")
    tiny.byte_tokenizer().save_pretrained(tmp_path / "m")
    weights = quantize_model(tmp_path / "m", tmp_path / "w", progress=False, lm_head="int4", method="mse")  # keeps them
    r = evaluate(tmp_path / "m", weights, TEXT, max_tokens=MAX_TOKENS, stride=STRIDE, device="cpu", dtype=torch.float32,
                 progress=False)
    assert r["ppl"] == pytest.approx(r["reference_ppl"], rel=1e-5)
    assert r["top1_agreement"] == 1.0 and r["kl_mean"] == pytest.approx(0.0, abs=1e-6)


def test_windows_score_every_token_once_with_full_length_windows():
    for n, max_tokens, stride in [(100, 40, 15), (40, 40, 10), (1000, 128, 128), (129, 128, 1)]:
        spans = windows(n, max_tokens, stride)
        scored = [t for begin, first in spans for t in range(first, begin + max_tokens)]
        # non-overlapping windows (stride = max_tokens) cannot score their first token
        assert scored == [t for t in range(1, n) if stride < max_tokens or t % max_tokens or t > n - max_tokens]
        assert all(begin <= first - 1 and first <= begin + max_tokens for begin, first in spans)
        assert spans[-1][0] + max_tokens == n and spans[0] == (0, 1)
    with pytest.raises(OffloadError, match="fewer than one window"):
        windows(10, 11, 5)


def test_offload_eval_cli(llama, tmp_path, capsys):
    model_dir, weights_dir = llama
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    assert main([str(model_dir), str(weights_dir), "--text", str(text), "--max-tokens", "64", "--json", str(out),
                 "--no-progress"]) == 0
    assert "perplexity:" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["stride"] == 32 and r["windows"] == 4

    def one_error(argv, message):
        rc = main([str(model_dir), str(weights_dir), "--text", str(text), "--no-progress"] + argv)
        err = capsys.readouterr().err
        assert rc != 0 and "Traceback" not in err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith("offload-eval: error:") and message in lines[0], err

    one_error(["--max-tokens", "400"], f"the text has {len(TEXT)} tokens, fewer than one window of 400")
    one_error(["--max-tokens", "4096"], "longer than the model's context")
    one_error(["--max-tokens", "64", "--stride", "0"], "--stride must be")
    text.unlink()
    one_error([], f"text file {text} is missing")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # tied embeddings / untied with q, k, v biases
def test_layer_by_layer_reference_equals_the_hf_model(kind, request):
    from offload.layerwise import LayerwiseModel
    from offload.source import SourceModel
    model_dir, _ = request.getfixturevalue(kind)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    m = LayerwiseModel(SourceModel(model_dir))
    h = m.embed(ids)
    for i, layer in m.layers():
        h = m.run_layer(i, layer, h)
    assert all(p.is_meta for p in m.decoder_layers.parameters())  # every layer was dropped after use
    torch.testing.assert_close(m.logits(ids, h), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", quant.BLOCK_SIZES)
def test_bits_per_weight_of_a_weights_dir(blocks, block):
    from transformers import AutoConfig
    from offload.bits import weights_dir_bits
    from offload.weights import WeightsDir
    model_dir, weights_dir = blocks("llama", block)  # absmax, int4 lm_head, tied embeddings
    m = tiny.manifest(weights_dir)
    linears = {n: t["shape"] for n, t in m["tensors"].items() if t["role"] == "linear"}
    decoder = [s for n, s in linears.items() if n != "lm_head.weight"]
    int4 = sum(sum(quant.quantized_nbytes(s, block)) for s in decoder)
    got = weights_dir_bits(WeightsDir(weights_dir), AutoConfig.from_pretrained(model_dir))
    assert got["linears"] == 8 * int4 / sum(n * k for n, k in decoder)
    if block < 128:  # hidden 192 and intermediate 320 are multiples of 32 and 64: no padding
        assert got["linears"] == 4 + 16 / block
    others = sum(math.prod(t["shape"]) * 2 for t in m["tensors"].values() if t["role"] != "linear")  # bf16
    params = AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()  # the tied embedding once
    head = sum(quant.quantized_nbytes(linears["lm_head.weight"], block))
    assert got["model"] == 8 * (int4 + head + others) / params


def write_gguf(path):
    """A GGUF with an F32 embedding and norm and two F16 decoder matrices: (path, expected bits)."""
    import numpy as np
    from gguf import GGUFWriter
    tensors = {"token_embd.weight": np.zeros((16, 8), np.float32), "blk.0.attn_norm.weight": np.ones(8, np.float32),
               "blk.0.attn_q.weight": np.zeros((8, 8), np.float16), "blk.0.ffn_down.weight": np.zeros((8, 12), np.float16)}
    writer = GGUFWriter(path, "llama")
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    total = sum(t.size for t in tensors.values())
    return path, {"linears": 16.0, "model": (32 * (128 + 8) + 16 * (64 + 96)) / total}


def test_bits_per_weight_of_a_gguf(tmp_path):
    from offload.bits import gguf_bits
    path, want = write_gguf(tmp_path / "m.gguf")
    got = gguf_bits(path)
    assert got["linears"] == want["linears"] and got["model"] == pytest.approx(want["model"])
    assert got["types"] == {"F16": 64 + 96} and got["output_type"] == "F32"


class FakeLlama:
    """llama_cpp.Llama's interface over the unquantized HF model: what llama.cpp would give for an F32 GGUF."""
    windows = []

    def __init__(self, model_path, n_ctx, logits_all, **kwargs):
        assert logits_all and n_ctx == MAX_TOKENS
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.tokenizer = tiny.byte_tokenizer()

    def n_vocab(self):
        return self.vocab_size

    def detokenize(self, ids):
        return self.tokenizer.decode(ids).encode()

    def reset(self):
        self.scores = None

    def eval(self, ids):
        FakeLlama.windows.append(list(ids))
        with torch.no_grad():
            self.scores = self.model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.fixture
def fake_llama_cpp(llama, monkeypatch):
    import sys
    import types
    module = types.ModuleType("llama_cpp")
    module.__version__ = "fake"
    module.Llama = FakeLlama
    monkeypatch.setattr(FakeLlama, "model_dir", llama[0], raising=False)
    monkeypatch.setattr(FakeLlama, "vocab_size", tiny.config("llama").vocab_size, raising=False)
    monkeypatch.setattr(FakeLlama, "windows", [])
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return FakeLlama


def test_compare_gguf_scores_the_same_ids_and_windows(llama, tmp_path, fake_llama_cpp):
    model_dir, weights_dir = llama
    gguf, want_bits = write_gguf(tmp_path / "m.gguf")
    r = evaluate(model_dir, weights_dir, TEXT, max_tokens=MAX_TOKENS, stride=STRIDE, device="cpu", dtype=torch.float32,
                 progress=False, compare_gguf=gguf)
    ids = tiny.byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    assert fake_llama_cpp.windows == [ids[b:b + MAX_TOKENS] for b, _ in windows(len(ids), MAX_TOKENS, STRIDE)]
    g = r["gguf"]  # the fake is the unquantized model: it must score exactly as the reference
    assert g["ppl"] == pytest.approx(r["reference_ppl"], rel=1e-5) and g["ppl_change"] == pytest.approx(0, abs=1e-5)
    assert g["top1_agreement"] == 1.0 and g["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert g["bits_per_weight"]["linears"] == want_bits["linears"] and g["llama_cpp_python"] == "fake"
    assert r["ppl"] > g["ppl"]  # the offloaded int4 model is scored beside it as usual


def test_compare_gguf_refuses_another_vocabulary(llama, tmp_path, fake_llama_cpp, monkeypatch, capsys):
    model_dir, weights_dir = llama
    gguf, _ = write_gguf(tmp_path / "m.gguf")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    argv = [str(model_dir), str(weights_dir), "--text", str(text), "--max-tokens", "64", "--no-progress",
            "--compare-gguf", str(gguf)]
    monkeypatch.setattr(fake_llama_cpp, "vocab_size", 300)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("m.gguf has a vocabulary of 300 tokens, the model 260: its token "
                                                    "ids mean other tokens")
    monkeypatch.setattr(fake_llama_cpp, "vocab_size", 260)
    monkeypatch.setattr(fake_llama_cpp, "detokenize", lambda self, ids: b"other text")
    assert main(argv) == 2
    assert "decodes the text's token ids into another text" in capsys.readouterr().err
    assert fake_llama_cpp.windows == []  # refused before anything was scored


def test_compare_gguf_needs_llama_cpp_python(llama, tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed: import raises ImportError
    model_dir, weights_dir = llama
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    rc = main([str(model_dir), str(weights_dir), "--text", str(text), "--max-tokens", "64", "--no-progress",
               "--compare-gguf", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("offload-eval: error: --compare-gguf needs llama-cpp-python: "
                                            "pip install llama-cpp-python")
