"""offload-bench on cpu: a tiny synthetic model, both policies, two batch sizes and both peers. Checks the CSV
against the engine's own accounting and the peers' tokens against offload's, the PNG, the conditions file, the
bf16 default and the one-line errors."""
import csv
import importlib.metadata
import json
import subprocess
import sys

import psutil
import pytest
import torch

from offload import quant
from offload.bench import sweep
from offload.bench.baselines import peer_legend
from offload.bench.synthetic import SyntheticWeights
from offload.cli import bench_main

BENCH = [sys.executable, "-c", "import sys; from offload.cli import bench_main; sys.exit(bench_main())"]


def micro_config(root):
    """configs/tiny.json, shrunk further so that a whole sweep stays well under a minute on 2 cores."""
    config = json.loads((sweep.CONFIGS / "tiny.json").read_text())
    config.update(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_window_layers=2)
    path = root / "micro.json"
    path.write_text(json.dumps(config))
    return path


def run_bench(args, cwd):
    proc = subprocess.run(BENCH + args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def sweep_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out = root / "micro.csv"
    # float32: the exact reference path, so the peers must generate exactly offload's tokens
    stdout = run_bench(["--model", str(micro_config(root)), "--device", "cpu", "--dtype", "float32",
                        "--cache", "50%,full", "--policy", "pin,lru", "--batch", "1,2", "--prompt-len", "8",
                        "--new-tokens", "3", "--warmup-tokens", "2", "--reps", "1", "--peers", "seed,accelerate",
                        "--threads", "1", "--note", "shared machine", "--out", str(out)], root)
    return out, stdout


def test_console_scripts_point_at_cli():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
               if e.name.startswith("offload-")}
    assert scripts["offload-bench"] == "offload.cli:bench_main"
    assert scripts["offload-eval"] == "offload.cli:eval_main"


def test_sweep_rows_follow_the_engine_accounting(sweep_csv):
    out, stdout = sweep_csv
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 2 * 2 * 2  # caches x policies x batches
    assert {(r["cache_spec"], r["policy"], r["batch"]) for r in rows} == {
        (c, p, b) for c in ("50%", "full") for p in ("pin", "lru") for b in ("1", "2")}
    model_bytes = SyntheticWeights(sweep.config_from_json(out.parent / "micro.json")).int4_nbytes()
    for r in rows:
        assert r["note"] == "" and r["seed_note"] == "" and r["accelerate_note"] == "", r
        assert (r["device"], r["model"], r["cache_format"], r["dtype"], r["threads"]) == (
            "cpu", "micro", "int4", "float32", "1")
        assert int(r["model_bytes"]) == model_bytes
        expected_budget = model_bytes if r["cache_spec"] == "full" else model_bytes // 2
        assert abs(int(r["cache_bytes"]) - expected_budget) <= model_bytes // 100
        for col in ("prefill_tok_s", "decode_tok_s", "limit_tok_s", "seed_decode_tok_s", "accelerate_decode_tok_s"):
            assert float(r[col]) > 0, col
        # the ratio and fraction columns are the quotients of the measured columns
        for peer in ("seed", "accelerate"):
            assert float(r[f"vs_{peer}"]) == pytest.approx(float(r["decode_tok_s"]) / float(r[f"{peer}_decode_tok_s"]),
                                                           rel=1e-4)
        assert float(r["fraction_of_limit"]) == pytest.approx(float(r["decode_tok_s"]) / float(r["limit_tok_s"]),
                                                              rel=1e-4)
        # every peer computes the same model (dequantized int4 weights, float32 on cpu)
        assert float(r["seed_token_match"]) == 1.0
        assert float(r["accelerate_token_match"]) == 1.0
    for r in rows:
        if r["cache_spec"] == "full":  # everything resident: nothing copied, every access a hit
            assert float(r["h2d_bytes_per_token"]) == 0 and float(r["hit_rate"]) == 1
        elif r["policy"] == "lru":  # a cyclic scan longer than the cache: every access misses
            assert float(r["hit_rate"]) == 0
            assert float(r["h2d_bytes_per_token"]) == pytest.approx(model_bytes / int(r["batch"]), rel=0.02)
        else:  # pin streams what is not resident, once per step, shared by the batch
            streamed = model_bytes - int(r["resident_bytes"])
            assert float(r["h2d_bytes_per_token"]) == pytest.approx(streamed / int(r["batch"]), rel=0.02)
            assert 0 < float(r["hit_rate"]) < 1
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000
    assert "decode/s" in stdout and "summary (decode):" in stdout


