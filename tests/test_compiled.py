"""The compiled decode step (offload/compiled.py): one graph with no breaks, the same greedy tokens
as the eager engine, and eager wherever the plan is not all bound."""
import functools
import json
import shutil

import pytest
import torch
from transformers import StaticCache

import offload
from offload.kernels import cpu_native
from offload.modules import kv_cache_kwarg
from offload import compiled
from offload.compiled import MIN_CACHE_LEN, CompiledDecode, cache_len
from offload.errors import OffloadError
from offload.weights import quantize_model

from test_engine import prompt_ids

NEW_TOKENS = 16


def greedy(engine, ids):
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=257)
    with torch.inference_mode():
        return engine.model.generate(**engine.add_static_cache(kwargs))


def eager_greedy(model_dir, weights_dir, ids):
    """The reference: greedy tokens of the eager float32 engine."""
    with offload.load(model_dir, weights_dir, device="cpu", dtype=torch.float32, progress=False,
                      compile=False) as engine:
        return greedy(engine, ids)


@pytest.fixture(scope="module")
def llama_int8_head(llama, tmp_path_factory):
    """The tiny Llama with an int8 output projection (resident, the int8 kernel)."""
    model_dir, _ = llama
    root = tmp_path_factory.mktemp("int8-head")
    shutil.copytree(model_dir, root / "model")
    quantize_model(root / "model", root / "w", force=True, progress=False, method="absmax", lm_head="int8")
    return root / "model", root / "w"


def test_cache_len_buckets():
    assert cache_len(1, None) == MIN_CACHE_LEN
    assert cache_len(MIN_CACHE_LEN + 1, None) == 2 * MIN_CACHE_LEN
    assert cache_len(1000, 512) == 1000  # past the model's context: never shorter than needed
    assert cache_len(300, 400) == 400


@pytest.mark.parametrize("kind", ["llama", "qwen2", "torch-kernel", "int8-head", "triton"])
def test_decode_step_compiles_without_graph_breaks(models, llama_int8_head, kind, monkeypatch):
    # "torch-kernel": PyTorch's cpu int4 op instead of our native one (OFFLOAD_CPU_KERNEL=torch);
    # "triton": the cuda path's products (the Triton launchers as the offload:: custom ops), selected on
    # cpu tensors by OFFLOAD_FORCE_TRITON under the interpreter, with the int8 head on its Triton kernel
    model_dir, weights_dir = llama_int8_head if kind in ("int8-head", "triton") else models[kind.replace(
        "torch-kernel", "llama")]
    if kind == "triton":
        monkeypatch.setenv("OFFLOAD_FORCE_TRITON", "1")
    if kind == "torch-kernel":
        monkeypatch.setenv("OFFLOAD_CPU_KERNEL", "torch")
    dtype = torch.float32 if kind == "triton" else torch.bfloat16  # the interpreter computes bf16 wrongly
    with offload.load(model_dir, weights_dir, device="cpu", dtype=dtype, progress=False,
                      compile=False) as engine, torch.inference_mode():
        model, ids = engine.model, prompt_ids("cpu")
        cache = StaticCache(config=model.config, max_cache_len=64)
        kv = {kv_cache_kwarg(model): cache}  # `cache` from transformers 5.25, `past_key_values` before
        logits = model(input_ids=ids, **kv, use_cache=True).logits  # eager prefill
        pos = torch.tensor([ids.shape[1]])
        embeds = model.get_input_embeddings()(logits[:, -1:].argmax(-1))  # [1, 1, D]
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.forward)(inputs_embeds=embeds, **kv,
                                                         position_ids=pos[None], cache_position=pos, use_cache=True)
        int4_kernel = {"NativeInt4Format": "offload_native.int4_mm",
                       "CpuInt4Format": "aten._weight_int4pack_mm_for_cpu"}.get(type(engine.fmt).__name__)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    int8_kernel = "offload_native.int8_mm" if cpu_native.available() else "aten._weight_int8pack_mm"
    kernels = {"int8-head": [int8_kernel], "triton": ["offload.int4_linear", "offload.int8_linear"]}
    if kind == "torch-kernel":
        assert int4_kernel == "aten._weight_int4pack_mm_for_cpu"
    if dtype == torch.bfloat16 and cpu_native.available():  # the decode attention is our kernel's too
        kernels.setdefault(kind, [int4_kernel]).append("offload_native.decode_attention")
    for kernel in kernels.get(kind, [int4_kernel]):
        assert any(kernel in op for op in ops), (kernel, sorted(ops))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_compiled_generate_matches_eager(models, kind):
    # float32: inductor fuses the norms and rotary and rounds bf16 intermediates in another order than eager,
    # which moves greedy tokens of these random models after a few steps; in float32 the two agree
    model_dir, weights_dir = models[kind]
    ids = prompt_ids("cpu")
    with offload.load(model_dir, weights_dir, device="cpu", dtype=torch.float32, progress=False,
                      compile=False) as engine:
        assert engine.compiled is None and not engine.stats["compiled"]
        expected = greedy(engine, ids)
    torch._dynamo.reset()
    with offload.load(model_dir, weights_dir, device="cpu", dtype=torch.float32, progress=False,
                      compile=True) as engine:
        assert torch.equal(greedy(engine, ids), expected)
        first = engine.stats
        assert first["compiled"] and first["compile_seconds"] > 0
        assert first["decode_tokens"] == NEW_TOKENS - 2  # the step that compiled is left out of the figures
        engine.reset_stats()
        assert torch.equal(greedy(engine, ids), expected)  # the graph is reused: nothing compiles again
        again = engine.stats
        assert again["compile_seconds"] == first["compile_seconds"]
        assert again["decode_tokens"] == NEW_TOKENS - 1
        # every product still counted: each matrix once per pass
        passes = NEW_TOKENS
        assert again["cache_hits"] == passes * len(engine.store.entries)
        text = engine.generate("hi", max_new_tokens=4)  # engine.generate supplies the static cache itself
        assert isinstance(text, str)


