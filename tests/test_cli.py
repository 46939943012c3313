import fcntl
import importlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import termios
import time
import tomllib
from pathlib import Path

import pytest
import torch
from transformers.generation.utils import GenerationMixin

from offload import quant
from offload.cli import CHAT_HINT, eval_main, quantize_main, run_main, stats_summary
from offload.units import fmt_bytes, parse_size

import tiny


def run(main, argv) -> int:
    """Exit status of a console entry point, whether it returns or argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generate_calls(monkeypatch):
    """Every HF generate call: its kwargs, and the token ids it returned."""
    calls = []
    original = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append({**kwargs, "output": out})
        return out

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    return calls


def chat_ids(messages) -> list[int]:
    """The token ids of a conversation through the tiny tokenizer's chat template, ready for the reply."""
    return tiny.byte_tokenizer().apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


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


def test_bad_inputs_give_one_line_and_nonzero_exit(models, tmp_path, capsys, keep_threads):
    (llama, llama_w), (qwen, _) = models["llama"], models["qwen2"]
    hi = {"role": "user", "content": "hi there, model"}
    cases = [
        ([str(llama), str(tmp_path / "missing")], "does not exist"),
        ([str(qwen), str(llama_w)], "does not match the config"),
        ([str(llama), str(llama_w), "--cache", "1B"], "smaller than one entry"),
        ([str(llama), str(llama_w), "--cache", "0"], "smaller than one entry"),
        ([str(llama), str(llama_w), "--policy", "fifo"], "invalid choice: 'fifo'"),
        ([str(llama), str(llama_w), "--cache", "12XB"], "cannot parse size"),
        ([str(llama), str(llama_w), "--cache-format", "fp8"], "invalid choice: 'fp8'"),
        ([str(llama), str(llama_w), "--dtype", "fp8"], "invalid choice"),
        ([str(llama), str(llama_w), "--device", "tpu"], "device"),
        ([str(llama), str(llama_w), "-t", "0"], "must be at least 1"),
        ([str(llama), str(llama_w), "-c", "513"], "ctx_size 513 is longer than the model's context (512 tokens)"),
        ([str(llama), str(llama_w), "-c", "20"], f"the prompt is {len(chat_ids([hi]))} tokens, the context 20 "
                                                 "(-c/--ctx-size)"),
        ([str(llama), str(llama_w), "--raw", "--system", "x"], "--system needs the chat template"),
        ([str(llama), str(llama_w), "--top-p", "0"], "--top-p is out of range"),
    ]
    for argv, message in cases:
        line = one_error_line(capsys, run(run_main, argv + ["--prompt", "hi there, model"]))
        assert line.startswith("offload-run: error:") and message in line, (argv, line)
    line = one_error_line(capsys, run(run_main, [str(llama), str(llama_w), "-f", str(tmp_path / "nope.txt")]))
    assert line == f"offload-run: error: prompt file {tmp_path / 'nope.txt'} does not exist"
    line = one_error_line(capsys, run(run_main, [str(llama), "-p", "x", "-f", "y"]))
    assert line == "offload-run: error: give --prompt or --file, not both"

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


