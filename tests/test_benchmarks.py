"""Smoke test of benchmarks/sweep.py on cpu: a tiny synthetic model, both policies, two batch sizes and both
peers. Checks the CSV (rows, columns, filled cells) and the PNG; the numbers themselves are not asserted."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def sweep_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    # configs/tiny.json, shrunk further so that the whole sweep stays well under a minute on 2 cores
    config = json.loads((BENCH / "configs" / "tiny.json").read_text())
    config.update(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_window_layers=2)
    (root / "micro.json").write_text(json.dumps(config))
    out = root / "micro.csv"
    cmd = [sys.executable, str(BENCH / "sweep.py"), "--model", str(root / "micro.json"), "--device", "cpu",
           "--cache", "50%,full", "--policy", "pin,lru", "--batch", "1,2", "--prompt-len", "8",
           "--new-tokens", "3", "--warmup-tokens", "2", "--reps", "1", "--peers", "seed,accelerate", "--threads", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_sweep_writes_csv_rows_and_png(sweep_csv):
    out, stdout = sweep_csv
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 2 * 2 * 2  # caches x policies x batches
    assert {(r["cache_spec"], r["policy"], r["batch"]) for r in rows} == {
        (c, p, b) for c in ("50%", "full") for p in ("pin", "lru") for b in ("1", "2")}
    required = ["device", "model", "batch", "prompt_len", "new_tokens", "cache_spec", "cache_bytes", "policy",
                "cache_format", "prefill_tok_s", "decode_tok_s", "h2d_bytes_per_token", "hit_rate",
                "peak_device_bytes", "h2d_GBps", "mem_GBps", "limit_tok_s", "fraction_of_limit",
                "fraction_of_budget_limit", "seed_decode_tok_s", "vs_seed", "accelerate_decode_tok_s",
                "vs_accelerate"]
    for r in rows:
        assert r["note"] == "", r["note"]
        for col in required:
            assert r[col] != "", f"{col} is empty in {r}"
        assert r["device"] == "cpu" and r["model"] == "micro" and r["cache_format"] == "int4"
        for col in ("prefill_tok_s", "decode_tok_s", "limit_tok_s", "vs_seed", "vs_accelerate"):
            assert float(r[col]) > 0, col
        # every peer computes the same model (dequantized int4 weights, float32 on cpu)
        assert float(r["seed_token_match"]) == 1.0
        assert float(r["accelerate_token_match"]) == 1.0
    full_pin = [r for r in rows if r["cache_spec"] == "full" and r["policy"] == "pin"]
    assert all(float(r["h2d_bytes_per_token"]) == 0 and float(r["hit_rate"]) == 1 for r in full_pin)
    half_pin = [r for r in rows if r["cache_spec"] == "50%" and r["policy"] == "pin"]
    assert all(float(r["h2d_bytes_per_token"]) > 0 for r in half_pin)
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000
    assert "decode/s" in stdout and "summary" in stdout


def test_synthetic_weights_shapes_and_values():
    sys.path.insert(0, str(BENCH))
    try:
        from synthetic import SyntheticWeights
        from sweep import config_from_json
    finally:
        sys.path.remove(str(BENCH))
    config = config_from_json(BENCH / "configs" / "tiny.json")
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
            assert packed.shape == (n, -(-k // 128) * 64) and packed.dtype == torch.uint8
            assert scales.shape == (n, -(-k // 128)) and scales.dtype == torch.bfloat16
            assert packed.float().std() > 50 and (scales > 0).all()
        else:
            (t,) = parts
            assert tuple(t.shape) == info.shape and torch.isfinite(t).all() and t.abs().sum() > 0