def test_streamed_plan_stays_eager(models):
    # copies through a quarter-size cache: matrices stream, nothing is bound for good, so no graph
    model_dir, weights_dir = models["llama"]
    ids = prompt_ids("cpu")
    expected = eager_greedy(model_dir, weights_dir, ids)
    with offload.load(model_dir, weights_dir, cache="25%", device="cpu", dtype=torch.float32, progress=False,
                      emulate_copies=True, compile=True) as engine:
        assert torch.equal(greedy(engine, ids), expected)
        assert engine.stats["compile_seconds"] == 0 and engine.stats["cache_misses"] > 0


def test_compile_option_is_checked(models):
    model_dir, weights_dir = models["llama"]
    with pytest.raises(OffloadError, match="compile must be one of"):
        offload.load(model_dir, weights_dir, progress=False, compile="yes")


def test_auto_on_cpu_measures_once_per_cpu_and_model(models, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(compiled, "PROBE_ON_CPU", True)
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    model_dir, weights_dir = models["llama"]
    ids = prompt_ids("cpu")
    load = dict(device="cpu", dtype=torch.float32, progress=False)
    with offload.load(model_dir, weights_dir, **load, compile=False) as engine:
        expected = greedy(engine, ids)
    torch._dynamo.reset()
    with offload.load(model_dir, weights_dir, **{**load, "progress": True}) as engine:  # compile="auto"
        decisions = json.loads((tmp_path / compiled.PROBE_FILE).read_text())
        (key, d), = decisions.items()
        assert key == compiled.probe_key(engine) and "float32" in key
        assert d["greedy_tokens_agreeing"] == compiled.PROBE_TOKENS and d["compile_seconds"] > 0  # float32
        assert d["faster"] == (d["compiled_tokens_per_s"] > d["eager_tokens_per_s"])
        assert (engine.compiled is not None) == d["faster"] == engine.stats["compiled"]
        assert torch.equal(greedy(engine, ids), expected)  # whichever step it kept
        assert f"--compile auto is {'on' if d['faster'] else 'off'} on this cpu" in capsys.readouterr().err

    def measured_again(*args, **kwargs):
        raise AssertionError("measured again")
    monkeypatch.setattr(compiled, "measure", measured_again)
    for faster in (True, False):  # later loads read the recorded answer
        (tmp_path / compiled.PROBE_FILE).write_text(json.dumps({key: {**d, "faster": faster}}))
        with offload.load(model_dir, weights_dir, **load) as engine:
            assert (engine.compiled is not None) == faster
            assert ("get_compiled_call" in engine.model.__dict__) == faster

    def slower(engine, **kwargs):
        engine.compiled = CompiledDecode(engine, False)
        engine.compiled.install()
        return {"tokens": [1], "eager_tokens": [1], "eager_tokens_per_s": 10.0, "compiled_tokens_per_s": 5.0,
                "compile_seconds": 1.0, "compiled": engine.compiled}

    def fails(engine, **kwargs):
        slower(engine)
        raise RuntimeError("no C++ compiler\nmore lines")
    for fake, recorded in ((slower, {"faster": False, "eager_tokens_per_s": 10.0}),
                           (fails, {"faster": False, "error": "RuntimeError: no C++ compiler"})):
        (tmp_path / compiled.PROBE_FILE).write_text("{not json")  # unreadable: measured again, rewritten
        monkeypatch.setattr(compiled, "measure", fake)
        with offload.load(model_dir, weights_dir, **load) as engine:
            assert engine.compiled is None and "get_compiled_call" not in engine.model.__dict__
            assert torch.equal(greedy(engine, ids), expected)
        got = json.loads((tmp_path / compiled.PROBE_FILE).read_text())[key]
        assert recorded.items() <= got.items()
    # a streamed plan (copies emulated) never compiles, so it is not measured
    with offload.load(model_dir, weights_dir, **load, cache="25%", emulate_copies=True) as engine:
        assert engine.compiled is None


def test_engines_of_one_model_class_keep_their_own_graphs(models, llama_int8_head):
    # the compiled step checks only its inputs before each step, not the modules (offload/compiled.py), so two
    # engines of the same model class must never share a graph: here the same Llama with an int4 and an int8
    # output projection, both compiled in one process without a dynamo reset in between
    ids = prompt_ids("cpu")
    expected, got = [], []
    for model_dir, weights_dir in (models["llama"], llama_int8_head):
        expected.append(eager_greedy(model_dir, weights_dir, ids))
    torch._dynamo.reset()
    engines = [offload.load(model_dir, weights_dir, device="cpu", dtype=torch.float32, progress=False,
                            compile=True) for model_dir, weights_dir in (models["llama"], llama_int8_head)]
    try:
        for engine in engines + engines[::-1]:  # each after the other has compiled and run
            got.append(greedy(engine, ids))
            assert engine.stats["compiled"]
    finally:
        for engine in engines:
            engine.close()
    assert not torch.equal(expected[0], expected[1])  # the two heads answer differently: the check can fail
    for out, want in zip(got, expected + expected[::-1]):
        assert torch.equal(out, want)


def test_replan_compiles_the_step_afresh(models):
    # after a replan the slots are new tensors; the compiled step, which does not re-check the modules, must
    # compile again rather than run the graph made for the old plan
    model_dir, weights_dir = models["llama"]
    ids = prompt_ids("cpu")
    expected = eager_greedy(model_dir, weights_dir, ids)
    with offload.load(model_dir, weights_dir, device="cpu", dtype=torch.float32, progress=False,
                      emulate_copies=True, compile=True) as engine:
        assert torch.equal(greedy(engine, ids), expected)
        first = engine.compiled.forward
        engine.replan("25%", "pin")  # streamed: eager
        assert torch.equal(greedy(engine, ids), expected)
        engine.replan("full", "pin")
        assert torch.equal(greedy(engine, ids), expected)
        assert engine.compiled.forward is not first and engine.stats["compile_seconds"] > 0


def test_measure_alternates_eager_and_compiled_rounds(models, monkeypatch):
    # one warm-up of each side, then alternating rounds: a change in the machine's load mid-measurement falls on
    # both sides instead of deciding `auto` once and for all
    model_dir, weights_dir = models["llama"]
    with offload.load(model_dir, weights_dir, device="cpu", dtype=torch.float32, progress=False,
                      compile=False) as engine:
        sides, real = [], engine.model.generate
        monkeypatch.setattr(engine.model, "generate",
                            lambda **kw: sides.append("compiled" if engine.compiled else "eager") or real(**kw))
        m = compiled.measure(engine, new_tokens=4, rounds=3)
        assert engine.compiled is m["compiled"] and engine.stats["compiled"]  # left installed
    assert sides == ["eager", "compiled"] * 4
    assert m["tokens"] == m["eager_tokens"] and len(m["tokens"]) == 4  # float32: the same greedy tokens


def test_cuda_mode_reaches_torch_compile_as_options(models, monkeypatch):
    # torch.compile takes a mode or options, not both: on cuda the step's CUDA graphs must arrive as the
    # options "reduce-overhead" stands for, beside the guard filter (checked on cpu with a fake torch.compile)
    from torch._inductor import list_mode_options
    model_dir, weights_dir = models["llama"]
    calls = []
    real = torch.compile

    @functools.wraps(real)  # the real signature: _compile looks for isolate_recompiles in it
    def fake(fn, **kw):
        calls.append(kw)
        return fn
    monkeypatch.setattr(torch, "compile", fake)
    with offload.load(model_dir, weights_dir, device="cpu", dtype=torch.float32, progress=False,
                      compile=False) as engine:
        step = CompiledDecode(engine, progress=False)
        step.mode = "reduce-overhead"  # what a cuda engine sets
        step.restart()
    cpu, cuda = calls
    assert "mode" not in cuda and cuda["isolate_recompiles"] and cuda["fullgraph"]
    assert list_mode_options("reduce-overhead").items() <= cuda["options"].items()
    assert cuda["options"]["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert cpu["options"].keys() == {"guard_filter_fn", "size_asserts"}


def test_int8_decoder_linears_compile_and_match_eager(llama, tmp_path):
    # `--int8 down_proj`: a resident Int8Linear in every layer, inside the compiled step
    model_dir, _ = llama
    quantize_model(model_dir, tmp_path / "w", progress=False, method="absmax", lm_head="int8", int8=("down_proj",))
    ids = prompt_ids("cpu")
    expected = eager_greedy(model_dir, tmp_path / "w", ids)
    torch._dynamo.reset()
    with offload.load(model_dir, tmp_path / "w", device="cpu", dtype=torch.float32, progress=False,
                      compile=True) as engine:
        assert not any("down_proj" in key for key in engine.store.entries)
        assert torch.equal(greedy(engine, ids), expected) and engine.stats["compiled"]
