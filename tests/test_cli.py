import io
import json
import shutil

import pytest

from offload.cli import quantize_main, run_main

import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {kind: tiny.make(kind, root) for kind in ("llama", "qwen2")}


def one_error_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def damaged_copy(weights_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(weights_dir, bad)
    return bad


def test_bad_inputs_give_one_line_and_nonzero_exit(models, tmp_path, capsys):
    (llama, llama_w), (qwen, _) = models["llama"], models["qwen2"]
    cases = [
        ([str(llama), str(tmp_path / "missing")], "does not exist"),
        ([str(qwen), str(llama_w)], "does not match the config"),
        ([str(llama), str(llama_w), "--cache", "1B"], "smaller than one entry"),
        ([str(llama), str(llama_w), "--cache", "0"], "smaller than one entry"),
        ([str(llama), str(llama_w), "--policy", "fifo"], "unknown cache policy"),
        ([str(llama), str(llama_w), "--cache", "12XB"], "cannot parse size"),
        ([str(llama), str(llama_w), "--cache-format", "fp8"], "unknown cache format"),
        ([str(llama), str(llama_w), "--device", "tpu"], "device"),
    ]
    for argv, message in cases:
        line = one_error_line(capsys, run_main(argv + ["--prompt", "hi"]))
        assert line.startswith("offload-run: error:") and message in line, (argv, line)

    bad = damaged_copy(llama_w, tmp_path)
    shard = next(bad.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32  # garble the safetensors header, keep the size
    shard.write_bytes(bytes(data))
    line = one_error_line(capsys, run_main([str(llama), str(bad), "--prompt", "hi"]))
    assert "cannot read" in line
    shard.unlink()
    line = one_error_line(capsys, run_main([str(llama), str(bad), "--prompt", "hi"]))
    assert "missing" in line


def test_quantize_cli_errors(models, tmp_path, capsys):
    llama, llama_w = models["llama"]
    line = one_error_line(capsys, quantize_main([str(llama), str(llama_w)]))
    assert "already exists" in line
    line = one_error_line(capsys, quantize_main([str(tmp_path), str(tmp_path / "w")]))
    assert "not a model dir" in line


def test_quantize_then_run_with_stats(models, tmp_path, capsys):
    llama, _ = models["llama"]
    assert quantize_main([str(llama), str(tmp_path / "w")]) == 0
    stats_file = tmp_path / "stats.json"
    rc = run_main([str(llama), str(tmp_path / "w"), "--prompt", "1.1+2.3=?", "--max-new-tokens", "8",
                   "--cache", "50%", "--stats", "--stats-json", str(stats_file), "--seed", "3",
                   "--temperature", "0.7", "--top-p", "0.9"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip()
    assert "memory plan: cache" in err and "decode:" in err and "MB copied per decoded token" in err
    stats = json.loads(stats_file.read_text())
    assert stats["decode_tokens"] == 7 and stats["cache_misses"] > 0


def test_interactive_chat_reads_turns_until_eof(models, monkeypatch, capsys):
    llama, llama_w = models["llama"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nsecond turn\n"))
    rc = run_main([str(llama), str(llama_w), "--chat", "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.count("\n") >= 2  # two streamed replies


def test_demo_model_knows_the_capital_of_france(tmp_path_factory, monkeypatch, capsys):
    from offload import demo
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path_factory.mktemp("offload-cache")))
    model_dir, weights_dir = demo.prepare(progress=False)
    rc = run_main([str(model_dir), str(weights_dir), "--chat", "--prompt", "What is the capital of France?",
                   "--cache", "25%", "--max-new-tokens", "16", "--stats"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Paris" in out
    assert "policy pin" in err and "decode:" in err


def test_demo_quantizes_again_when_cached_weights_are_outdated(tmp_path, monkeypatch):
    # A demo cached by an older offload (other method, head precision or format) is not run as is.
    import json
    from offload import demo, store
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    root = tmp_path / "smollm2-135m-instruct"
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "config.json").write_text("{}")  # converted already
    calls = []
    monkeypatch.setattr(demo, "quantize_model", lambda model_dir, weights_dir, **kw: calls.append(weights_dir))
    manifest = root / "weights" / store.MANIFEST
    manifest.parent.mkdir()
    current = {"format_version": store.FORMAT_VERSION, "method": store.DEFAULT_METHOD,
               "lm_head": store.DEFAULT_LM_HEAD}
    for text, quantized in [(json.dumps(current), False), (json.dumps({**current, "method": "absmax"}), True),
                            (json.dumps({k: v for k, v in current.items() if k != "lm_head"}), True),
                            ("{damaged", True)]:
        manifest.write_text(text)
        calls.clear()
        assert demo.prepare(progress=False) == (root / "hf", root / "weights")
        assert calls == ([root / "weights"] if quantized else []), text
