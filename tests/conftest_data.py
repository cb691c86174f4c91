"""Fixtures for the data tests: a tokenizer that knows the templates and the example files, a tiny transform.

Registered by tests/conftest.py (pytest_plugins) or imported by the test modules that use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lav2 import prompts
from lav2.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "recipes" / "examples"


@pytest.fixture(scope="session")
def data_tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [prompts.ALPACA_WITH_INPUT, prompts.ALPACA_NO_INPUT, prompts.CHAT_SYSTEM, prompts.CHAT_TURN]
    texts += [line for f in sorted(EXAMPLES.glob("*.json*")) for line in f.read_text().splitlines()]
    return train_tokenizer(texts * 5, tmp_path_factory.mktemp("data_tok") / "tokenizer.model", vocab_size=400)


def _to_tensor(image: Image.Image, size: int = 32) -> torch.Tensor:
    """A stand-in for open_clip's transform: resize, then (3, H, W) floats in 0..1."""
    image = image.resize((size, size))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1) / 255


@pytest.fixture(scope="session")
def preprocess():
    return _to_tensor