def test_quantize_then_run_with_stats(models, tmp_path, capsys, keep_threads):
    llama, _ = models["llama"]
    assert quantize_main([str(llama), str(tmp_path / "w")]) == 0
    stats_file = tmp_path / "stats.json"
    rc = run_main([str(llama), str(tmp_path / "w"), "--prompt", "1.1+2.3=?", "--max-new-tokens", "8",
                   "--cache", "50%", "--stats", "--stats-json", str(stats_file), "--seed", "3",
                   "--temperature", "0.7", "--top-p", "0.9", "-t", "1", "--emulate-copies"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip()
    s = json.loads(stats_file.read_text())
    assert s["decode_tokens"] == 7 and s["cache_misses"] > 0 and s["h2d_bytes_per_token"] > 0
    assert s["threads"] == 1 == torch.get_num_threads()
    lines = err.splitlines()
    assert sum(line.startswith("memory plan:") for line in lines) == 1  # once, at start
    summary = [
        f"prefill: {s['prefill_tokens']} tokens, {s['prefill_tokens_per_s']:.2f} tokens/s",
        f"decode:  7 tokens, {s['decode_tokens_per_s']:.2f} tokens/s (1 threads)",
        f"cache:   {s['cache_hits']} hits, {s['cache_misses']} misses ({100 * s['hit_rate']:.1f}% hit), "
        f"{fmt_bytes(s['h2d_bytes_per_token'])} copied per decoded token, {s['prefetch_waits']} prefetch waits",
        f"memory:  cache budget {fmt_bytes(s['cache_budget_bytes'])}, resident {fmt_bytes(s['resident_bytes'])}, "
        f"model {fmt_bytes(s['model_bytes'])}, host store {fmt_bytes(s['host_bytes'])}, "
        f"process RSS {fmt_bytes(s['rss_bytes'])} (peak {fmt_bytes(s['peak_rss_bytes'])})",
    ]
    assert lines[-4:] == summary
    assert lines[-5] == "[reply cut at 8 tokens: -n/--max-new-tokens allows more]"
    assert s["peak_rss_bytes"] >= s["rss_bytes"] > s["host_bytes"]


def test_quantize_with_the_defaults_then_run_gives_the_tokens_of_the_stored_weights(models, tmp_path, capsys,
                                                                                     generate_calls, keep_threads):
    # the defaults (awq+gptq, int8 output projection); the reference is the HF model holding the weights
    # dir's own tensors dequantized in float32, whatever the method chose
    llama, _ = models["llama"]
    assert quantize_main([str(llama), str(tmp_path / "w")]) == 0
    m = tiny.manifest(tmp_path / "w")
    assert m["block_size"] == quant.BLOCK_SIZE and m["tensors"]["lm_head.weight"]["quant"] == "int8"
    assert m["method"] == "awq+gptq"
    assert run_main([str(llama), str(tmp_path / "w"), "-p", "1.1+2.3=?", "--raw", "-n", "16", "--temp", "0",
                     "--dtype", "float32", "-t", "1"]) == 0
    (call,) = generate_calls
    ids, got = call["input_ids"], call["output"]
    expected = tiny.stored_model(llama, tmp_path / "w").generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=257)
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 3, "degenerate reference: the test would prove little"
    assert torch.equal(got, expected)


def test_summary_on_cpu_leaves_out_copies_when_nothing_streams(models, tmp_path, capsys):
    llama, llama_w = models["llama"]
    stats_file = tmp_path / "stats.json"
    assert run_main([str(llama), str(llama_w), "-p", "hi", "-n", "4", "--cache", "full", "--stats",
                     "--stats-json", str(stats_file), "--emulate-copies"]) == 0
    err = capsys.readouterr().err
    s = json.loads(stats_file.read_text())
    assert s["h2d_bytes_per_token"] == 0 and not s["zero_copy"]
    cache_line = next(line for line in err.splitlines() if line.startswith("cache:"))
    assert cache_line == f"cache:   {s['cache_hits']} hits, {s['cache_misses']} misses ({100 * s['hit_rate']:.1f}% hit)"
    # the default on cpu reads the weights in place at any budget: no cache figures at all
    assert run_main([str(llama), str(llama_w), "-p", "hi", "-n", "4", "--cache", "25%", "--stats",
                     "--stats-json", str(stats_file)]) == 0
    err = capsys.readouterr().err
    assert json.loads(stats_file.read_text())["zero_copy"]
    assert "weights: read in place from host RAM (zero-copy on cpu)" in err.splitlines()
    assert not any("cache budget" in line for line in err.splitlines() if line.startswith("memory:"))
    assert not any(line.startswith("cache:") for line in err.splitlines())
    assert sum(line.startswith("memory plan: zero-copy on cpu") for line in err.splitlines()) == 1
    assert "peak device" not in err and " MB" not in err and " GB" not in err
    # on cuda the device peak replaces the process RSS
    gpu = stats_summary({**s, "device": "cuda:0", "peak_device_bytes": 3 << 29})
    assert gpu.splitlines()[-1].endswith(", peak device 1.50 GiB") and "RSS" not in gpu and "threads" not in gpu


def test_sizes_read_binary_letters_like_docker():
    table = {"1G": 2**30, "500M": 500 * 2**20, "64k": 64 * 2**10, "2T": 2 * 2**40, "1.5g": 3 * 2**29,
             "1GiB": 2**30, "500MiB": 500 * 2**20, "1GB": 10**9, "12MB": 12 * 10**6, "65536B": 65536, "7": 7}
    assert {text: parse_size(text) for text in table} == table
    for bad in ("12XB", "G", "-1G", "1 G B", ""):
        with pytest.raises(Exception, match="cannot parse size"):
            parse_size(bad)
    assert [fmt_bytes(n) for n in (1000, 1536, 5 * 2**20, 3 * 2**30)] == ["1000 B", "1.50 KiB", "5.00 MiB",
                                                                           "3.00 GiB"]


def test_cache_size_with_a_letter_reaches_the_budget(models, tmp_path, capsys):
    llama, llama_w = models["llama"]
    stats_file = tmp_path / "stats.json"
    assert run_main([str(llama), str(llama_w), "-p", "hi", "-n", "2", "--cache", "256K",
                     "--stats-json", str(stats_file)]) == 0
    assert json.loads(stats_file.read_text())["cache_budget_bytes"] == 256 * 1024


def test_version_is_the_package_version(capsys):
    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    for main, prog in ((run_main, "offload-run"), (quantize_main, "offload-quantize")):
        assert run(main, ["--version"]) == 0
        assert capsys.readouterr().out == f"{prog} {version}\n"


def test_threads_default_to_physical_cores(models, monkeypatch, keep_threads):
    import offload
    from offload import engine
    llama, llama_w = models["llama"]
    monkeypatch.setattr(engine.psutil, "cpu_count", lambda logical=True: 1 if not logical else 4)
    offload.load(llama, llama_w, progress=False).close()
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(engine.psutil, "cpu_count", lambda logical=True: None)  # unknown: every logical cpu
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 3)
    with offload.load(llama, llama_w, threads=None, progress=False) as e:
        assert torch.get_num_threads() == 3 == e.stats["threads"]
        assert e.dtype == torch.bfloat16  # the fast path is the default on cpu too
    offload.load(llama, llama_w, threads=2, progress=False).close()
    assert torch.get_num_threads() == 2


