"""offload-serve, started by the test on 127.0.0.1 and a free port, driven by the official openai client;
every answer is checked against engine.generate on the same model in this process."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

import offload

import tiny

openai = pytest.importorskip("openai")

SERVE = [sys.executable, "-c", "import sys; from offload.serve import main; sys.exit(main())"]
SYSTEM = {"role": "system", "content": "You are terse."}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """offload-serve in a child process, for one `with` block."""

    def __init__(self, model_dir, weights_dir, log: Path, *extra, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.args = [*SERVE, str(model_dir), str(weights_dir), "--port", str(self.port), "--dtype", "float32",
                     "-t", "1", *extra]
        self.env = {**os.environ, **(env or {})}

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"offload-serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"offload-serve did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGINT, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"offload-serve ignored signal {sig}:\n{self.output()}") from None
        return self.proc.returncode

    def __exit__(self, *exc):
        self.stop()
        self.log.close()

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=kw.pop("timeout", 300), **kw)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=30).json()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny.make("llama", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(models):
    with offload.load(*models, dtype=torch.float32, threads=1, progress=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    with Server(*models, tmp_path_factory.mktemp("serve") / "server.log") as server:
        yield server


def reference(engine, prompt, new, **kw) -> tuple[str, list[int]]:
    """engine.generate's greedy text and its new token ids."""
    with engine.generate(prompt, max_new_tokens=new, stream=True, **kw) as stream:
        text = "".join(stream)
    assert text == engine.generate(prompt, max_new_tokens=new, **kw)
    return text, stream.output_ids


def finish(engine, ids, new) -> str:
    return "length" if len(ids) == new and ids[-1] != engine.tokenizer.eos_token_id else "stop"


def test_chat_completions_equal_engine_generate(server, engine):
    chat = [SYSTEM, {"role": "user", "content": "Name a colour."}]
    text, ids = reference(engine, chat, 24)
    n_prompt = engine.encode(chat)["input_ids"].shape[1]
    client = server.client()

    r = client.chat.completions.create(model="any", messages=chat, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish(engine, ids, 24)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt, len(ids), n_prompt + len(ids))

    chunks = list(client.chat.completions.create(model="any", messages=chat, max_completion_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        finish(engine, ids, 24)]
    assert chunks[-1].usage.completion_tokens == len(ids) and chunks[-1].usage.prompt_tokens == n_prompt


def test_completions_equal_engine_generate(server, engine):
    prompt = "The quick brown fox"
    text, ids = reference(engine, prompt, 30)
    client = server.client()
    r = client.completions.create(model="any", prompt=prompt, max_tokens=30, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish(engine, ids, 30)
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == engine.encode(prompt)["input_ids"].shape[1]
    chunks = list(client.completions.create(model="any", prompt=prompt, max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text


def test_stop_sequences_cut_the_reply(server, engine):
    prompt = "The quick brown fox"
    text, _ = reference(engine, prompt, 60, min_new_tokens=60)
    stop = next(c for c in text[3:] if c.isascii() and c.isalnum())
    client = server.client()
    r = client.completions.create(model="any", prompt=prompt, max_tokens=60, temperature=0, stop=[stop, "\x00zz"],
                                  extra_body={"min_tokens": 60})
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="any", prompt=prompt, max_tokens=60, temperature=0, stop=stop,
                                            stream=True, extra_body={"min_tokens": 60}))
    assert "".join(c.choices[0].text for c in chunks) == text[:text.index(stop)]


def test_sampling_with_a_seed_is_repeatable(server):
    client = server.client()
    kw = dict(model="any", prompt="hello", max_tokens=16, temperature=1.2, top_p=0.9, seed=5)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["llama"]  # the model dir's name
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in response.text
    return body["error"]


def test_invalid_requests_get_openai_400s(server, engine):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    url = f"{server.url}/v1/chat/completions"
    cases = [({"max_tokens": 4}, "messages"), ({"messages": []}, "messages"),
             ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
             ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
             ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
             ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
              "messages")]
    for body, param in cases:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert param in error_of(r)["message"]
    r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and error_of(r)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["a", "b"]}, timeout=60)
    assert r.status_code == 400 and "one prompt" in error_of(r)["message"]
    # unknown fields are ignored
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
                              "frobnicate": {"x": 1}, "user": "me"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_too_long_prompt_is_a_400_naming_both_lengths(server, engine):
    prompt = "word " * 120  # the byte tokenizer: 600 tokens, the context is 512
    n = engine.encode(prompt)["input_ids"].shape[1]
    assert n > engine.ctx_size
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="any", prompt=prompt, max_tokens=4)
    assert str(n) in e.value.message and str(engine.ctx_size) in e.value.message
    short = "word " * 100  # fits, but not with 100 more tokens
    n = engine.encode(short)["input_ids"].shape[1]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="any", prompt=short, max_tokens=100)
    assert str(n) in e.value.message and str(engine.ctx_size) in e.value.message and "100" in e.value.message


