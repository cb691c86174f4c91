"""Sampling with the KV cache, streaming text, and conversations (lav2/generate.py)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import lav2
from safetensors.torch import load_file, save_file

from conftest import make_image

from lav2 import fastpath
from lav2.errors import Lav2Error
from lav2.fastpath import quantize_int8_
from lav2.images import open_image
from lav2.generate import Conversation, Sampling, TextStream, answer, generate, sample
from lav2.prompts import STOP_STRINGS, Turn, render_prompt

GREEDY = Sampling(temperature=0)


def make_lively_folder(src: Path, dst: Path) -> Path:
    """A copy of a tiny model folder whose outputs vary: the fixtures' base weights (std 0.02) give near-uniform
    logits and one repeated token; std 0.2 and open gates make every token, the prompts and the image count."""
    shutil.copytree(src, dst)
    for name, change in (("model.safetensors", lambda k, t: t * 10 if t.dim() == 2 else t),
                         ("adapter.safetensors", lambda k, t: torch.ones_like(t) if k.endswith(".gate") else t)):
        if (dst / name).exists():
            state = load_file(dst / name)
            save_file({k: change(k, t).contiguous() for k, t in state.items()}, dst / name)
    return dst


@pytest.fixture(scope="module")
def official(tiny_official, tmp_path_factory):
    folder = make_lively_folder(tiny_official[1], tmp_path_factory.mktemp("lively") / "official")
    return lav2.load(folder, "cpu", torch.float32)


@pytest.fixture(scope="module")
def base(tiny_base, tmp_path_factory):
    folder = make_lively_folder(tiny_base[1], tmp_path_factory.mktemp("lively") / "base")
    return lav2.load(folder, "cpu", torch.float32)


@pytest.fixture(scope="module")
def pixels(official, tmp_path_factory):
    path = make_image(tmp_path_factory.mktemp("img") / "red.png")
    return official.preprocess(open_image(path))[None]


def make_image_pil(colour=(200, 30, 30)):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (48, 48), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=colour)
    return image


def prompt_ids(loaded, text="What colour is the shape?"):
    return loaded.tokenizer.encode(render_prompt("alpaca", [Turn(text)]), bos=True)


@torch.no_grad()
def greedy_without_cache(model, ids, images, n):
    """The reference: re-run the whole sequence through model(tokens, images) for every new token."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]), images)[0, -1].argmax()))
    return ids[-n:]


def cached_greedy(model, ids, images, n, *, fast_prefill=False):
    """Greedy through the KV cache; the prompt prefilled in float32 unless fast_prefill (bfloat16 on this CPU)."""
    model.setup_cache(1)
    return list(generate(model, ids, images=images, max_new_tokens=n, temperature=0, fast_prefill=fast_prefill))


@pytest.mark.parametrize("with_image", [False, True])
def test_cached_decoding_equals_decoding_without_cache(official, pixels, with_image):
    images = pixels if with_image else None
    ids = prompt_ids(official)
    tokens = cached_greedy(official.model, ids, images, 50)
    assert tokens == greedy_without_cache(official.model, ids, images, 50)
    assert len(set(tokens)) > 10  # a model that says something, not one repeated token


def test_cached_decoding_equals_decoding_without_cache_text_only_model(base):
    ids = prompt_ids(base)
    assert cached_greedy(base.model, ids, None, 50) == greedy_without_cache(base.model, ids, None, 50)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_bfloat16_prefill_then_float32_decoding_gives_the_float32_greedy_tokens(official, pixels, with_image):
    model = official.model
    assert fastpath.prefill_dtype(model) == (torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None)
    images, ids = (pixels if with_image else None), prompt_ids(official)
    fast = cached_greedy(model, ids, images, 20, fast_prefill=True)
    assert fast == cached_greedy(model, ids, images, 20)
    assert len(set(fast)) > 5
    # int8 keeps its own prefill: its kernel already multiplies in bfloat16
    assert fastpath.prefill_dtype(quantize_int8_(copy.deepcopy(model))) is None


def test_compiled_decoding_answers_as_eager_decoding(official):
    # through torch.compile (compiled twice: at the first position, then with the position symbolic)
    question = "What colour is the shape?"
    eager, compiled = Conversation(official, GREEDY), Conversation(official, GREEDY, compile=True)
    for chat in (eager, compiled):
        chat.set_image(make_image_pil())
    answers = ["".join(chat.ask(question)) for chat in (eager, compiled)]
    assert answers[0] and answers[1] == answers[0]


def test_image_changes_the_answer(official, pixels):
    ids = prompt_ids(official)
    assert cached_greedy(official.model, ids, pixels, 20) != cached_greedy(official.model, ids, None, 20)


def test_decode_feeds_one_token_per_step_and_encodes_the_image_once(official, pixels):
    fed, clip_calls = [], []
    hooks = [official.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[1])),
             official.model.visual.register_forward_hook(lambda *_: clip_calls.append(1))]
    try:
        ids = prompt_ids(official)
        cached_greedy(official.model, ids, pixels, 30)
    finally:
        for hook in hooks:
            hook.remove()
    assert fed == [len(ids)] + [1] * 29
    assert len(clip_calls) == 1


