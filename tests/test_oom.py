"""A device out-of-memory error, simulated on cpu, becomes one line suggesting a smaller cache, in a
forward pass and in the prefetch thread; the engine keeps working after replan."""
import pytest
import torch

import offload
from offload.errors import OffloadError
from offload.units import parse_size

import tiny
from test_engine import greedy, prompt_ids

OOM = "CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 23.64 GiB"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny.make("llama", tmp_path_factory.mktemp("oom"))


def suggested(message):
    return parse_size(message.split("--cache ")[1].split()[0])


def test_out_of_memory_in_the_prefetch_thread_then_replan(llama, monkeypatch):
    with offload.load(*llama, cache="50%", policy="pin", device="cpu", dtype=torch.float32, progress=False,
                      emulate_copies=True) as engine:
        ids = prompt_ids("cpu")
        expected = greedy(engine.model, ids)  # the order is recorded, the prefetch thread runs
        real = engine.fmt.materialize

        def fail(raw, entry):
            raise torch.OutOfMemoryError(OOM)
        monkeypatch.setattr(engine.fmt, "materialize", fail)
        with pytest.raises(OffloadError) as err:
            with engine.memory_errors():
                greedy(engine.model, ids)
        message = str(err.value)
        assert len(message.splitlines()) == 1 and "in the prefetch thread" in message
        budget = engine.cache.budget_bytes
        assert suggested(message) == max(budget - (2 << 20), max(engine.cache.sizes.values()))
        monkeypatch.setattr(engine.fmt, "materialize", real)
        engine.replan("50%", "pin")
        assert torch.equal(greedy(engine.model, ids), expected)


def test_out_of_memory_in_a_forward_pass(llama, monkeypatch):
    with offload.load(*llama, cache="full", device="cpu", dtype=torch.float32, progress=False) as engine:
        head = engine.model.get_output_embeddings()

        def fail(*args):
            raise torch.OutOfMemoryError(OOM)
        monkeypatch.setattr(head, "forward", fail)
        with pytest.raises(OffloadError, match="out of device memory in a forward pass with a cache of"):
            engine.generate("hello", max_new_tokens=2)


def test_other_errors_pass_through(llama):
    with offload.load(*llama, cache="full", device="cpu", dtype=torch.float32, progress=False) as engine:
        with pytest.raises(ValueError, match="unrelated"):
            with engine.memory_errors():
                raise ValueError("unrelated")


def test_auto_budget_reserves_activations_for_the_longest_prompt(llama, monkeypatch):
    from offload.cache import activation_bytes, kv_bytes_per_token
    free = 8 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    with offload.load(*llama, cache="full", device="cpu", dtype=torch.float32, progress=False) as engine:
        sizes = engine.cache.sizes
        budgets = {}
        for ctx in (64, 512):
            engine.ctx_size = ctx
            budgets[ctx] = engine._auto_budget(sizes, 0)
        config = engine.config
        per_token = (kv_bytes_per_token(config, torch.float32)
                     + (3 * config.intermediate_size + 4 * config.hidden_size) * 4)  # float32 activations
        assert budgets[64] - budgets[512] == (512 - 64) * per_token
        assert activation_bytes(config, 0, torch.float32) == 2 * 4 * config.vocab_size
