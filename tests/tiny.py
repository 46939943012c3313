"""Tiny random HF models with a byte-level tokenizer, saved and quantized for the tests."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from offload import check, quant
from offload.weights import WeightsDir, quantize_model

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def config(kind: str):
    # Large init so greedy decoding of a random model does not collapse onto one token.
    common = dict(vocab_size=260, num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, eos_token_id=256, pad_token_id=257)
    if kind == "llama":  # tied embeddings; hidden 192 is not a multiple of the 128 block
        return LlamaConfig(hidden_size=192, intermediate_size=320, num_attention_heads=6,
                           tie_word_embeddings=True, **common)
    if kind == "qwen2":  # q/k/v biases, as the DeepSeek-R1-Distill-Qwen family
        return Qwen2Config(hidden_size=256, intermediate_size=384, num_attention_heads=4,
                           tie_word_embeddings=False, **common)
    raise ValueError(kind)


def make(kind: str, root: Path) -> tuple[Path, Path]:
    """Save a tiny random `kind` model to root/kind and quantize it to root/kind-w."""
    model_dir, weights_dir = root / kind, root / f"{kind}-w"
    if not (weights_dir / "offload.json").exists():
        torch.manual_seed({"llama": 1, "qwen2": 2}[kind])
        model = AutoModelForCausalLM.from_config(config(kind))
        model.save_pretrained(model_dir)
        tok = byte_tokenizer()
        tok.save_pretrained(model_dir)
        # absmax and an int4 lm_head: every linear streamed, as `reference_model` rebuilds them
        quantize_model(model_dir, weights_dir, force=True, progress=False, method="absmax", lm_head="int4")
    return model_dir, weights_dir


def reference_model(model_dir: Path, device="cpu", block_size: int = quant.BLOCK_SIZE):
    """The same HF model with every linear weight replaced by dequantize(quantize(w, block_size)) and every other
    tensor (embeddings, norms, biases) rounded as the weights dir stores them: what the engine must match."""
    return check.reference_model(model_dir, device, block_size)


def stored_model(model_dir: Path, weights_dir: Path):
    """The HF model (fp32) with every tensor read back from the weights dir and dequantized as its manifest says
    (int4, int8 or bf16 linears at the dir's block size): whatever method made the dir, what the engine must match."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = WeightsDir(weights_dir)
    state = {}
    for name, info in weights.tensors.items():
        stored = weights.read(name)
        if info.role == "linear" and info.quant == "int4":
            assert stored[1].shape[1] * weights.block_size == stored[0].shape[1] * 2  # [N, Kp / block]
            state[name] = quant.dequantize(*stored, info.shape)
        elif info.role == "linear" and info.quant == "int8":
            assert stored[1].shape[1] * weights.block_size == stored[0].shape[1]
            state[name] = quant.dequantize_int8(*stored, info.shape[1])
        else:
            state[name] = stored[0].float()
    if model.config.tie_word_embeddings:  # lm_head has its own stored copy
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    model.load_state_dict(state, strict=True)
    return model.eval()


def manifest(weights_dir: Path) -> dict:
    return json.loads((weights_dir / "offload.json").read_text())