def test_next_turn_prefills_only_its_new_tokens_and_answers_as_a_fresh_prefill(official):
    chat = Conversation(official, GREEDY)
    chat.set_image(make_image_pil())
    "".join(chat.ask("What colour is the shape?"))
    fed = []
    hook = official.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[1]))
    try:
        continued = "".join(chat.ask("And what shape is it?"))
    finally:
        hook.remove()
    full_prompt = len(chat._render([*chat.turns[:-1], Turn("And what shape is it?")]))
    assert fed[0] < full_prompt // 2  # the first turn's tokens stayed in the cache

    fresh = Conversation(official, GREEDY)
    fresh.set_image(make_image_pil())
    fresh.turns = list(chat.turns[:-1])
    assert "".join(fresh.ask("And what shape is it?")) == continued and continued


def test_history_is_trimmed_to_the_context_window_oldest_first(official):
    small = dataclasses.replace(official, config=dataclasses.replace(official.config, max_seq_len=256))
    chat = Conversation(small, Sampling(temperature=0, max_new_tokens=40))
    message = "A red circle. A blue square. " * 2  # about 60 tokens
    dropped = []
    for i in range(6):
        "".join(chat.ask(f"{i}: {message}"))
        dropped.append(chat.dropped)
        assert len(chat._cached) <= 256
    assert sum(dropped) > 0 and dropped[0] == 0
    assert chat.turns[-1].user.startswith("5:")
    assert not any(t.user.startswith("0:") for t in chat.turns)


def test_a_message_longer_than_the_context_is_a_clear_error(official):
    chat = Conversation(official, GREEDY)
    with pytest.raises(Lav2Error, match="too long"):
        "".join(chat.ask("A red circle. " * 2000))
    assert chat.turns == []


def test_greedy_is_argmax_and_top_k_1_or_tiny_top_p_is_greedy_at_any_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    g = torch.Generator().manual_seed(1)
    assert int(sample(logits, temperature=0)) == best
    assert all(int(sample(logits, temperature=5.0, top_k=1, generator=g)) == best for _ in range(20))
    assert all(int(sample(logits, temperature=5.0, top_p=1e-6, generator=g)) == best for _ in range(20))


def test_top_k_and_top_p_only_draw_from_the_head():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, temperature=1.0, top_k=2, top_p=1.0, generator=g)) for _ in range(200)} == {0, 1}
    # softmax: 0.64, 0.23, 0.09, ...: top-p 0.8 keeps the first two (the mass before token 2 is 0.87 > 0.8)
    assert {int(sample(logits, temperature=1.0, top_p=0.8, generator=g)) for _ in range(200)} == {0, 1}


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, 1.9, -1.0])
    seen = torch.tensor([True, False, False])
    assert int(sample(logits, temperature=0, seen=seen, repetition_penalty=1.0)) == 0
    assert int(sample(logits, temperature=0, seen=seen, repetition_penalty=1.3)) == 1


def test_a_seed_reproduces_sampling_without_touching_the_global_rng(official):
    state = torch.get_rng_state()
    settings = dict(temperature=1.0, top_p=0.95, max_new_tokens=30, seed=7)
    first, second = answer(official, "Hello", **settings), answer(official, "Hello", **settings)
    assert first == second
    assert answer(official, "Hello", **{**settings, "seed": 8}) != first
    answer(official, "Hello", **{**settings, "seed": None})
    assert torch.equal(torch.get_rng_state(), state)


def test_decoding_never_caches_with_gradients_and_leaves_the_grad_mode_alone(official):
    official.model.adapter_query.requires_grad_(True)  # as during training
    try:
        with torch.enable_grad():
            official.model.setup_cache(1)
            tokens = generate(official.model, prompt_ids(official), max_new_tokens=5, temperature=0)
            for _ in tokens:
                assert torch.is_grad_enabled()  # no_grad is scoped to each model call, not the generator
        cache = official.model.layers[-1].attention.kv_cache
        assert cache.prompt_kv is not None and not cache.prompt_kv[0].requires_grad
    finally:
        official.model.adapter_query.requires_grad_(False)


def test_answer_streams_the_same_text_and_takes_a_path_or_a_pil_image(official, tmp_path):
    path = make_image(tmp_path / "red.png")
    text = answer(official, "What colour is the shape?", image=path, temperature=0, max_new_tokens=30)
    pieces = list(answer(official, "What colour is the shape?", image=path, stream=True, temperature=0,
                         max_new_tokens=30))
    assert "".join(pieces) == text and text
    assert official.generate("What colour is the shape?", image=make_image_pil(), temperature=0,
                             max_new_tokens=30) == text


def test_stream_renders_spaces_and_multibyte_characters_without_replacement_marks(base):
    tok = base.tokenizer
    text = "Hi € café 日本 ok"
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in tok.encode(text, bos=False)] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streams, not one piece at the end


def test_stream_stops_at_a_stop_string_and_never_shows_part_of_it(base):
    tok = base.tokenizer
    stream = TextStream(tok, STOP_STRINGS["alpaca"])
    pieces = []
    for i in tok.encode("Red.\n\n### Instruction:\nWhat else?", bos=False):
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    assert stream.stopped and "".join(pieces) == "Red."
    assert not any("#" in p for p in pieces)


def test_bad_sampling_settings_are_one_clear_error():
    with pytest.raises(Lav2Error, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(Lav2Error, match="top-p"):
        Sampling(top_p=0)


def test_bad_images_are_clear_errors(tmp_path, base):
    with pytest.raises(Lav2Error, match="no such image file"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(Lav2Error, match="not an image"):
        open_image(tmp_path / "notes.txt")
    good = make_image(tmp_path / "good.png", size=200)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:300])
    with pytest.raises(Lav2Error, match="corrupt or truncated"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(Lav2Error, match="text-only model"):
        Conversation(base).set_image(good)
