"""Safe by default: each bad case is reproduced and must end in one `error:` line (exit 2), without a
traceback, and without changing anything outside the output dir."""
import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from offload import load, quant, weights
from offload.cli import eval_main, quantize_main, run_main

import tiny


def listing(root):
    """Every path under root with its size and mtime: what 'nothing changed' compares."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def fails(capsys, rc, prog, message):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and message in last, last
    return last


def usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    fails(capsys, e.value.code, "offload-run", message)


def copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_manifest(weights_dir, change):
    m = tiny.manifest(weights_dir)
    change(m)
    (weights_dir / weights.MANIFEST).write_text(json.dumps(m))


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# 1. --force never deletes what it did not write
def test_force_refuses_outputs_that_hold_other_files(llama, tmp_path, capsys, monkeypatch):
    model = copy(llama[0], tmp_path / "par" / "model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    before = listing(tmp_path)
    cases = [([str(model), str(model)], "model dir"),
             ([str(model), str(tmp_path / "par")], "model dir"),
             ([str(model), str(other)], "has no offload.json"),
             ([str(model), str(tmp_path / "file.txt")], "not a directory"),
             ([str(model), "."], "current dir"),
             ([str(model), str(tmp_path)], "model dir")]
    monkeypatch.chdir(cwd)
    for argv, message in cases:
        fails(capsys, quantize_main(argv + ["--force"]), "offload-quantize", message)
        assert listing(tmp_path) == before, argv


def test_force_replaces_a_weights_dir_only_once_the_new_one_is_complete(llama, tmp_path, monkeypatch):
    out = copy(llama[1], tmp_path / "w")
    before = listing(tmp_path)
    real, calls = quant.quantize, []

    def failing(w, block_size=128):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return real(w, block_size)

    monkeypatch.setattr(quant, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        weights.quantize_model(llama[0], out, force=True, progress=False, method="absmax", lm_head="int4")
    assert listing(tmp_path) == before  # the old dir untouched, no temp dir left
    monkeypatch.setattr(quant, "quantize", real)
    weights.quantize_model(llama[0], out, force=True, progress=False, method="absmax", lm_head="bf16")
    assert tiny.manifest(out)["lm_head"] == "bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


# 2. a killed quantize leaves nothing behind forever
def test_stale_temp_dirs_of_dead_runs_are_removed(llama, tmp_path):
    dead = tmp_path / f".w.tmp-{dead_pid()}"
    live = tmp_path / f".w.tmp-{os.getppid()}"  # a run still going in another process
    for d in (dead, live):
        d.mkdir()
        (d / "model-00001.safetensors").write_bytes(b"x" * 1000)
    weights.quantize_model(llama[0], tmp_path / "w", progress=False, method="absmax")
    assert not dead.exists() and live.exists()
    weights.WeightsDir(tmp_path / "w")


def test_a_weights_dir_moved_aside_by_a_killed_run_is_put_back(llama, tmp_path):
    aside = copy(llama[1], tmp_path / f".w.old-{dead_pid()}")
    weights.quantize_model(llama[0], tmp_path / "w", force=True, progress=False, method="absmax", lm_head="bf16")
    assert not aside.exists() and tiny.manifest(tmp_path / "w")["lm_head"] == "bf16"


# 3. no model dir or weights dir runs its own code
def test_custom_code_is_never_run(llama, tmp_path, capsys, monkeypatch):
    model = copy(llama[0], tmp_path / "m")
    weights = copy(llama[1], tmp_path / "w")
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as CustomConfig\n"
    for d in (model, weights):
        (d / "custom.py").write_text(code)
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomConfig"}
        (d / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    fails(capsys, run_main([str(model), str(weights), "--prompt", "hi"]), "offload-run",
          "custom-code models are not supported")
    fails(capsys, run_main([str(weights), "--chat"]), "offload-run", "custom-code models are not supported")
    fails(capsys, quantize_main([str(model), str(tmp_path / "out")]), "offload-quantize",
          "custom-code models are not supported")
    assert not marker.exists() and not (tmp_path / "out").exists()


# 4. nothing is read outside the weights dir
def test_shard_paths_stay_inside_the_weights_dir(llama, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = next(llama[1].glob("*.safetensors")).name
    shutil.copy(llama[1] / shard, outside / "x.safetensors")  # what an escaping path would find
    cases = [("../outside/x.safetensors", "not a file name inside"),
             (str(outside / "x.safetensors"), "not a file name inside"),
             ("/etc/passwd", "not a file name inside"),
             ("link.safetensors", "leads outside")]
    for name, message in cases:
        bad = copy(llama[1], tmp_path / "bad")
        (bad / "link.safetensors").symlink_to(outside / "x.safetensors")
        edit_manifest(bad, lambda m: (m.__setitem__("shards", {name: m["shards"][shard]}),
                                      m.__setitem__("shard_sha256", {name: m["shard_sha256"][shard]}),
                                      [t.__setitem__("shard", name) for t in m["tensors"].values()]))
        before = listing(tmp_path)
        fails(capsys, run_main([str(bad), "--prompt", "hi"]), "offload-run", message)
        assert listing(tmp_path) == before
        shutil.rmtree(bad)
    # a link to another file inside the dir is fine
    ok = copy(llama[1], tmp_path / "ok")
    os.rename(ok / shard, ok / "data.bin")
    (ok / shard).symlink_to("data.bin")
    assert run_main([str(ok), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    # "shards": {} no longer skips the size check
    bad = copy(llama[1], tmp_path / "empty")
    edit_manifest(bad, lambda m: (m.__setitem__("shards", {}), m.pop("shard_sha256")))
    fails(capsys, run_main([str(bad), "--prompt", "hi"]), "offload-run", "which the shards list does not have")


def test_source_weight_map_stays_inside_the_model_dir(llama, tmp_path, capsys):
    model = copy(llama[0], tmp_path / "m")
    (tmp_path / "outside").mkdir()
    os.rename(model / "model.safetensors", tmp_path / "outside" / "model.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../outside/model.safetensors"}}))
    fails(capsys, quantize_main([str(model), str(tmp_path / "w")]), "offload-quantize", "not a file name inside")
    assert not (tmp_path / "w").exists()


def test_fifo_shard_is_refused_before_it_is_opened(llama, tmp_path, capsys):
    bad = copy(llama[1], tmp_path / "bad")
    shard = next(bad.glob("*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    result = {}
    worker = threading.Thread(target=lambda: result.update(rc=run_main([str(bad), "--prompt", "hi"])), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the reader so the test process can go on
        with open(shard, "wb"):
            pass
        pytest.fail("the load blocked on a FIFO shard")
    fails(capsys, result["rc"], "offload-run", "is not a regular file")


# 5. corrupted weight data is detected
def test_one_corrupt_byte_fails_the_load_and_names_the_shard(llama, tmp_path, capsys):
    bad = copy(llama[1], tmp_path / "bad")
    shard = next(bad.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1000] ^= 0x40  # tensor data, not the header: the size and every tensor's shape stay valid
    shard.write_bytes(bytes(data))
    line = fails(capsys, run_main([str(bad), "--prompt", "hi"]), "offload-run", "sha256 does not match")
    assert shard.name in line
    assert run_main([str(bad), "--prompt", "hi", "--max-new-tokens", "2", "--no-verify"]) == 0


def test_hashes_are_those_of_the_written_shards_and_old_dirs_load_with_a_notice(llama, tmp_path, capsys):
    m = tiny.manifest(llama[1])
    for name, digest in m["shard_sha256"].items():
        assert hashlib.sha256((llama[1] / name).read_bytes()).hexdigest() == digest
    old = copy(llama[1], tmp_path / "old")
    edit_manifest(old, lambda m: m.pop("shard_sha256"))
    assert run_main([str(old), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "checksums" in line]
    assert len(notices) == 1, notices


def test_verified_and_ranged_reads_return_the_stored_tensors(llama):
    from safetensors import safe_open
    w = weights.WeightsDir(llama[1])
    names = list(w.tensors)
    first = dict(w.iter_read(names))  # whole shards, hashed
    assert not w.sha256  # every shard verified once
    second = dict(w.iter_read(names[::-1]))  # only the wanted byte ranges
    for name, info in w.tensors.items():
        with safe_open(info.shard, framework="pt") as sf:
            expect = [sf.get_tensor(k) for k in info.keys]
        for a, b, c in zip(first[name], second[name], expect):
            assert a.dtype == c.dtype and torch.equal(a, c) and torch.equal(b, c)


# 6. concurrent generate calls on one engine are correct
def test_concurrent_generate_calls_equal_the_single_threaded_ones(llama):
    prompts = ["one", "two plus two", "the quick brown fox", "zzz"]
    with load(llama[0], llama[1], cache="25%", device="cpu", progress=False) as engine:
        assert engine.cache.ring > 0  # streaming: the ring is what concurrent passes would fight over without the lock
        expect = {p: engine.generate(p, max_new_tokens=6) for p in prompts}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            jobs = [(p, pool.submit(engine.generate, p, 6)) for p in prompts for _ in range(5)]
            got = [(p, job.result(timeout=300)) for p, job in jobs]
    assert all(text == expect[p] for p, text in got), got


# 7. cheap checks come before expensive work
def test_bad_options_fail_before_the_host_store_is_filled(llama, tmp_path, capsys, monkeypatch):
    from offload import engine
    fills = []
    real = engine.HostStore.from_weights
    monkeypatch.setattr(engine.HostStore, "from_weights",
                        staticmethod(lambda *a, **k: fills.append(1) or real(*a, **k)))
    no_tok = copy(llama[1], tmp_path / "no-tok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    model, w = str(llama[0]), str(llama[1])
    for flag, value in (("--policy", "fifo"), ("--cache-format", "fp8"), ("--dtype", "int3")):
        usage_error(capsys, [model, w, flag, value, "--prompt", "hi"], f"argument {flag}: invalid choice: '{value}'")
    cases = [([model, w, "--cache", "1B"], "smaller than one entry"),
             ([model, w, "--cache", "12XB"], "cannot parse size"),
             ([model, w, "--device", "tpu"], "device"),
             ([model, w, "--stats-json", str(tmp_path / "missing" / "s.json")], "does not exist"),
             ([model, w, "--stats-json", str(tmp_path)], "is a directory"),
             ([str(no_tok), str(no_tok)], "no tokenizer")]
    for argv, message in cases:
        fails(capsys, run_main(argv + ["--prompt", "hi"]), "offload-run", message)
    fails(capsys, run_main([model, w, "--prompt", "caf\udce9"]), "offload-run", "not valid UTF-8")
    assert fills == []
    assert run_main([model, w, "--prompt", "hi", "--max-new-tokens", "2"]) == 0 and fills == [1]


# 8. every bad input is one plain line
@pytest.mark.parametrize("change, message", [
    (lambda m: m.__setitem__("block_size", 0), "block_size 0"),
    (lambda m: next(iter(m["tensors"].values())).pop("role"), "has no role"),
    (lambda m: m.__setitem__("shards", list(m["shards"])), "must be objects"),
    (lambda m: m.__setitem__("shards", {k: f"{v} bytes" for k, v in m["shards"].items()}), "not a byte count"),
])
def test_damaged_manifests(llama, tmp_path, capsys, change, message):
    bad = copy(llama[1], tmp_path / "bad")
    edit_manifest(bad, change)
    fails(capsys, run_main([str(bad), "--prompt", "hi"]), "offload-run", message)


def test_bad_block_sizes_and_sampling_options(llama, tmp_path, capsys):
    for size in ("0", "7", "16", "48", "96", "256", "-128"):
        fails(capsys, quantize_main([str(llama[0]), str(tmp_path / "w"), "--block-size", size]),
              "offload-quantize", "block size must be one of 32, 64, 128")
        assert not (tmp_path / "w").exists()
    base = [str(llama[0]), str(llama[1]), "--prompt", "hi"]
    usage_error(capsys, base + ["--temperature", "-0.5"], "--temp is out of range")
    usage_error(capsys, base + ["--top-p", "0"], "--top-p is out of range")
    usage_error(capsys, base + ["--top-p", "1.5"], "--top-p is out of range")


def test_corrupt_tokenizer_is_named(llama, tmp_path, capsys):
    bad = copy(llama[1], tmp_path / "bad")
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    line = fails(capsys, run_main([str(bad), "--prompt", "hi"]), "offload-run", "is corrupt")
    assert str(bad / "tokenizer.json") in line


def test_eval_text_must_be_a_utf8_file(llama, tmp_path, capsys):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    fails(capsys, eval_main([str(llama[0]), str(llama[1]), "--text", str(binary)]), "offload-eval", "not UTF-8")
    fails(capsys, eval_main([str(llama[0]), str(llama[1]), "--text", str(tmp_path)]), "offload-eval",
          "is a directory")


def test_conv1d_models_are_refused_at_quantize_time(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, GPT2Config
    model = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(model)
    before = listing(tmp_path)
    line = fails(capsys, quantize_main([str(model), str(tmp_path / "w")]), "offload-quantize", "Conv1D")
    assert "Llama" in line and "Qwen2" in line
    assert listing(tmp_path) == before


def test_prompt_longer_than_the_context_is_refused_before_generating(llama, capsys):
    context = tiny.config("llama").max_position_embeddings
    line = fails(capsys, run_main([str(llama[0]), str(llama[1]), "--prompt", "a" * context]), "offload-run",
                 f"tokens, the context {context}")
    n_prompt = int(re.search(r"the prompt is (\d+) tokens", line).group(1))
    assert n_prompt > context and capsys.readouterr().out == ""


# 9. the manifest keeps no absolute path of the machine that made it
def test_manifest_records_the_source_name_and_hash_not_its_path(llama, tmp_path):
    twin = copy(llama[0], tmp_path / "deep" / "er" / "llama")
    out = weights.quantize_model(twin, tmp_path / "w", progress=False, method="absmax", lm_head="int4")
    text = (out / weights.MANIFEST).read_text()
    assert str(tmp_path) not in text and str(llama[0].parent) not in tiny.manifest(llama[1])["source_model"]
    m = json.loads(text)
    assert m["source_model"] == "llama"
    assert m["source_sha256"] == tiny.manifest(llama[1])["source_sha256"]  # same content, another place
    cfg = json.loads((twin / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (twin / "config.json").write_text(json.dumps(cfg))
    other = weights.quantize_model(twin, tmp_path / "w2", progress=False, method="absmax", lm_head="int4")
    assert tiny.manifest(other)["source_sha256"] != m["source_sha256"]
