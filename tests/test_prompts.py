"""The templates: the official Alpaca strings verbatim, multi-turn rendering, and segments that add up."""

from __future__ import annotations

import pytest

from lav2.prompts import (CAPTION_INSTRUCTION, STOP_STRINGS, STYLES, Turn, alpaca_prompt, render_prompt,
                          training_segments)

OFFICIAL_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:")
OFFICIAL_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "Translate.\n\n### Input:\nLe chat.\n\n### Response:")


def test_alpaca_prompt_is_the_official_string():
    assert alpaca_prompt("Name a colour.") == OFFICIAL_NO_INPUT
    assert alpaca_prompt("Translate.", "Le chat.") == OFFICIAL_INPUT
    assert alpaca_prompt("Name a colour.", "") == OFFICIAL_NO_INPUT  # Alpaca's empty input means none


def test_caption_instruction_matches_the_official_pretrain_data():
    assert CAPTION_INSTRUCTION == "Generate caption of this image"


def test_single_turn_training_text_is_prompt_plus_answer_as_officially_trained():
    segments = training_segments("alpaca", [Turn("Name a colour.", "Red.")])
    assert segments == [(OFFICIAL_NO_INPUT, False), ("Red.", True)]
    assert render_prompt("alpaca", [Turn("Name a colour.")]) == OFFICIAL_NO_INPUT


@pytest.mark.parametrize("style", STYLES)
def test_every_assistant_turn_is_supervised_and_segments_concatenate_to_the_prompt(style):
    turns = [Turn("Hi.", "Hello."), Turn("Colour?", "Red."), Turn("Shape?", "Round.")]
    segments = training_segments(style, turns)
    assert [text for text, sup in segments if sup] == ["Hello.", "Red.", "Round."]
    prompt = render_prompt(style, turns[:2] + [Turn("Shape?")])
    assert "".join(text for text, _ in segments) == prompt + "Round."


def test_alpaca_multi_turn_renders_successive_instruction_response_blocks():
    prompt = render_prompt("alpaca", [Turn("Colour?", "Red."), Turn("Shape?")])
    assert prompt == OFFICIAL_NO_INPUT.replace("Name a colour.", "Colour?") + \
        "Red.\n\n### Instruction:\nShape?\n\n### Response:"


def test_chat_style_puts_the_input_after_the_user_text():
    prompt = render_prompt("chat", [Turn("Translate.", input="Le chat.")])
    assert prompt.endswith("USER: Translate.\n\nLe chat.\nASSISTANT:")


@pytest.mark.parametrize("style", STYLES)
def test_stop_strings_are_the_next_turn_headers(style):
    after = render_prompt(style, [Turn("a", "b"), Turn("c")])[len(render_prompt(style, [Turn("a")])) + 1:]
    assert any(stop in after for stop in STOP_STRINGS[style])


def test_render_prompt_refuses_a_finished_last_turn():
    with pytest.raises(ValueError):
        render_prompt("alpaca", [Turn("a", "b")])
    with pytest.raises(ValueError):
        training_segments("nope", [Turn("a", "b")])