def test_disconnect_mid_stream_stops_the_generation(server, engine):
    chat = [{"role": "user", "content": "Tell me a long story."}]
    new = 450  # min_tokens: without the disconnect it would generate all of them
    before = server.stats()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"messages": chat, "max_tokens": new, "min_tokens": new, "temperature": 0,
                            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the first chunk
        deadline = time.time() + 60
        while server.stats()["engine"]["decode_tokens"] - before["engine"]["decode_tokens"] < 5:
            assert time.time() < deadline, "the generation did not start"
            time.sleep(0.01)
        at_close = server.stats()["engine"]["decode_tokens"]
    deadline = time.time() + 60
    while server.stats()["running"]:
        assert time.time() < deadline, "the generation did not stop"
        time.sleep(0.05)
    after = server.stats()
    generated = after["completion_tokens"] - before["completion_tokens"]
    late = after["engine"]["decode_tokens"] - at_close
    print(f"disconnect: {generated} of {new} tokens generated, {late} after the client closed")
    assert generated < new // 2
    # a non-streamed request whose client gives up is stopped too (0.2 s: the tiny model makes 450 tokens in
    # well under a second with the native cpu kernel)
    before = server.stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=0.2),
                   json={"messages": chat, "max_tokens": new, "min_tokens": new, "temperature": 0})
    deadline = time.time() + 60
    while server.stats()["running"] or server.stats()["requests"] == before["requests"]:
        assert time.time() < deadline, "the generation did not stop"
        time.sleep(0.05)
    generated = server.stats()["completion_tokens"] - before["completion_tokens"]
    print(f"non-streamed disconnect: {generated} of {new} tokens generated")
    assert generated < new  # stopped before min_tokens: how many came first depends on the machine's speed
    # the next request is answered, and correctly
    text, _ = reference(engine, chat, 12)
    r = server.client().chat.completions.create(model="any", messages=chat, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == text


def test_16_concurrent_clients_get_their_own_answers(server, engine):
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(16)]
    expected = [engine.generate(p, max_new_tokens=16) for p in prompts]
    assert len(set(expected)) > 8, "the prompts should give different answers"
    client = server.client()
    ask = lambda i: client.chat.completions.create(model="any", messages=prompts[i], max_tokens=16, temperature=0,
                                                   stream=bool(i % 2))
    ask(0)  # warm
    proc = psutil.Process(server.proc.pid)
    rss_before = proc.memory_info().rss

    def run(i):
        r = ask(i)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, range(16)))
    elapsed = time.time() - t0
    rss_after = proc.memory_info().rss
    print(f"16 clients: {elapsed:.1f} s, server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert got == expected
    assert elapsed < 240
    assert abs(rss_after - rss_before) <= 0.1 * rss_before


def test_api_key_and_clean_shutdown(models, engine, tmp_path):
    with Server(*models, tmp_path / "auth.log", env={"OFFLOAD_API_KEY": "s3cret"}) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cre"}):
            r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        chat = [{"role": "user", "content": "hi"}]
        text, _ = reference(engine, chat, 8)
        r = server.client(api_key="s3cret").chat.completions.create(model="x", messages=chat, max_tokens=8,
                                                                    temperature=0)
        assert r.choices[0].message.content == text
        # SIGTERM while a long reply streams: the reply ends, the engine is closed, the process exits
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          headers={"Authorization": "Bearer s3cret"},
                          json={"prompt": "hi", "max_tokens": 450, "min_tokens": 450, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            t0 = time.time()
            code = server.stop(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
        assert time.time() - t0 < 30
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"
        assert code in (0, -signal.SIGTERM)
        log = server.output()
        assert "engine closed" in log and "Traceback" not in log


def test_bad_command_lines_fail_in_one_line(models, tmp_path):
    def run(*args, env=None):
        return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **(env or {})})
    r = run()
    assert r.returncode == 2 and "give model_dir" in r.stderr
    r = run(str(models[0]), "--port", "70000")
    assert r.returncode == 2 and "not a TCP port" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run(*map(str, models), "--port", str(busy.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr
    r = run(str(tmp_path), "--port", str(free_port()))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr

