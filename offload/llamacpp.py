"""A GGUF file scored by llama.cpp (through llama-cpp-python, an optional dependency): the logits of
every position of a window of token ids, for `offload-eval --compare-gguf`.

The ids are offload's (the HF tokenizer's), fed as they are, with no BOS added: the GGUF must have the
same vocabulary, which is checked (same size, and the same text for the ids of the evaluated text).
"""
from pathlib import Path

import numpy as np
import torch

from .errors import OffloadError


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


class LlamaCppScorer:
    """llama.cpp's logits for windows of up to `n_ctx` token ids, on the cpu with `threads` threads."""

    def __init__(self, path, n_ctx: int, threads: int):
        try:
            import llama_cpp
        except ImportError:
            raise OffloadError("--compare-gguf needs llama-cpp-python: pip install llama-cpp-python") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise OffloadError(f"--compare-gguf {self.path} is not a file")
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise OffloadError(f"llama.cpp cannot load {self.path}: {e}") from None
        self.n_ctx = n_ctx

    def check_vocab(self, vocab_size: int, ids: list[int], text: str) -> None:
        """Refuse a GGUF whose vocabulary differs from the model's: another size, or other text for `ids`
        (the evaluated text's ids, whose HF decoding is `text`)."""
        if self.llm.n_vocab() != vocab_size:
            raise OffloadError(f"{self.path.name} has a vocabulary of {self.llm.n_vocab()} tokens, the model "
                               f"{vocab_size}: its token ids mean other tokens")
        if self.llm.detokenize(ids).decode("utf-8", errors="replace") != text:
            raise OffloadError(f"{self.path.name} decodes the text's token ids into another text: its vocabulary "
                               "is not the model's")

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Token ids [L] (L <= n_ctx) -> float32 logits [L, V], position i predicting token i + 1."""
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))
