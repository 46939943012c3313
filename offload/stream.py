"""A generation that runs in a thread and hands its text out piece by piece: what
`engine.generate(..., stream=True)` returns, for the server and notebooks."""
import threading

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


class StopFlag(StoppingCriteria):
    """Ends a generation at the next token once set (from any thread)."""

    def __init__(self):
        self.fired = False

    def set(self) -> None:
        self.fired = True

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class TextStream:
    """Iterate it for the text pieces of one reply as they are decoded (special tokens left out).

    The generation runs in its own thread; an exception there is raised by the iteration that would have
    gone on. Once the iteration has ended, `output_ids` holds the new token ids and `prompt_tokens` the
    prompt's length. `stop()` ends the generation at the next token without waiting, `close()` (or leaving
    a `with` block) ends it and waits for the thread.
    """

    def __init__(self, run, kwargs: dict, tokenizer):
        """run(kwargs) -> the token ids [1, prompt + new] (the engine's locked HF generate)."""
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._flag = StopFlag()
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(self._flag)
        self.prompt_tokens = kwargs["input_ids"].shape[1]
        self.output_ids = None
        self._error = None
        self._done = False
        self._thread = threading.Thread(target=self._work, name="offload-generate", daemon=True,
                                        args=(run, {**kwargs, "streamer": self._streamer, "stopping_criteria": criteria}))
        self._thread.start()

    def _work(self, run, kwargs) -> None:
        try:
            out = run(kwargs)
            self.output_ids = out[0, self.prompt_tokens:].tolist()
        except BaseException as e:  # handed to the consumer, who sees it on its next piece
            self._error = e
            self._streamer.text_queue.put(self._streamer.stop_signal)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while not self._done:
            try:
                piece = next(self._streamer)
            except StopIteration:
                self._done = True
                break
            if piece:
                return piece
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopIteration

    @property
    def stopped(self) -> bool:
        """Whether `stop()` / `close()` ended the generation."""
        return self._flag.fired

    def stop(self) -> None:
        self._flag.set()

    def close(self) -> None:
        self._flag.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
