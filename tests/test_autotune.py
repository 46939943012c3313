"""Autotuning never runs in a timed region: by default each launch takes the first config its
arch's prune keeps (no benchmark), prefill keys are coarse, and load() can warm every decode shape."""
import pytest
import torch
import triton

import offload
from offload.kernels import FORCE_TRITON_ENV, int4_linear, int4_linear_ref
from offload.kernels import _common
from offload.kernels._common import DefaultConfig, prefill_bucket
from offload.modules import OffloadedLinear

import tiny


class FakeKernel:
    arg_names = ["x_ptr", "M", "M_KEY"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_default_config_is_the_first_the_prune_keeps_and_is_chosen_once():
    configs = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=s) for b, s in ((256, 4), (128, 3), (64, 2))]
    prunes = []

    def prune(cfgs, named, kwargs):  # as the real prunes: drop what does not fit, keep order
        prunes.append(named["M_KEY"])
        return [c for c in cfgs if c.kwargs["BLOCK"] * c.num_stages <= kwargs["LIMIT"]]

    kernel = FakeKernel()
    launcher = DefaultConfig(kernel, ["M_KEY", "LIMIT"], configs, prune)
    x = torch.zeros(2, dtype=torch.bfloat16)
    for _ in range(3):
        launcher["grid"](x, 3, 4, LIMIT=500)
    launcher["grid"](x, 3, 4, LIMIT=300)  # another key: pruned again
    launcher["grid"](x.float(), 3, 4, LIMIT=500)  # another dtype too
    assert prunes == [4, 4, 4]
    chosen = [k["BLOCK"] for _, _, k in kernel.launches]
    assert chosen == [128, 128, 128, 64, 128]
    grid, args, kwargs = kernel.launches[0]
    assert grid == "grid" and args == (x, 3, 4) and kwargs["num_stages"] == 3 and kwargs["num_warps"] == 4


def test_config_for_a_direct_launch(monkeypatch):
    # The config gemv's launch plans launch with: the default one without running anything, or under
    # OFFLOAD_AUTOTUNE=1 the autotuner's pick after its launcher ran once (benchmark, then launch).
    kernel = FakeKernel()
    configs = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2) for b in (256, 64)]
    tuner = _common.PerArchAutotuner(kernel, ["M_KEY"], lambda family: configs,
                                     lambda cfgs, limit, named, kwargs: cfgs[1:], configs[0])
    x = torch.zeros(2)

    class FakeAutotuner:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernel.launches.append((grid, args, kwargs))
                self.best_config = configs[0]
            return launch

    monkeypatch.setattr(tuner, "for_device", lambda device: DefaultConfig(kernel, ["M_KEY"], configs,
                                                                          lambda cfgs, named, kwargs: cfgs[1:]))
    assert tuner.config(torch.device("cpu"), "grid", (x, 3, 4), {}) is configs[1] and not kernel.launches
    monkeypatch.setattr(tuner, "for_device", lambda device: FakeAutotuner())
    assert tuner.config(torch.device("cpu"), "grid", (x, 3, 4), {"C": 1}) is configs[0]
    assert kernel.launches == [("grid", (x, 3, 4), {"C": 1})]


def test_prefill_buckets_are_coarse():
    assert [prefill_bucket(m) for m in (1, 16, 17, 64, 65, 256, 257, 4096)] == [16, 16, 64, 64, 256, 256, 1 << 20,
                                                                               1 << 20]


def test_kernels_run_without_benchmarking(monkeypatch):
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("benchmarked"))
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (40, 128), generator=g, dtype=torch.uint8)
    scales = (torch.rand(40, 2, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    for m in (1, 20):
        x = torch.randn(m, 256, generator=g).to(torch.bfloat16)
        out = int4_linear(x, packed, scales, 256)
        ref = int4_linear_ref(x, packed, scales, 256).float()
        assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_autotune_is_opt_in(monkeypatch):
    monkeypatch.setenv(_common.AUTOTUNE_ENV, "1")
    assert _common.autotune_enabled()
    monkeypatch.delenv(_common.AUTOTUNE_ENV)
    assert not _common.autotune_enabled()


def test_warm_up_runs_each_streamed_shape_once_outside_the_cache(tmp_path, monkeypatch):
    model_dir, weights_dir = tiny.make("qwen2", tmp_path)
    with offload.load(model_dir, weights_dir, cache="50%", device="cpu", dtype=torch.float32,
                      progress=False) as engine:
        calls = []
        real = engine.fmt.linear
        monkeypatch.setattr(engine.fmt, "linear", lambda x, data, bias: calls.append((x.shape, bias is not None))
                            or real(x, data, bias))
        before = (engine.cache.hits, engine.cache.misses, dict(engine.prefetcher.slots))
        n = engine.warm_up(progress=False)
        users = [(m.key, m.bias) for m in engine.model.modules() if isinstance(m, OffloadedLinear)]
        users += [(p.key, p.bias) for p in engine.fused_products]  # q/k/v and gate/up, one entry each
        expect = {(engine.store.entries[key].shape, bias is not None) for key, bias in users}
        assert len({key for key, _ in users}) == len(engine.store.entries)
        assert n == len(expect) == len(calls) and {((1, s[1]), b) for s, b in expect} == {
            (tuple(x), b) for x, b in calls}
        assert (engine.cache.hits, engine.cache.misses, dict(engine.prefetcher.slots)) == before
