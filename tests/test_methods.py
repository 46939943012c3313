import hashlib

import pytest
import torch

import offload
from offload import methods, quant
from offload.modules import Int8Linear
from offload.cli import quantize_main
from offload.errors import OffloadError
from offload.source import SourceModel
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


@pytest.mark.parametrize("block", quant.BLOCK_SIZES)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lowers_output_error_on_the_calibration_activations(block, act_order):
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.1
    x = correlated_inputs(1024, 256, 3)
    x[:, 5] = 0.0  # a dead input: its Hessian row is zero, GPTQ must still work
    x[:, 200:] *= 4.0  # the most active inputs last: act-order takes them first
    h = hessian(x)
    assert torch.allclose(h, x.T @ x / len(x), rtol=1e-4, atol=1e-4)

    def output_error(packed, scales):
        return (x @ quant.dequantize(packed, scales, w.shape).T - x @ w.T).square().mean().item()

    mse = output_error(*methods.quantize_weight(w, "mse", block))
    live = torch.where(x.abs().sum(0) > 0, w, 0.0)  # a dead input's weights are 0 in the result
    for search in ("mse", "hmse"):
        packed, scales = methods.gptq(w, h, block, scale_search=search, act_order=act_order)
        assert output_error(packed, scales) < 0.9 * mse
        if act_order:  # static groups: every scale chosen from the weight before any update
            weights = h.diagonal() if search == "hmse" else None
            assert torch.equal(scales, methods.mse_scales(live, block, weights=weights))
    with pytest.raises(OffloadError, match="does not match"):
        methods.gptq(w, h[:10, :10])
    with pytest.raises(OffloadError, match="unknown scale search"):
        methods.gptq(w, h, scale_search="max")


def test_hmse_picks_the_scale_with_the_least_error_weighted_by_the_hessian_diagonal():
    torch.manual_seed(5)
    w = torch.randn(32, 256)
    diag = torch.rand(256) * torch.where(torch.rand(256) < 0.1, 100.0, 1.0)  # a few inputs matter far more

    def errors(scales, weights):  # [32, blocks]: squared rounding error per block, each column times its weight
        wq = quant.dequantize(*quant.quantize(w, 64, scales=scales), w.shape)
        return ((wq - w).square() * weights).view(32, 4, 64).sum(-1)

    plain, weighted = methods.mse_scales(w, 64), methods.mse_scales(w, 64, weights=diag)
    assert (errors(weighted, diag) <= errors(plain, diag) * (1 + 1e-5)).all()  # each is the best for its measure
    assert (errors(plain, 1.0) <= errors(weighted, 1.0) * (1 + 1e-5)).all()
    assert errors(weighted, diag).sum() < 0.97 * errors(plain, diag).sum()
    assert torch.equal(methods.mse_scales(w, 64, weights=torch.full((256,), 3.0)), plain)  # a uniform weight: mse


def test_act_order_gains_over_column_order_where_inputs_differ_in_scale():
    torch.manual_seed(4)
    w = torch.randn(64, 256) * 0.1
    x = correlated_inputs(2048, 256, 5) * torch.linspace(0.2, 5.0, 256)  # input scales vary 25x
    h = hessian(x)

    def output_error(act_order):
        wq = quant.dequantize(*methods.gptq(w, h, 32, act_order=act_order), w.shape)
        return (x @ wq.T - x @ w.T).square().mean().item()

    assert output_error(True) < output_error(False)


def test_awq_search_gives_the_inputs_that_matter_finer_steps():
    torch.manual_seed(3)
    w = torch.randn(64, 256) * 0.05
    x = torch.randn(2048, 256)
    x[:, :8] *= 30.0  # a few salient input channels

    def output_error(wq):
        return (x @ wq.T - x @ w.T).square().mean().item()

    s = methods._awq_search(w, hessian(x), x.abs().mean(0), 32)
    assert s[:8].min() > s[8:].max()
    plain = quant.dequantize(*quant.quantize(w, 32), w.shape)
    scaled = quant.dequantize(*quant.quantize(w * s, 32), w.shape) / s
    assert output_error(scaled) < 0.7 * output_error(plain)


