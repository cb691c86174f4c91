"""Every prompt template in one place: the official Alpaca template, the caption instruction, our chat template.

A conversation is a list of `Turn`s. `render_prompt` gives the text the model continues at inference;
`training_segments` gives the same conversation as (text, supervised) pieces for label masking. Both render
through `_pieces`, so what the model sees in training and at inference is the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

# Exactly as the official LLaMA-Adapter release (llama_adapter_v2_multimodal7b/llama/utils.py, format_prompt).
# Training there concatenates prompt + answer with nothing in between.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# Later turns of a multi-turn Alpaca conversation: one more Instruction/Response block after the last answer.
ALPACA_NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:"

# The official PretrainDataset (llama_adapter_v2_multimodal7b/data/dataset.py) captions with this instruction,
# no final period, inside the no-input Alpaca template.
CAPTION_INSTRUCTION = "Generate caption of this image"

# Our own multi-turn template for fine-tunes made with lav2 (not used by any official checkpoint).
CHAT_SYSTEM = (
    "A chat between a curious user and a helpful assistant. "
    "The assistant gives helpful, detailed and polite answers, and describes images when one is shown."
)
CHAT_TURN = "\n\nUSER: {user}\nASSISTANT:"

STYLES = ("alpaca", "chat")

# Generation stops when the model starts writing the next turn's header.
STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "alpaca": ("### Instruction:", "### Input:", "### Response:"),
    "chat": ("USER:", "ASSISTANT:"),
}


@dataclass
class Turn:
    """One exchange. `input` is Alpaca's optional context field; the chat style appends it to the user text."""

    user: str
    assistant: str | None = None
    input: str | None = None


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The official single-turn prompt; an empty input counts as none (as in Stanford Alpaca's own code)."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _user_text(style: str, turn: Turn, first: bool) -> str:
    if style == "alpaca":
        if first:
            return alpaca_prompt(turn.user, turn.input)
        user = f"{turn.user}\n\n{turn.input}" if turn.input else turn.user
        return ALPACA_NEXT_TURN.format(instruction=user)
    user = f"{turn.user}\n\n{turn.input}" if turn.input else turn.user
    return (CHAT_SYSTEM if first else "") + CHAT_TURN.format(user=user)


def _pieces(style: str, turns: list[Turn]) -> list[tuple[str, bool]]:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    pieces: list[tuple[str, bool]] = []
    for i, turn in enumerate(turns):
        pieces.append((_user_text(style, turn, first=i == 0), False))
        if turn.assistant is not None:
            pieces.append((turn.assistant, True))
        elif i != len(turns) - 1:
            raise ValueError(f"turn {i} has no assistant answer but is not the last turn")
    return pieces


def render_prompt(style: str, turns: list[Turn]) -> str:
    """The text up to where the model writes the last turn's answer (that turn's `assistant` must be None)."""
    if turns and turns[-1].assistant is not None:
        raise ValueError("render_prompt: the last turn must have assistant=None (it is what the model writes)")
    return "".join(text for text, _ in _pieces(style, turns))


def training_segments(style: str, turns: list[Turn]) -> list[tuple[str, bool]]:
    """The conversation as (text, supervised) pieces: every assistant answer is supervised, the rest is not.

    Concatenating the texts gives the full training text. A final turn with assistant=None ends the list with
    its unsupervised prompt, which is how the same segments encode an inference prompt.
    """
    return _pieces(style, turns)