def test_sampling_flags_reach_generate(models, capsys, generate_calls):
    llama, llama_w = models["llama"]
    assert run_main([str(llama), str(llama_w), "-p", "hi", "-n", "3", "--temp", "0.7", "--top-k", "5",
                     "--top-p", "0.9", "--min-p", "0.05", "--repeat-penalty", "1.3", "-s", "1"]) == 0
    (call,) = generate_calls
    assert {k: call[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                                 "repetition_penalty")} == {
        "max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
        "repetition_penalty": 1.3}


def test_sampling_flags_change_the_reply(models, capsys):
    llama, llama_w = models["llama"]

    def reply(*flags):
        # float32 logits: bf16 ones tie now and then on this random model, and top-k keeps every tied token
        assert run_main([str(llama), str(llama_w), "-p", "hello", "-n", "40", "--dtype", "float32", *flags]) == 0
        return capsys.readouterr().out

    greedy = reply()
    assert reply("--temp", "5", "--top-k", "1", "-s", "1") == greedy  # top-1 sampling is greedy
    assert reply("--temp", "5", "-s", "1") != greedy
    assert reply("--repeat-penalty", "1.5") != greedy


def test_prompt_goes_through_the_chat_template_unless_raw(models, tmp_path, capsys, generate_calls):
    llama, llama_w = models["llama"]
    tok = tiny.byte_tokenizer()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("from a file")
    for flags in (["-p", "hi"], ["-p", "hi", "--system", "be brief"], ["-p", "hi", "--raw"], ["-f", str(prompt)]):
        assert run_main([str(llama), str(llama_w), "-n", "2", *flags]) == 0
    got = [call["input_ids"][0].tolist() for call in generate_calls]
    assert got == [chat_ids([{"role": "user", "content": "hi"}]),
                   chat_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
                   tok("hi")["input_ids"],
                   chat_ids([{"role": "user", "content": "from a file"}])]