@pytest.mark.parametrize("kv_heads", [2, 6])  # 6: no grouped-query attention, so o_proj's scales go into v_proj
def test_awq_scales_fold_into_the_model_without_changing_its_function(tmp_path, kv_heads):
    import tiny
    from transformers import AutoModelForCausalLM
    from offload.layerwise import LayerwiseModel
    from offload.source import SourceModel
    cfg = tiny.config("llama")
    cfg.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    runner = LayerwiseModel(SourceModel(tmp_path))
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    hidden = [runner.embed(row[None]) for row in ids]
    scaled = set()
    for i, layer in runner.layers():
        before = [runner.run_layer(i, layer, h) for h in hidden]
        weights = {n: p.clone() for n, p in layer.named_parameters()}
        changed = methods._awq_layer(runner, i, layer, hidden, 32)
        assert set(changed) == {f"model.layers.{i}.{n}.weight" for n in methods.AWQ_NORMS}
        hidden = [runner.run_layer(i, layer, h) for h in hidden]
        for got, want in zip(hidden, before):  # equal up to float32 rounding (a missed fold is off by ~s)
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        scaled |= {n for n, p in layer.named_parameters() if not torch.equal(p, weights[n])}
    assert ("self_attn.o_proj.weight" in scaled) == (kv_heads == cfg.num_attention_heads)


@pytest.mark.parametrize("block", quant.BLOCK_SIZES)
@pytest.mark.parametrize("method", methods.CALIBRATED)
def test_quantize_model_records_the_method_and_calibrated_methods_run_layer_by_layer(llama, tmp_path, method, block):
    model_dir, _ = llama
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(CALIBRATION)
    # awq reads the built-in text, the others the user's (shorter, so faster). lm_head int4: the output
    # projection is quantized by the method too (GPTQ: inputs taken after the final norm)
    given = None if method == "awq" else calibration
    out = quantize_model(model_dir, tmp_path / "w", method=method, calibration=given, lm_head="int4",
                         block_size=block, progress=False)
    w = WeightsDir(out)
    m = w.manifest
    assert m["method"] == method and m["lm_head"] == "int4" and m["block_size"] == block
    text = (calibration if given else methods.CALIBRATION_TEXT).read_text()
    assert m["method_options"]["calibration"] == ("calibration.txt" if given else "built-in")
    assert m["method_options"]["calibration_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    absmax = WeightsDir(llama[1])
    assert set(w.linears) == set(absmax.linears)
    awq_norms = {name for name in absmax.tensors if name.endswith(tuple(f".{n}.weight" for n in methods.AWQ_NORMS))}
    assert len(awq_norms) == 2 * 3
    for name, info in absmax.tensors.items():
        got, ref = w.read(name), absmax.read(name)
        assert [t.dtype for t in got] == [t.dtype for t in ref]
        if info.role != "linear" and not (method.startswith("awq") and name in awq_norms):
            assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # the engine computes exactly what the weights dir holds: the HF model with those weights dequantized,
    # embeddings and norms as stored
    assert_engine_computes_what_is_stored(model_dir, w)


def test_bad_method_options_are_one_line_errors(llama, tmp_path, capsys):
    model_dir, _ = llama
    cases = [(dict(method="awq4"), "unknown quantization method"),
             (dict(calibration=tmp_path / "c.txt"), "only, not absmax"), (dict(lm_head="fp8"), "unknown lm_head"),
             (dict(method="gptq", calibration=tmp_path / "missing.txt"), "does not exist")]
    for kwargs, message in cases:
        kwargs.setdefault("method", "absmax")
        with pytest.raises(OffloadError, match=message):
            quantize_model(model_dir, tmp_path / "w", progress=False, **kwargs)
    rc = quantize_main([str(model_dir), str(tmp_path / "w"), "--method", "awq", "--calibration", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"offload-quantize: error: calibration file {tmp_path / 'no'} does not exist"]


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
    # benchmarks/README.md: awq+gptq decoder linears (from an HF dir) + an int8 output projection, block 128
    m = WeightsDir(quantize_model(llama[0], tmp_path / "w", progress=False)).manifest
    assert (m["method"], m["lm_head"], m["block_size"]) == ("awq+gptq", "int8", 128)
    assert m["tensors"]["lm_head.weight"]["quant"] == "int8"
    assert m["method_options"]["calibration"] == "built-in" and m["method_options"]["act_order"]
    assert m["method_options"]["scale_search"] == "hmse"
    assert [methods.default_method(gguf, kind) for gguf, kind in [(False, "qwen2"), (False, "gpt_neox"), (True, "llama")]] \
        == ["awq+gptq", "gptq", "mse"]


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


@pytest.mark.parametrize("method, expect", [("gptq", methods.GPTQ_SCALE_SEARCH), ("awq", "mse")])
def test_calibrated_model_defaults_to_each_methods_own_scale_search(llama, monkeypatch, method, expect):
    # called directly (not through quantize_model, which passes the recorded option): GPTQ's block scales get
    # GPTQ's default, plain awq's rounding gets mse
    model_dir, _ = llama
    seen = []
    for name, at in (("gptq", 4), ("quantize_weight", 1)):
        real = getattr(methods, name)
        monkeypatch.setattr(methods, name, lambda *a, real=real, at=at, **k: seen.append(a[at]) or real(*a, **k))
    key = "model.layers.0.self_attn.q_proj.weight"
    out = dict(methods.calibrated_model(model_dir, CALIBRATION, {key}, method=method, progress=False))
    assert key in out and seen == [expect]


def _stored_reference(model_dir, w):
    """The HF model with the weights dir's stored values: int4 and int8 linears dequantized, the rest as stored."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())  # untied: its own stored copy
    for name, info in w.tensors.items():
        stored = w.read(name)
        param = ref.get_parameter(name)
        if info.role != "linear":
            param.data = stored[0].float()
        elif info.quant == "int8":
            param.data = quant.dequantize_int8(*stored, info.shape[1])
        else:
            param.data = quant.dequantize(*stored, info.shape)
    return ref.eval()


def assert_engine_computes_what_is_stored(model_dir, w):
    """float32 engine logits == those of the HF model holding the weights dir's stored values."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    got, _ = _engine_logits(model_dir, w.path, ids, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(got, _stored_reference(model_dir, w)(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def _engine_logits(model_dir, weights_dir, ids, **kwargs):
    with offload.load(model_dir, weights_dir, cache="full", device="cpu", progress=False, **kwargs) as engine:
        with torch.no_grad():
            return engine.model(input_ids=ids).logits.float(), set(engine.store.entries)


def test_int8_decoder_linears_by_name_and_glob_are_resident_and_match_their_reference(llama, tmp_path):
    from transformers import AutoModelForCausalLM
    model_dir, _ = llama
    assert quantize_main([str(model_dir), str(tmp_path / "w"), "--method", "mse", "--block-size", "32",
                          "--int8", "down_proj,model.layers.1.self_attn.*"]) == 0
    w = WeightsDir(tmp_path / "w")
    chosen = {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)}
    chosen |= {f"model.layers.1.self_attn.{n}_proj.weight" for n in "qkvo"}
    assert set(w.resident_linears) == chosen | {"lm_head.weight"}
    assert all(w.resident_linears[k].quant == "int8" for k in chosen) and not chosen & set(w.linears)
    assert w.manifest["method_options"]["int8"] == ["down_proj", "model.layers.1.self_attn.*"]
    assert w.describe().endswith("+ 8 int8 matrices")  # 7 decoder linears and the output projection
    # an independent reference from the source weights: int8 rounding for the chosen linears and the head, mse int4
    # at block 32 for the others, bf16 for the rest
    src = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    head = src.get_input_embeddings().weight.detach().clone()
    for name, module in src.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            wt = module.weight.data
            module.weight.data = (quant.dequantize_int8(*quant.quantize_int8(wt, 32), wt.shape[1])
                                  if f"{name}.weight" in chosen else
                                  quant.dequantize(*methods.quantize_weight(wt, "mse", 32), wt.shape))
    src.lm_head.weight = torch.nn.Parameter(quant.dequantize_int8(*quant.quantize_int8(head, 32), head.shape[1]))
    for module in src.modules():
        if not isinstance(module, torch.nn.Linear):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16).float()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    got, streamed = _engine_logits(model_dir, tmp_path / "w", ids, dtype=torch.float32)
    assert not streamed & chosen  # never streamed: resident Int8Linear modules
    with torch.no_grad():
        torch.testing.assert_close(got, src.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # bf16 activations take the int8 and int4 kernels (the native cpu ones where they build)
    got16, _ = _engine_logits(model_dir, tmp_path / "w", ids, dtype=torch.bfloat16)
    assert (got16.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_int8_linears_with_awq_gptq_match_the_stored_weights_and_take_no_awq_scale_alone(llama, tmp_path):
    model_dir, _ = llama
    out = quantize_model(model_dir, tmp_path / "w", method="awq+gptq", int8=("down_proj", "v_proj"), block_size=32,
                         progress=False)
    w = WeightsDir(out)
    assert {k for k, t in w.resident_linears.items() if t.quant == "int8"} == \
        {f"model.layers.{i}.{n}.weight" for i in range(3) for n in ("mlp.down_proj", "self_attn.v_proj")} | {"lm_head.weight"}
    src = SourceModel(model_dir)
    for i in range(3):
        # down_proj alone in its AWQ group (up_proj -> down_proj): no scale, so it is the source weight rounded to
        # int8. v_proj shares the input norm's scale with int4 q/k: scaled by it, so not the plain rounding.
        down, v = (f"model.layers.{i}.{n}.weight" for n in ("mlp.down_proj", "self_attn.v_proj"))
        assert all(torch.equal(a, b) for a, b in zip(w.read(down), quant.quantize_int8(src.tensor(down), 32)))
        assert not torch.equal(w.read(v)[0], quant.quantize_int8(src.tensor(v), 32)[0])
    assert_engine_computes_what_is_stored(model_dir, w)


def test_int8_names_that_match_nothing_are_one_line_errors(llama, tmp_path, capsys):
    model_dir, _ = llama
    rc = quantize_main([str(model_dir), str(tmp_path / "w"), "--method", "absmax", "--int8", "down"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and not (tmp_path / "w").exists()
    assert [line for line in err.splitlines() if "error:" in line] == [
        "offload-quantize: error: --int8 down: no decoder linear is called that (this model's: down_proj, gate_proj, "
        "k_proj, o_proj, q_proj, up_proj, v_proj; a glob on the full name, e.g. 'model.layers.0.*'; or sensitive)"]
    with pytest.raises(OffloadError, match="--int8 lm_head: no decoder linear"):  # the output projection has --lm-head
        quantize_model(model_dir, tmp_path / "w", method="absmax", int8=("lm_head",), progress=False)


def test_int8_sensitive_is_v_and_o_everywhere_and_down_where_llama_cpp_gives_more_bits(llama, tmp_path):
    # llama.cpp's Q4_K_M rule on 30 layers (SmolLM2-135M): the first 3, the last 4, and every third from layer 5
    assert [i for i in range(30) if methods.more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    model_dir, _ = llama  # 3 layers: down_proj of layer 2 only
    w = WeightsDir(quantize_model(model_dir, tmp_path / "w", method="absmax", int8=("sensitive",), progress=False))
    want = {f"model.layers.{i}.self_attn.{n}.weight" for i in range(3) for n in ("v_proj", "o_proj")}
    assert set(w.resident_linears) == want | {"model.layers.2.mlp.down_proj.weight", "lm_head.weight"}
    assert w.manifest["method_options"]["int8"] == ["sensitive"]
