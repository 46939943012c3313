import pytest
import torch

import offload
from offload import methods, quant
from offload.modules import Int8Linear
from offload.cli import quantize_main
from offload.errors import OffloadError
from offload.weights import WeightsDir, quantize_model


CALIBRATION = ("A calibration text only has to exercise the layers the way real text does. "
               "This one talks about bridges, bread, rivers and clocks, and then it repeats itself. ") * 12


def correlated_inputs(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(rows, k, generator=g) @ mix  # [rows, K]


def hessian(x):
    h = methods.Hessian(x.shape[1])
    for part in x.split(100):  # accumulated in pieces, as the calibration driver does
        h.add(part)
    return h.h


@pytest.mark.parametrize("k", [256, 200])  # 200: the last block is zero-padded
def test_every_method_round_trips_through_dequantize(k):
    torch.manual_seed(0)
    w = torch.randn(48, k) * 0.05
    results = {"absmax": methods.quantize_weight(w, "absmax"), "mse": methods.quantize_weight(w, "mse"),
               "gptq": methods.gptq(w, hessian(correlated_inputs(400, k, 1)))}
    kp = quant.padded_k(k)
    for name, (packed, scales) in results.items():
        assert packed.dtype == torch.uint8 and packed.shape == (48, kp // 2), name
        assert scales.dtype == torch.bfloat16 and scales.shape == (48, kp // 128), name
        wq = quant.dequantize(packed, scales, w.shape)
        # the reference dequantization reproduces the stored values exactly: quantizing it again changes nothing
        again = quant.quantize(wq, scales=scales)
        assert torch.equal(again[0], packed) and torch.equal(again[1], scales), name
        assert (wq - w).abs().max() < 2 * w.abs().max() / 7, name
    assert torch.equal(results["absmax"][1], methods.absmax_scales(w))
    q8, s8 = quant.quantize_int8(w)
    assert q8.shape == (48, kp) and s8.shape == (48, kp // 128)
    assert (quant.dequantize_int8(q8, s8, w.shape[1]) - w).abs().max() <= s8.float().max() / 2 + 1e-6


def test_mse_never_reconstructs_a_block_worse_than_absmax():
    torch.manual_seed(1)
    w = torch.randn(64, 512)  # Gaussian: clipping the rare large values pays off

    def block_errors(packed, scales):
        return (quant.dequantize(packed, scales, w.shape) - w).square().view(64, 4, 128).sum(-1)

    absmax, mse = block_errors(*methods.quantize_weight(w, "absmax")), block_errors(*methods.quantize_weight(w, "mse"))
    assert (mse <= absmax + 1e-6).all()
    assert mse.sum() < 0.85 * absmax.sum()
    zero = torch.zeros(4, 128)  # an all-zero block keeps scale 0
    packed, scales = methods.quantize_weight(zero, "mse")
    assert torch.equal(quant.dequantize(packed, scales, zero.shape), zero)


def test_gptq_lowers_output_error_on_the_calibration_activations():
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.1
    x = correlated_inputs(1024, 256, 3)
    x[:, 5] = 0.0  # a dead input: its Hessian row is zero, GPTQ must still work
    h = hessian(x)
    assert torch.allclose(h, x.T @ x / len(x), rtol=1e-4, atol=1e-4)

    def output_error(packed, scales):
        return (x @ quant.dequantize(packed, scales, w.shape).T - x @ w.T).square().mean().item()

    absmax = output_error(*methods.quantize_weight(w, "absmax"))
    gptq = output_error(*methods.gptq(w, h))
    assert gptq < 0.8 * absmax
    with pytest.raises(OffloadError, match="does not match"):
        methods.gptq(w, h[:10, :10])


def test_quantize_model_records_the_method_and_gptq_runs_layer_by_layer(llama, tmp_path):
    model_dir, _ = llama
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(CALIBRATION)
    # lm_head int4: the output projection goes through GPTQ too (inputs taken after the final norm)
    out = quantize_model(model_dir, tmp_path / "gptq", method="gptq", calibration=calibration, lm_head="int4",
                         progress=False)
    w = WeightsDir(out)
    m = w.manifest
    assert m["method"] == "gptq" and m["lm_head"] == "int4"
    assert m["method_options"]["calibration"] == "calibration.txt" and m["method_options"]["damp"] == methods.GPTQ_DAMP
    absmax = WeightsDir(llama[1])
    assert set(w.linears) == set(absmax.linears)
    for name, info in absmax.tensors.items():
        got, ref = w.read(name), absmax.read(name)
        assert [t.shape for t in got] == [t.shape for t in ref] and [t.dtype for t in got] == [t.dtype for t in ref]
        if info.role != "linear":
            assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # the engine computes exactly what the GPTQ weights dir holds: the HF model with those weights dequantized
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())  # untied: lm_head is its own int4
    linear_weights = set()
    for name, info in w.linears.items():
        linear = ref.get_submodule(name.removesuffix(".weight"))
        linear.weight.data = quant.dequantize(*w.read(name), info.shape)
        linear_weights.add(id(linear.weight))
    for p in ref.parameters():  # embeddings and norms as the weights dir stores them
        if id(p) not in linear_weights:
            p.data = p.data.to(torch.bfloat16).float()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with offload.load(model_dir, out, cache="full", device="cpu", dtype=torch.float32,
                      progress=False) as engine:
        with torch.no_grad():
            got, want = engine.model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_method_options_are_one_line_errors(llama, tmp_path, capsys):
    model_dir, _ = llama
    cases = [(dict(method="gptq"), "needs a calibration"), (dict(method="awq"), "unknown quantization method"),
             (dict(calibration=tmp_path / "c.txt"), "gptq only"), (dict(lm_head="fp8"), "unknown lm_head"),
             (dict(method="gptq", calibration=tmp_path / "missing.txt"), "does not exist")]
    for kwargs, message in cases:
        kwargs.setdefault("method", "absmax")
        with pytest.raises(OffloadError, match=message):
            quantize_model(model_dir, tmp_path / "w", progress=False, **kwargs)
    rc = quantize_main([str(model_dir), str(tmp_path / "w"), "--method", "gptq"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        "offload-quantize: error: method gptq needs a calibration text file (--calibration FILE)"]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_lm_head_int8_and_bf16_stay_resident_and_match_their_reference(llama, tmp_path, precision):
    from transformers import AutoModelForCausalLM
    model_dir, _ = llama
    assert quantize_main([str(model_dir), str(tmp_path / "w"), "--method", "mse", "--lm-head", precision]) == 0
    w = WeightsDir(tmp_path / "w")
    assert w.manifest["method"] == "mse" and set(w.resident_linears) == {"lm_head.weight"}
    assert w.resident_linears["lm_head.weight"].quant == precision and "lm_head.weight" not in w.linears
    # reference: mse int4 decoder linears, the output projection in `precision` (tied: from the embedding)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    head = ref.get_input_embeddings().weight.detach().clone()
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = quant.dequantize(*methods.quantize_weight(module.weight.data, "mse"), module.weight.shape)
    ref.lm_head.weight = torch.nn.Parameter(quant.dequantize_int8(*quant.quantize_int8(head), head.shape[1]) if precision == "int8"
                                            else head.to(torch.bfloat16).float())
    for module in ref.modules():  # embeddings and norms are stored in bf16
        if not isinstance(module, torch.nn.Linear):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16).float()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with offload.load(model_dir, tmp_path / "w", cache="full", device="cpu", dtype=torch.float32,
                      progress=False) as engine:
        assert "lm_head.weight" not in engine.store.entries  # not streamed through the cache
        with torch.no_grad():
            got, want = engine.model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_defaults_are_the_measured_choice(llama, tmp_path):
    # benchmarks/README.md: mse decoder linears + an int8 output projection
    m = WeightsDir(quantize_model(llama[0], tmp_path / "w", progress=False)).manifest
    assert (m["method"], m["lm_head"]) == ("mse", "int8")
    assert m["tensors"]["lm_head.weight"]["quant"] == "int8"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_module_kernel_and_cpu_copy_match_the_reference(monkeypatch, dtype):
    # The cpu path multiplies by a once-dequantized copy; the fused int8 kernel (on cuda, or forced
    # onto the interpreter without a GPU) reads the int8 bytes. Both against x @ dequantize(W).T.
    from offload.kernels import FORCE_TRITON_ENV
    g = torch.Generator().manual_seed(0)
    n, k = 40, 300  # K not a multiple of the block
    q, s = quant.quantize_int8(torch.randn(n, k, generator=g))
    bias = torch.rand(n, generator=g)
    lin = Int8Linear(k, n, bias=True)
    lin.load_state_dict({"qweight": q, "scales": s, "bias": bias}, assign=True)
    x = torch.randn(2, 3, k, generator=g).to(dtype)
    want = x.float() @ quant.dequantize_int8(q, s, k).t() + bias
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * want.abs().max().item())
    torch.testing.assert_close(lin(x).float(), want, **tol)
    if torch.cuda.is_available():
        lin, x = lin.cuda(), x.cuda()
    else:
        monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    got = lin(x)
    assert got.dtype == dtype and got.device == x.device
    torch.testing.assert_close(got.float().cpu(), want, **tol)
