"""GGUF in: tiny HF models written to GGUF here (as llama.cpp's converter writes them) convert to the same
weights as `quantize` applied to the HF weights; the demo GGUF converts with bounded memory; bad files fail
with one error line; offload-run and offload-eval take a .gguf."""
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import offload
import tiny
from offload import cli
from offload.gguf_source import GGUFSource, gguf_files
from offload.weights import WeightsDir, quantize_model

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32
PROMPT = [[5, 77, 140, 33, 200, 9]]
NEW_TOKENS = 12


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k layout for its rotary kernel: the two halves of each head interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_type(w: np.ndarray, qtype) -> gguf.GGMLQuantizationType:
    """What llama.cpp stores a tensor as: 1-D tensors (norms, biases) always F32, matrices in `qtype`."""
    return qtype if w.ndim == 2 else F32


def write_gguf(model_dir: Path, path: Path, qtype, split_max_tensors: int = 0) -> None:
    """Write the HF model in model_dir as a GGUF file, tensors in `qtype` (F32 or Q8_0), with its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[c.model_type]
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_name(model_dir.name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == Q8_0 else gguf.LlamaFileType.ALL_F32))
    # the vocab padded to the model's size, as llama.cpp does
    vocab = {i: t for t, i in tok.get_vocab().items()}
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(c.vocab_size)]
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in vocab
                           else gguf.TokenType.UNUSED) for i in range(c.vocab_size)])
    w.add_token_merges([])  # a byte-level vocab with no merged tokens
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.numpy()
        if key.endswith(("q_proj.weight", "q_proj.bias")) and arch == "llama":
            data = _permute(data, c.num_attention_heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")) and arch == "llama":
            data = _permute(data, c.num_key_value_heads)
        kind = _gguf_type(data, qtype)
        if kind != F32:
            data = gguf.quants.quantize(data, kind)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def q8_roundtrip_dir(model_dir: Path, out: Path) -> Path:
    """model_dir with every matrix replaced by its Q8_0-dequantized self: the HF weights a Q8_0 GGUF holds."""
    out.mkdir()
    state = load_file(model_dir / "model.safetensors")
    for key, t in state.items():
        if t.dim() == 2:
            q = gguf.quants.quantize(t.numpy(), Q8_0)
            state[key] = torch.from_numpy(gguf.quants.dequantize(q, Q8_0).reshape(t.shape).copy())
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _quantize(src, out):
    return quantize_model(src, out, force=True, progress=False, method="absmax", lm_head="int4")


def _tokens(weights_dir) -> list[int]:
    with offload.load(None, weights_dir, cache="full", device="cpu", dtype=torch.float32, progress=False) as engine:
        out = engine.model.generate(torch.tensor(PROMPT), attention_mask=torch.ones(1, len(PROMPT[0]), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tiny.config("llama").pad_token_id)
    return out[0, len(PROMPT[0]):].tolist()


def _stored(weights_dir) -> dict[str, list[torch.Tensor]]:
    w = WeightsDir(weights_dir)
    return dict(w.iter_read(list(w.tensors)))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [F32, Q8_0], ids=["F32", "Q8_0"])
def test_gguf_converts_like_the_hf_weights(root, kind, qtype):
    model_dir, _ = tiny.make(kind, root)
    path = root / f"{kind}-{qtype.name}.gguf"
    write_gguf(model_dir, path, qtype)
    # the HF weights that GGUF holds: exactly the model's for F32, each matrix through Q8_0 for Q8_0
    hf_dir = model_dir if qtype == F32 else q8_roundtrip_dir(model_dir, root / f"{kind}-q8-hf")
    from_hf = _quantize(hf_dir, root / f"{kind}-{qtype.name}-hf-w")
    from_gguf = _quantize(path, root / f"{kind}-{qtype.name}-w")

    want, got = _stored(from_hf), _stored(from_gguf)
    assert set(got) == set(want)
    for name in want:
        assert all(torch.equal(a, b) for a, b in zip(got[name], want[name], strict=True)), name
    assert _tokens(from_gguf) == _tokens(from_hf)

    # config and tokenizer come from the GGUF metadata
    ours = json.loads((from_gguf / "config.json").read_text())
    hf = json.loads((model_dir / "config.json").read_text())
    for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                  "eos_token_id", "pad_token_id"):
        assert ours[field] == hf[field], field
    assert ours["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"])
    text = "Hello, GGUF! <|im_start|>user\n12+3<|im_end|>"
    assert AutoTokenizer.from_pretrained(from_gguf)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]


def test_split_gguf_reads_as_one_file(root):
    model_dir, _ = tiny.make("llama", root)
    single, split_dir = root / "one.gguf", root / "split"
    split_dir.mkdir()
    write_gguf(model_dir, single, F32)
    write_gguf(model_dir, split_dir / "tiny.gguf", F32, split_max_tensors=10)
    parts = sorted(split_dir.glob("*.gguf"))
    assert len(parts) > 2 and parts[0].name.endswith("-00001-of-%05d.gguf" % len(parts))
    assert gguf_files(parts[1]) == parts and gguf_files(split_dir) == parts
    want = _stored(_quantize(single, root / "one-w"))
    got = _stored(_quantize(split_dir, root / "split-w"))
    assert set(got) == set(want)
    assert all(torch.equal(a, b) for n in want for a, b in zip(got[n], want[n], strict=True))
    parts[-1].unlink()
    with pytest.raises(offload.OffloadError, match="incomplete"):
        gguf_files(parts[0])


def _error_line(capsys, argv) -> str:
    capsys.readouterr()  # what the test itself printed so far
    assert cli.quantize_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("offload-quantize: error: "), err
    return err[0]


def test_bad_gguf_inputs_give_one_error_line(root, tmp_path, capsys):
    model_dir, _ = tiny.make("llama", root)
    good = root / "bad-base.gguf"
    write_gguf(model_dir, good, Q8_0)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"this is not a model" * 100)
    assert "is not a GGUF file" in _error_line(capsys, [str(not_gguf), str(tmp_path / "w1")])
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    assert "truncated" in _error_line(capsys, [str(truncated), str(tmp_path / "w2")])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:200])
    assert "truncated" in _error_line(capsys, [str(header_only), str(tmp_path / "w3")])
    alien = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(alien, "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "rwkv6" in _error_line(capsys, [str(alien), str(tmp_path / "w4")])
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(good.read_bytes())
    (two / "b.gguf").write_bytes(good.read_bytes())
    assert "2 GGUF models" in _error_line(capsys, [str(two), str(tmp_path / "w5")])
    assert not any(p.name.startswith(("w", ".w")) for p in tmp_path.iterdir())  # nothing half-written


def test_run_converts_a_gguf_once_into_the_cache(root, tmp_path, monkeypatch, capsys):
    model_dir, _ = tiny.make("llama", root)
    path = root / "run.gguf"
    write_gguf(model_dir, path, Q8_0)
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    argv = [str(path), "--prompt", "hi", "-n", "4", "--dtype", "float32", "--raw"]
    assert cli.run_main(argv) == 0
    first = capsys.readouterr()
    assert "converting" in first.err and "offload-eval" in first.err
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1
    assert cli.run_main(argv) == 0
    second = capsys.readouterr()
    assert "converting" not in second.err and second.out == first.out
    other = root / "run-f32.gguf"  # another file gets its own conversion
    write_gguf(model_dir, other, F32)
    assert cli.run_main([str(other)] + argv[1:]) == 0
    assert "converting" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


def test_eval_takes_the_gguf_as_reference(root):
    model_dir, _ = tiny.make("qwen2", root)
    path = root / "eval.gguf"
    write_gguf(model_dir, path, F32)
    weights = _quantize(path, root / "eval-w")
    text = "The quick brown fox jumps over the lazy dog. " * 8
    from offload.evaluate import evaluate
    kw = dict(max_tokens=64, stride=32, device="cpu", dtype=torch.float32, progress=False)
    got = evaluate(path, weights, text, **kw)
    want = evaluate(model_dir, weights, text, **kw)  # the F32 GGUF holds the HF model's weights exactly
    for field in ("reference_ppl", "ppl", "kl_mean", "top1_agreement"):
        assert got[field] == pytest.approx(want[field], rel=1e-5), field


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_demo_gguf_converts_with_bounded_memory(tmp_path):
    """The demo GGUF, converted in a fresh process: its peak RSS stays under 3x the largest tensor in float32 +
    the unquantized tensors as stored + 1 GiB (what a 32B model's conversion needs too, not the file size)."""
    from offload.demo import gguf_path
    src = gguf_path()
    out = tmp_path / "w"
    # VmHWM: the peak of this process's own memory (ru_maxrss would carry the parent's peak over a vfork + exec)
    code = ("import re, sys; from offload.weights import quantize_model; "
            "quantize_model(sys.argv[1], sys.argv[2], progress=False); "
            "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) * 1024)")
    run = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])
    largest = max(t.n_elements for t in GGUFSource(src).gguf_tensors.values() for t in [t[1]]) * 4
    w = WeightsDir(out)
    unquantized = sum(t.numel() * t.element_size() for n, info in w.tensors.items() if info.role != "linear"
                      for t in w.read(n))
    bound = 3 * largest + unquantized + (1 << 30)
    print(f"\ndemo GGUF {src.name} ({src.stat().st_size / 2**20:.1f} MiB): peak RSS {peak / 2**20:.0f} MiB, "
          f"bound {bound / 2**20:.0f} MiB (largest tensor {largest / 2**20:.1f} MiB fp32, "
          f"unquantized {unquantized / 2**20:.1f} MiB)")
    assert peak < bound
