"""The native cpu int4 kernel (offload.kernels.cpu_native) against an fp32 torch reference of its formula,
its fallback when it cannot build, and the engine's greedy tokens with it."""
import functools
import warnings

import pytest
import torch

import offload
from offload import formats, quant
from offload.kernels import cpu_native, dispatch

import tiny
from test_engine import greedy, prompt_ids

STEPS = 16  # greedy steps compared (as in test_engine's cpu fast path test)


def greedy_scores(model, ids, new_tokens=STEPS):
    """(ids + `new_tokens` greedy tokens [1, L + new], float logits of each step [new, V])."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=257, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.cat(out.logits).float()

needs_native = pytest.mark.skipif(not cpu_native.available(), reason="the native cpu kernel does not run here")

# (N, K, block): K not a multiple of the block or of 64, N not a multiple of the 4-row tile, every block size
SHAPES = [(33, 200, 128), (64, 576, 64), (17, 96, 32), (7, 64, 32), (130, 1536, 128), (5, 40, 32), (9, 300, 256)]


def random_int4(n, k, block, gen):
    """Random bytes (every nibble, padded columns included: x's zero padding must cancel them), signed scales."""
    kp = quant.padded_k(k, block)
    packed = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.randn(n, kp // block, generator=gen) * 0.05).to(torch.bfloat16)
    return packed, scales


def quantized_x(x):
    """x [M, K] as the kernel sees it, float64: quantized to int8 per 32 columns exactly as the kernel does (fp32
    scale d = max|x| / 127, round half to even of x * (1 / d)), times d (each product is exact in float64)."""
    m, k = x.shape
    kc = -(-k // 32) * 32
    xb = torch.nn.functional.pad(x.float(), (0, kc - k)).view(m, kc // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xb * torch.where(d != 0, 1 / d, 0))
    return (xq.double() * d.double()).view(m, kc)[:, :k]


def formula(x, packed, scales, k):
    """The kernel's result in float64: quantized_x(x [M, K]) @ dequantize(packed, scales).T -> [M, N]."""
    return quantized_x(x) @ quant.dequantize(packed, scales, (packed.shape[0], k)).double().T


@needs_native
@pytest.mark.parametrize("n,k,block", SHAPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_matches_its_formula(n, k, block, threads):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    packed, scales = random_int4(n, k, block, gen)
    w = cpu_native.NativeInt4Weight(*cpu_native.repack(packed, scales), k)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (1, 2, 3, 4, 5, 8):
            x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
            x[0, : min(k, 40)] = 0  # a chunk of zeros: d = 0 must give 0, not NaN
            ref = formula(x, packed, scales, k)
            y = cpu_native.native_int4_linear(x, w)  # fp32 in, fp32 out
            assert y.shape == (m, n) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            yb = cpu_native.native_int4_linear(x.bfloat16(), w)  # bf16 in: the kernel rounds its fp32 result
            ref_b = formula(x.bfloat16().float(), packed, scales, k)
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.double(), ref_b, rtol=8e-3, atol=1e-5 * ref_b.abs().max().item())
    finally:
        torch.set_num_threads(old)


@needs_native
def test_close_to_the_exact_product():
    # Against x @ W.T in fp32 (no activation quantization): the int8 rounding of x costs ~0.5% of the norm.
    gen = torch.Generator().manual_seed(3)
    n, k = 96, 576
    packed, scales = quant.quantize(torch.randn(n, k, generator=gen))
    w = cpu_native.NativeInt4Weight(*cpu_native.repack(packed, scales), k)
    x = torch.randn(4, k, generator=gen)
    exact = x @ quant.dequantize(packed, scales, (n, k)).T
    rel = ((cpu_native.native_int4_linear(x, w) - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 1e-2


@pytest.mark.parametrize("n,k,block", SHAPES)
def test_repack_round_trips(n, k, block):
    packed, scales = random_int4(n, k, block, torch.Generator().manual_seed(k))
    w, kernel_scales = cpu_native.repack(packed, scales)
    kq = cpu_native.padded_k(packed.shape[1] * 2)
    assert w.shape == (n, kq // 2) and kernel_scales.shape == (n, kq // block)
    assert (w.nbytes, kernel_scales.nbytes) == cpu_native.nbytes((n, k), block)
    q = cpu_native.unpack(w)  # [N, Kq]
    assert torch.equal(q[:, : packed.shape[1] * 2], quant.unpack_nibbles(packed))
    assert not q[:, packed.shape[1] * 2:].any() and not kernel_scales[:, scales.shape[1]:].any()
    assert torch.equal(kernel_scales[:, : scales.shape[1]], scales)


@needs_native
@pytest.mark.parametrize("m", [1, cpu_native.MAX_M, cpu_native.MAX_M + 1, 40])
def test_linear_both_paths_with_bias_and_batch_dims(m):
    # M <= MAX_M runs the kernel, more rows dequantize + BLAS (exact up to fp32 summation order)
    gen = torch.Generator().manual_seed(m)
    n, k = 70, 200
    packed, scales = quant.quantize(torch.randn(n, k, generator=gen), block_size=64)
    w = cpu_native.NativeInt4Weight(*cpu_native.repack(packed, scales), k)
    x = torch.randn(1, m, k, generator=gen).bfloat16()  # [B, T, K]
    bias = torch.randn(n, generator=gen).bfloat16()
    y = cpu_native.native_int4_linear(x, w, bias)
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16
    ref = (formula(x[0], packed, scales, k) if m <= cpu_native.MAX_M
           else x[0].double() @ quant.dequantize(packed, scales, (n, k)).double().T) + bias.double()
    torch.testing.assert_close(y[0].double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@needs_native
def test_op_traces_under_compile():
    n, k = 48, 128
    packed, scales = quant.quantize(torch.randn(n, k))
    w, kernel_scales = cpu_native.repack(packed, scales)
    x = torch.randn(1, k).bfloat16()
    torch.library.opcheck(torch.ops.offload_native.int4_mm.default, (x, w, kernel_scales, k))
    compiled = torch.compile(lambda x: torch.ops.offload_native.int4_mm(x, w, kernel_scales, k) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.ops.offload_native.int4_mm(x, w, kernel_scales, k) * 2)


INT8_SHAPES = [(33, 200, 128), (64, 576, 64), (17, 96, 32), (5, 40, 32), (9, 300, 32)]


@needs_native
@pytest.mark.parametrize("n,k,block", INT8_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_kernel_matches_its_formula(n, k, block, threads):
    gen = torch.Generator().manual_seed(n * 100 + k)
    kp = quant.padded_k(k, block)
    qweight = torch.randint(-127, 128, (n, kp), dtype=torch.int8, generator=gen)  # padded columns too: x's zeros cancel them
    scales = (torch.randn(n, kp // block, generator=gen) * 0.01).to(torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (1, 3, 4, 5, 8):
            x = torch.randn(m, k, generator=gen) * 3
            x[0, : min(k, 40)] = 0
            ref = quantized_x(x) @ quant.dequantize_int8(qweight, scales, k).double().T
            y = cpu_native.native_int8_linear(x, qweight, scales, k)
            assert y.shape == (m, n) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            yb = cpu_native.native_int8_linear(x.bfloat16(), qweight, scales, k)
            ref_b = quantized_x(x.bfloat16().float()) @ quant.dequantize_int8(qweight, scales, k).double().T
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.double(), ref_b, rtol=8e-3, atol=1e-5 * ref_b.abs().max().item())
    finally:
        torch.set_num_threads(old)


@needs_native
def test_int8_head_runs_natively_from_dispatch_and_traces(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    n, k = 300, 200
    qweight, scales = quant.quantize_int8(torch.randn(n, k, generator=gen), 32)
    x = torch.randn(1, 2, k, generator=gen).bfloat16()
    calls = []
    real = cpu_native.native_int8_linear
    monkeypatch.setattr(cpu_native, "native_int8_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    y = dispatch.int8_linear(x, qweight, scales, k, prepared={})
    assert calls == [(2, k)] and y.shape == (1, 2, n)
    torch.testing.assert_close(y[0].double(), quantized_x(x[0].float()) @ quant.dequantize_int8(qweight, scales, k).double().T,
                               rtol=8e-3, atol=1e-2)
    torch.library.opcheck(torch.ops.offload_native.int8_mm.default, (x[0], qweight, scales, k))


def test_bad_inputs_raise_one_line_errors():
    if not cpu_native.available():
        pytest.skip("the native cpu kernel does not run here")
    packed, scales = quant.quantize(torch.randn(8, 64), block_size=32)
    w = cpu_native.NativeInt4Weight(*cpu_native.repack(packed, scales), 64)
    with pytest.raises(ValueError, match="x has 65 features"):
        cpu_native.native_int4_linear(torch.randn(1, 65), w)
    with pytest.raises(RuntimeError, match="in_features"):
        torch.ops.offload_native.int4_mm(torch.randn(1, 200), w.w, w.scales, 200)
    with pytest.raises(RuntimeError, match="int8_mm: x has"):
        torch.ops.offload_native.int8_mm(torch.randn(1, 65), torch.zeros(8, 64, dtype=torch.int8), scales[:, :2], 65)
    with pytest.raises(ValueError, match="block size 96"):
        cpu_native.repack(*quant.quantize(torch.randn(8, 96), block_size=96))


@pytest.fixture
def unbuilt(monkeypatch):
    """A fresh process state for the loader (its result is cached once per process)."""
    monkeypatch.setattr(cpu_native, "_loaded", functools.lru_cache(maxsize=None)(cpu_native._loaded.__wrapped__))
    return monkeypatch


def failing_build():
    raise RuntimeError("Error building extension 'offload_native': g++: command not found")


@pytest.mark.parametrize("cause", ["no compiler", "no avx2"])
def test_fallback_warns_once_and_keeps_pytorchs_op(unbuilt, models, cause):
    if cause == "no compiler":
        unbuilt.setattr(cpu_native, "_build", failing_build)
    else:
        unbuilt.setattr(cpu_native, "cpu_flags", lambda: {"sse2", "fma"})
    model_dir, weights_dir = models["llama"]
    ids = prompt_ids("cpu")
    expected = greedy(tiny.reference_model(model_dir).to(torch.bfloat16), ids)[:, : ids.shape[1] + 16]
    with pytest.warns(RuntimeWarning, match="using PyTorch's int4 op") as record:
        assert not cpu_native.available()
        with offload.load(model_dir, weights_dir, cache="full", device="cpu", dtype=torch.bfloat16,
                          progress=False) as engine:
            assert not isinstance(engine.fmt, formats.NativeInt4Format)
            got = greedy(engine.model, ids)[:, : ids.shape[1] + 16]
    assert [len(str(w.message).splitlines()) for w in record if cpu_native.ENV in str(w.message) or
            "native cpu kernel" in str(w.message)] == [1]
    assert torch.equal(got, expected)


def test_env_switch(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV, "torch")
    assert not cpu_native.available()
    assert not isinstance(formats.make_format("int4", 128, torch.device("cpu"), torch.bfloat16),
                          formats.NativeInt4Format)
    monkeypatch.setenv(cpu_native.ENV, "fast")
    with pytest.raises(ValueError, match="choose native or torch"):
        cpu_native.available()


@needs_native
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("cache", ["full", "25%"])
def test_engine_greedy_tokens_match_reference(models, kind, cache):
    # Each decode step's logits against the fp32 reference model along the engine's own tokens: the error is
    # no worse than twice the plain bf16 model's (plus 1% of the logit range), as for PyTorch's op in
    # test_engine.py, and each greedy token is the reference's or one within that step's error of it. Exact
    # equality with a reference over 16 tokens is too strict here: these random tiny models have near-ties
    # (top-2 logits 0.05-0.12 apart) that int8 activations flip, as bf16 rounding does (the plain bf16 model
    # picks another token than fp32 at 2 of 16 steps on qwen2).
    model_dir, weights_dir = models[kind]
    ref32 = tiny.reference_model(model_dir)
    ref16 = tiny.reference_model(model_dir).to(torch.bfloat16)
    ids = prompt_ids("cpu")
    with offload.load(model_dir, weights_dir, cache=cache, device="cpu", dtype=torch.bfloat16,
                      progress=False) as engine:
        assert isinstance(engine.fmt, formats.NativeInt4Format)
        got, ours = greedy_scores(engine.model, ids)  # ours: [STEPS, V]
    with torch.no_grad():  # logits of the positions that chose each new token, in one pass along `got`
        exact, bf16 = (m(got[:, :-1]).logits[0, ids.shape[1] - 1:].float() for m in (ref32, ref16))
    err = (ours - exact).abs().amax(-1)  # [STEPS]
    assert err.max() <= 2 * (bf16 - exact).abs().max() + 1e-2 * exact.abs().max()
    chosen = got[0, ids.shape[1]:]
    regret = exact.amax(-1) - exact.gather(1, chosen[:, None])[:, 0]  # 0 where we chose the reference's token
    assert (regret <= err).all(), f"steps {torch.nonzero(regret > err).flatten().tolist()} chose a worse token"