def test_chat_keeps_history_and_commands_never_reach_the_model(models, monkeypatch, capsys, generate_calls):
    llama, llama_w = models["llama"]
    tok = tiny.byte_tokenizer()
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/help\nsecond\n/bogus\n/clear\nthird\n/exit\nnot read\n"))
    assert run_main([str(llama), str(llama_w), "-n", "6", "--system", "be brief"]) == 0
    out, err = capsys.readouterr()
    assert CHAT_HINT in err.splitlines() and "/clear   forget the conversation" in err
    assert "unknown command /bogus: /help lists them" in err and "[conversation cleared]" in err
    system = {"role": "system", "content": "be brief"}
    reply1 = tok.decode(generate_calls[0]["output"][0, len(generate_calls[0]["input_ids"][0]):],
                        skip_special_tokens=True)
    turns = [[system, {"role": "user", "content": "hello"}],
             [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": reply1},
              {"role": "user", "content": "second"}],
             [system, {"role": "user", "content": "third"}]]  # after /clear: the system prompt only
    assert [c["input_ids"][0].tolist() for c in generate_calls] == [
        chat_ids(t) for t in turns]


def test_demo_chat_opens_the_interactive_chat(models, monkeypatch, capsys, generate_calls):
    from offload import demo
    llama, llama_w = models["llama"]
    monkeypatch.setattr(demo, "prepare", lambda progress=True: (llama, llama_w))
    monkeypatch.setattr("sys.stdin", io.StringIO("my own question\n"))
    assert run_main(["--demo", "--chat", "-n", "2"]) == 0
    err = capsys.readouterr().err
    assert CHAT_HINT in err.splitlines()
    (call,) = generate_calls
    assert call["input_ids"][0].tolist() == chat_ids(
        [{"role": "user", "content": "my own question"}])


def test_reply_cut_by_the_context_says_so(models, capsys, generate_calls):
    llama, llama_w = models["llama"]
    # float32: with the bf16 kernels this random model ends its reply (EOS) before the context is full
    assert run_main([str(llama), str(llama_w), "-p", "hi", "-n", "100", "-c", "30", "--dtype", "float32"]) == 0
    (call,) = generate_calls
    assert len(call["input_ids"][0]) + call["max_new_tokens"] == 30
    assert capsys.readouterr().err.splitlines()[-1] == (
        "[reply cut at the end of the 30-token context: -c/--ctx-size]")


def test_eval_defaults_to_bfloat16_and_takes_threads(models, tmp_path, monkeypatch, keep_threads):
    evaluate = importlib.import_module("offload.evaluate")  # the module (offload.evaluate is also the function)
    llama, llama_w = models["llama"]
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(evaluate, "summary", lambda r: "")
    (tmp_path / "t.txt").write_text("text")
    assert eval_main([str(llama), str(llama_w), "--text", str(tmp_path / "t.txt"), "-t", "1"]) == 0
    assert seen["dtype"] == "bfloat16" and seen["threads"] == 1


def spawn_in_pty(argv):
    """offload-run with a pseudo-terminal as its controlling terminal (so ^C is a SIGINT): (process, master fd)."""
    master, slave = os.openpty()
    code = "import sys; from offload.cli import run_main; sys.exit(run_main())"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    return proc, master


class Terminal:
    def __init__(self, master):
        self.master, self.text = master, b""

    def wait_for(self, done, timeout=180):
        end = time.time() + timeout
        while not done(self.text):
            assert time.time() < end, f"timed out; the terminal shows {self.text!r}"
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the other side closed
                    chunk = b""
                assert chunk, f"the program ended; the terminal shows {self.text!r}"
                self.text += chunk

    def wait_for_exit(self, proc, timeout=120) -> int:
        """Read what is left until the program closes the terminal; its exit status."""
        end = time.time() + timeout
        while proc.poll() is None or select.select([self.master], [], [], 0)[0]:
            assert time.time() < end, f"the program did not end; the terminal shows {self.text!r}"
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self.text += chunk
        return proc.wait(timeout)

    def settle(self, quiet=1.0):
        """Read until the program has written nothing for `quiet` seconds (a reply of random bytes may
        itself contain what a prompt looks like)."""
        while select.select([self.master], [], [], quiet)[0]:
            self.text += os.read(self.master, 4096)

    def type(self, data: bytes):
        os.write(self.master, data)


