"""Split-K decode in one launch (last-program reduction) and the precomputed launch plans of fused_gemv.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (conftest), which runs the programs one after
another: it checks the arithmetic, the int32 arrival counting (tl.atomic_add) and the counter reset,
not concurrency. A split-K output is written only by the program that counts itself last, so a
counter that is not counted or not reset leaves the NaN these tests poison `out` with.
"""
import pytest
import torch
import triton

from offload import quant
from offload.kernels import FORCE_TRITON_ENV, gemv, int4_linear, int8_linear

DEVICE = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu").device  # with its index on cuda
BLOCK = 32
# (N, K): N not a multiple of the tile width; K = 500 -> Kp 512, 16 scale blocks, so split 3 gives
# splits of 6, 6 and 4 blocks and split 7 gives six splits (3 blocks each, then 1).
N, K = 40, 500


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")


def make_weight(n, k, bits, seed=0):
    """(packed uint8 [N, Kp/2] or int8 [N, Kp], scales bf16 [N, Kp/BLOCK]): every byte value, padding too."""
    g = torch.Generator().manual_seed(seed)
    kp = quant.padded_k(k, BLOCK)
    if bits == 4:
        w = torch.randint(0, 256, (n, kp // 2), generator=g, dtype=torch.uint8)
    else:
        w = torch.randint(-128, 128, (n, kp), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, kp // BLOCK, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    return w.to(DEVICE), scales.to(DEVICE)


def make_x(m, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(DEVICE)


def make_bias(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) + 0.5).to(DEVICE, torch.bfloat16)


def assert_matches_ref(out, x, w, scales, k, bias, bits):
    ref = gemv.gemv_ref(x, w, scales, k, bias, bits=bits)
    assert out.shape == ref.shape and torch.isfinite(out).all(), "output not fully written"
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def counters_are_zero():
    return not gemv._scratch[DEVICE].counts.any()


@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_split_k_matches_reference(bits, with_bias, m, split_k):
    w, scales = make_weight(N, K, bits)
    x, bias = make_x(m, K), make_bias(N) if with_bias else None
    out = torch.full((m, N), float("nan"), device=DEVICE)
    assert gemv.fused_gemv(x, w, scales, K, bias, out=out, split_k=split_k, bits=bits) is out
    assert_matches_ref(out, x, w, scales, K, bias, bits)
    assert counters_are_zero()


def test_plan_splits_as_asked_without_empty_splits():
    w, scales = make_weight(N, K, 4)
    splits = [gemv.GemvLaunch(make_x(1, K), w, scales, K, None, split_k, 4).grid[1] for split_k in (1, 2, 3, 7, 99)]
    assert splits == [1, 2, 3, 6, 16]


@pytest.mark.parametrize("bits", [4, 8])
def test_repeated_calls_are_bitwise_identical(bits):
    w, scales = make_weight(N, K, bits)
    x, bias = make_x(3, K), make_bias(N)
    results = []
    for _ in range(3):  # a counter left non-zero would make the next call skip its reduction (NaN stays)
        out = torch.full((3, N), float("nan"), device=DEVICE)
        results.append(gemv.fused_gemv(x, w, scales, K, bias, out=out, split_k=3, bits=bits))
        assert counters_are_zero()
    assert torch.isfinite(results[0]).all()
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_shapes_interleaved_share_one_workspace(monkeypatch):
    monkeypatch.setattr(gemv, "_scratch", {})  # start small, so the larger shapes grow it
    monkeypatch.setattr(gemv, "_plans", {})
    cases = [(24, 128, 1, 2, 4, False), (40, 500, 16, 7, 8, True), (72, 256, 3, 3, 4, True), (40, 500, 2, 2, 4, False),
             (400, 128, 16, 1, 4, True)]  # unsplit: needs no workspace, however large M * N
    weights = [make_weight(n, k, bits, seed=i) for i, (n, k, _, _, bits, _) in enumerate(cases)]
    sizes = []
    for round_ in range(2):
        for (n, k, m, split_k, bits, with_bias), (w, scales) in zip(cases, weights):
            x, bias = make_x(m, k, seed=round_), make_bias(n) if with_bias else None
            assert_matches_ref(gemv.fused_gemv(x, w, scales, k, bias, split_k=split_k, bits=bits),
                               x, w, scales, k, bias, bits)
        (scratch,) = gemv._scratch.values()
        sizes.append((scratch.ws.data_ptr(), scratch.ws.numel(), scratch.counts.data_ptr(), scratch.counts.numel()))
    assert sizes[1] == sizes[0], "the second round grew the workspace"
    # The largest split launch: split 7 of 16 blocks is 6 splits, M 16, N 40; counters for 72 / MIN_BLOCK_N tiles.
    assert sizes[0][1::2] == (6 * 16 * 40, triton.cdiv(72, gemv.MIN_BLOCK_N))
    assert counters_are_zero()


def test_one_plan_per_shape_and_m(monkeypatch):
    built = []

    class CountingLaunch(gemv.GemvLaunch):
        def __init__(self, x, *args):
            built.append(x.shape[0])
            super().__init__(x, *args)

    monkeypatch.setattr(gemv, "_plans", {})
    monkeypatch.setattr(gemv, "GemvLaunch", CountingLaunch)
    w4, s4 = make_weight(N, K, 4)
    w8, s8 = make_weight(24, 128, 8)
    for _ in range(3):
        for m in (1, 3):
            int4_linear(make_x(m, K), w4, s4, K, make_bias(N))
        int8_linear(make_x(1, 128), w8, s8, 128)
    assert sorted(built) == [1, 1, 3]
    assert len(gemv._plans) == 3


def test_hot_path_computes_and_allocates_nothing(monkeypatch):
    w, scales = make_weight(N, K, 4)
    x, bias = make_x(2, K), make_bias(N)
    out = torch.empty(2, N, device=DEVICE)
    gemv.fused_gemv(x, w, scales, K, bias, out=out, split_k=3)  # builds the plan

    def forbidden(*args, **kwargs):
        raise AssertionError("called on the hot path")

    out.fill_(float("nan"))
    with monkeypatch.context() as patch:
        for module, name in [(triton, "cdiv"), (gemv, "auto_split_k"), (gemv._tuner, "config"), (torch, "empty"),
                             (torch, "zeros")]:
            patch.setattr(module, name, forbidden)
        gemv.fused_gemv(x, w, scales, K, bias, out=out, split_k=3)
    assert_matches_ref(out, x, w, scales, K, bias, 4)


def test_plan_launches_the_config_the_tuner_gives(monkeypatch):
    # With OFFLOAD_AUTOTUNE=1 the tuner's choice is whatever benchmarked fastest; the plan must launch it.
    chosen = triton.Config({"BLOCK_N": 32, "STAGES": 1}, num_warps=4, num_stages=1)
    monkeypatch.setattr(gemv._tuner, "config", lambda device, grid, args, kwargs: chosen)
    monkeypatch.setattr(gemv, "_plans", {})
    w, scales = make_weight(N, K, 4)
    x = make_x(1, K)
    out = gemv.fused_gemv(x, w, scales, K, split_k=2)
    (plan,) = gemv._plans.values()
    assert plan.grid == (2, 2) and plan.meta["BLOCK_N"] == 32 and plan.meta["num_warps"] == 4
    assert_matches_ref(out, x, w, scales, K, None, 4)


def test_counters_cover_the_narrowest_tile():
    configs = gemv._configs(80) + gemv._configs(90) + list(gemv._tuner.interpret_configs)
    assert min(c.kwargs["BLOCK_N"] for c in configs) >= gemv.MIN_BLOCK_N