def test_conditions_written_beside_the_csv(sweep_csv):
    out, _ = sweep_csv
    rows = list(csv.DictReader(open(out, newline="")))
    text = out.with_suffix(".md").read_text()
    budgets = {r["cache_spec"]: int(r["cache_bytes"]) for r in rows}
    assert "- torch threads: 1\n" in text and "- dtype: float32\n" in text and "- note: shared machine\n" in text
    assert "8 random token ids per sequence (seed 0), 3 new greedy tokens, median of 1 timed calls" in text
    assert "- batch sizes: 1, 2\n" in text and "- policies: pin, lru\n" in text
    assert "load average (1, 5, 15 min) at the start: " in text
    assert f"{psutil.cpu_count(logical=False)} physical" in text and f"torch {torch.__version__}" in text
    for peer in ("seed", "accelerate"):
        assert peer_legend(peer, "cpu", "float32") in text
    from offload.units import fmt_bytes
    for spec, nbytes in budgets.items():
        assert f"{spec} = {fmt_bytes(nbytes).replace(' ', '')}" in text


def test_defaults_are_bf16_and_one_thread_per_core(tmp_path):
    out = tmp_path / "d.csv"
    run_bench(["--model", str(micro_config(tmp_path)), "--device", "cpu", "--cache", "full", "--policy", "pin",
               "--prompt-len", "4", "--new-tokens", "2", "--warmup-tokens", "2", "--reps", "1", "--no-plot",
               "--out", str(out)], tmp_path)
    (row,) = csv.DictReader(open(out, newline=""))
    assert row["dtype"] == "bfloat16" and row["note"] == ""
    assert int(row["threads"]) == psutil.cpu_count(logical=False)
    assert not out.with_suffix(".png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--policy", "bogus"], "unknown cache policy 'bogus' (choose from pin, lru)"),
    (["--model", "tiny", "--peers", "vllm"], "unknown peer 'vllm' (choose from seed, accelerate)"),
    (["--model", "no-such-model"], "no-such-model: no such file or dir, and not a shipped config"),
    (["--plot-only", "missing.csv"], "--plot-only missing.csv: no such CSV file"),
])
def test_bad_input_is_one_error_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"offload-bench: error: {message}"), err
    assert torch.get_num_threads() == threads and list(tmp_path.iterdir()) == []


def test_synthetic_weights_shapes_and_values():
    config = sweep.config_from_json(sweep.CONFIGS / "tiny.json")
    w = SyntheticWeights(config, seed=3)
    again = SyntheticWeights(config, seed=3)
    assert set(w.linears) and "lm_head.weight" in w.linears
    for name, parts in w.iter_read(list(w.tensors)):
        info = w.tensors[name]
        (name2, parts2), = again.iter_read([name])
        for a, b in zip(parts, parts2):
            assert torch.equal(a, b), f"{name} is not reproducible"
        if info.role == "linear":
            packed, scales = parts
            n, k = info.shape
            b = quant.BLOCK_SIZE
            assert packed.shape == (n, -(-k // b) * b // 2) and packed.dtype == torch.uint8
            assert scales.shape == (n, -(-k // b)) and scales.dtype == torch.bfloat16
            assert packed.float().std() > 50 and (scales > 0).all()
        else:
            (t,) = parts
            assert tuple(t.shape) == info.shape and torch.isfinite(t).all() and t.abs().sum() > 0
