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
    weights = quantize_model(tmp_path / "m", tmp_path / "w", progress=False, lm_head="int4")  # mse keeps absmax here
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
