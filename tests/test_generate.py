"""engine.generate with chats and streams, against the plain HF model (tiny.reference_model) and the
tokenizer's own chat template."""
import threading
import time

import pytest
import torch

import offload
from offload.errors import OffloadError

import tiny

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
NEW = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir, weights_dir = tiny.make("llama", tmp_path_factory.mktemp("models"))
    with offload.load(model_dir, weights_dir, dtype=torch.float32, progress=False) as engine:
        yield engine, tiny.reference_model(model_dir)


def reference_ids(ref, ids, new=NEW):
    """Greedy new token ids of the plain HF model for prompt ids [1, T]."""
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=257)
    return out[0, ids.shape[1]:].tolist()


def test_chat_with_system_turn_matches_the_template_and_the_hf_model(setup):
    engine, ref = setup
    tok = engine.tokenizer
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    expected = tok.decode(reference_ids(ref, ids), skip_special_tokens=True)
    assert expected.strip(), "degenerate reference"
    assert engine.generate(CHAT, max_new_tokens=NEW, min_new_tokens=NEW) == expected
    templated = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert engine.generate(templated, max_new_tokens=NEW, min_new_tokens=NEW) == expected


def test_list_of_chats_is_a_batch_and_chat_flag_wraps_strings(setup):
    engine, _ = setup
    chats = [CHAT, [{"role": "user", "content": "hello there, how are you"}]]
    single = [engine.generate(c, max_new_tokens=12, min_new_tokens=12) for c in chats]
    assert engine.generate(chats, max_new_tokens=12, min_new_tokens=12) == single
    text = "hello there, how are you"
    assert engine.generate(text, chat=True, max_new_tokens=12, min_new_tokens=12) == single[1]
    assert engine.generate([text], chat=True, max_new_tokens=12, min_new_tokens=12) == [single[1]]


def test_stream_joins_to_the_text_and_counts_tokens(setup):
    engine, ref = setup
    tok = engine.tokenizer
    prompt = "The quick brown fox"
    expected_ids = reference_ids(ref, tok(prompt, return_tensors="pt")["input_ids"], 40)
    with engine.generate(prompt, max_new_tokens=40, min_new_tokens=40, stream=True) as stream:
        pieces = list(stream)
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == engine.generate(prompt, max_new_tokens=40, min_new_tokens=40)
    assert stream.output_ids == expected_ids
    assert stream.prompt_tokens == len(tok(prompt)["input_ids"])
    with engine.generate(CHAT, max_new_tokens=NEW, min_new_tokens=NEW, stream=True) as stream:
        assert "".join(stream) == engine.generate(CHAT, max_new_tokens=NEW, min_new_tokens=NEW)


def test_stop_strings_work_without_passing_the_tokenizer(setup):
    engine, _ = setup
    full = engine.generate("The quick brown fox", max_new_tokens=60, min_new_tokens=60)
    # an ASCII letter some way in: the byte-level tokenizer stops right after it
    stop = next(c for c in full[3:] if c.isascii() and c.isalnum())
    got = engine.generate("The quick brown fox", max_new_tokens=60, stop_strings=[stop])
    assert got == full[:full.index(stop) + 1]


def test_stream_holds_the_lock_and_stops_early(setup):
    engine, _ = setup
    stream = engine.generate("The quick brown fox", max_new_tokens=400, min_new_tokens=400, stream=True)
    deadline = time.time() + 30
    while not engine._generate_lock.locked() and time.time() < deadline:
        time.sleep(0.001)
    assert engine._generate_lock.locked()
    other = []
    thread = threading.Thread(target=lambda: other.append(engine.generate("x", max_new_tokens=2)))
    thread.start()
    stream.close()  # the consumer leaves: the generation ends at its next token
    assert stream.stopped and len(stream.output_ids) < 400
    thread.join(30)
    assert other and isinstance(other[0], str)  # the lock was released
    assert not engine._generate_lock.locked()


def test_stream_raises_the_generation_error_to_the_consumer(setup):
    engine, _ = setup
    stream = engine.generate("hello", max_new_tokens=4, stream=True, num_beams=2)  # HF: no streamer with beams
    with pytest.raises(ValueError, match="beam"):
        list(stream)
    assert engine.generate("hello", max_new_tokens=2) is not None  # the engine goes on


@pytest.mark.parametrize("prompts, match", [
    (["a", "b"], "stream=True takes one prompt"),
])
def test_stream_refuses_a_batch(setup, prompts, match):
    engine, _ = setup
    with pytest.raises(OffloadError, match=match):
        engine.generate(prompts, stream=True)


@pytest.mark.parametrize("prompts, match", [
    ([CHAT, "plain"], "mixes chats and plain prompts"),
    ([{"content": "no role"}], "a chat is a non-empty list"),
    ([], "no prompt"),
])
def test_bad_prompts_are_refused(setup, prompts, match):
    engine, _ = setup
    with pytest.raises(OffloadError, match=match):
        engine.generate(prompts)