def test_chat_in_a_terminal_ctrl_c_stops_the_reply_and_the_chat_goes_on(models, tmp_path, monkeypatch):
    llama, llama_w = models["llama"]
    # PyTorch's cpu int4 op (slower than the native kernel): the tiny model's reply must still be running when
    # the Ctrl-C arrives
    monkeypatch.setenv("OFFLOAD_CPU_KERNEL", "torch")
    stats_file = tmp_path / "stats.json"
    # the greedy reply to this turn runs past 400 tokens, so the Ctrl-C below lands in the middle of it
    proc, master = spawn_in_pty([str(llama), str(llama_w), "-n", "400", "--system", "be brief",
                                 "--stats-json", str(stats_file)])
    term = Terminal(master)
    try:
        term.wait_for(lambda t: t.endswith(b"\n> "))
        assert CHAT_HINT.encode() in term.text
        term.type(b"hello\n")
        start = len(term.text)
        term.wait_for(lambda t: len(t) > start + 40)  # the reply is being written
        term.type(b"typed ahead\n")
        time.sleep(0.02)
        term.type(b"\x03")
        term.wait_for(lambda t: t.endswith(b"[reply stopped]\r\n> "))
        start = len(term.text)
        term.type(b"second\n")
        term.wait_for(lambda t: t.endswith(b"\n> ") and len(t) > start + len("second\r\n") + 2)
        term.settle()
        assert term.text.endswith(b"\n> ")
        term.type(b"\x03")  # at the prompt: quits
        assert term.wait_for_exit(proc) == 0, term.text
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"typed ahead" not in term.text and b"Traceback" not in term.text
    assert term.text.count(b"[reply stopped]") == 1
    # the second turn's prompt held the first turn and its partial reply
    tok, system = tiny.byte_tokenizer(), {"role": "system", "content": "be brief"}
    first = chat_ids([system, {"role": "user", "content": "hello"}])
    second = chat_ids([system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": ""},
                                      {"role": "user", "content": "second"}])
    stats = json.loads(stats_file.read_text())
    assert stats["prefill_tokens"] > len(first) + len(second)  # + the partial reply, at least one token
    assert stats["decode_tokens"] < 400 - 1 + 400 - 1  # the first reply stopped early


def test_interactive_chat_reads_turns_until_eof(models, monkeypatch, capsys):
    llama, llama_w = models["llama"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nsecond turn\n"))
    rc = run_main([str(llama), str(llama_w), "--chat", "--max-new-tokens", "5", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # two streamed replies, each the plain HF model's greedy reply to the conversation so far (the empty line is
    # skipped, the first reply is in the second turn's prompt)
    ref, tok = tiny.reference_model(llama), tiny.byte_tokenizer()
    history, want = [], []
    for turn in ("hello", "second turn"):
        history.append({"role": "user", "content": turn})
        ids = torch.tensor([chat_ids(history)])
        new = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        reply = tok.decode(new, skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        want.append(reply)
    assert out == "".join(f"{reply}\n" for reply in want)


def test_demo_model_knows_the_capital_of_france(tmp_path_factory, monkeypatch, capsys):
    from offload import demo
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path_factory.mktemp("offload-cache")))
    model_dir, weights_dir = demo.prepare(progress=False)
    rc = run_main([str(model_dir), str(weights_dir), "--prompt", "What is the capital of France?",
                   "--cache", "25%", "--max-new-tokens", "16", "--stats"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Paris" in out
    assert "zero-copy on cpu" in err and "decode:" in err


def test_demo_quantizes_again_when_cached_weights_are_outdated(tmp_path, monkeypatch):
    # A demo cached by an older offload (other method, head precision or format) is not run as is.
    import json
    from offload import demo, weights
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    root = tmp_path / "smollm2-135m-instruct"
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "config.json").write_text("{}")  # converted already
    calls = []
    monkeypatch.setattr(demo, "quantize_model", lambda model_dir, weights_dir, **kw: calls.append(weights_dir))
    manifest = root / "weights" / weights.MANIFEST
    manifest.parent.mkdir()
    current = {"format_version": weights.FORMAT_VERSION, "method": "awq+gptq", "block_size": quant.BLOCK_SIZE,
               "lm_head": weights.DEFAULT_LM_HEAD, "model_type": "llama"}  # what `auto` makes of the demo (a Llama)
    for text, quantized in [(json.dumps(current), False), (json.dumps({**current, "method": "absmax"}), True),
                            (json.dumps({k: v for k, v in current.items() if k != "lm_head"}), True),
                            ("{damaged", True)]:
        manifest.write_text(text)
        calls.clear()
        assert demo.prepare(progress=False) == (root / "hf", root / "weights")
        assert calls == ([root / "weights"] if quantized else []), text
