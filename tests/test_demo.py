"""`lav2 demo`: the tiny CLIP is pretrained contrastively on the demo's own image-caption pairs, deterministically."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from lav2 import checkpoint, demo
from lav2.errors import Lav2Error
from lav2.images import open_image

STEPS = 25  # enough to move the loss at this size, a few seconds on one thread


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return [demo.generate(root / name, seed=3, images=64, heldout=4, clip_steps=STEPS) for name in ("a", "b")]


def random_clip(seed: int) -> open_clip.CLIP:
    torch.manual_seed(seed)  # as write_demo builds it, before pretraining
    return open_clip.CLIP(**demo.clip_config(demo.CLIP))


def test_pretraining_moves_the_clip_and_lowers_the_contrastive_loss(made):
    folder = made[0]
    written = load_file(folder / "base" / checkpoint.CLIP_FILE)
    clip = random_clip(3)
    init = clip.visual.state_dict()
    assert written.keys() == init.keys()
    moved = [k for k in init if not torch.equal(written[k], init[k])]
    assert len(moved) > len(init) // 2 and not torch.equal(written["conv1.weight"], init["conv1.weight"])

    # the losses the demo records, before and after, over its pretraining pairs (as many as the steps see)
    info = json.loads((folder / "base" / checkpoint.CONFIG_FILE).read_text())["source"]["demo"]
    assert info["clip_steps"] == STEPS and info["clip_pairs"] == STEPS * demo.CLIP_BATCH
    before, after = info["clip_loss"]["before"], info["clip_loss"]["after"]
    assert after < before
    pixels, tokens = demo.clip_pairs(clip, seed=3, count=info["clip_pairs"])
    assert demo.clip_loss(clip, pixels, tokens) == pytest.approx(before, rel=1e-5)

    # the written vision tower with the random text tower is no longer the random pair: it scores differently
    clip.visual.load_state_dict(written)
    assert demo.clip_loss(clip, pixels, tokens) != pytest.approx(before, rel=1e-5)
    assert set(info["clip_zero_shot_heldout"]) == {"colour", "shape"}

    # the folder loads as a base with the pretrained tower, frozen, whose transform is the pretraining's
    visual, transform = checkpoint.load_clip(info_clip(folder), folder / "base", "cpu")
    assert not any(p.requires_grad for p in visual.parameters())
    assert torch.equal(visual.conv1.weight, written["conv1.weight"])
    image = open_image(folder / "data" / "images" / "0.png")
    assert torch.allclose(transform(image), demo.clip_pixels(clip, [image])[0])


def test_zero_shot_counts_the_nearest_caption_by_hand():
    """A CLIP whose text and image embeddings are set by hand: the nearest caption is known."""
    clip = random_clip(0)
    pairs = [(c, s) for c in demo.COLOURS for s in demo.SHAPES]
    records = [{"colour": "red", "shape": "star"}, {"colour": "blue", "shape": "circle"}]
    nearest = [pairs.index(("red", "star")), pairs.index(("green", "circle"))]  # colour wrong in the second
    clip.encode_text = lambda tokens, normalize: torch.eye(len(pairs))
    clip.encode_image = lambda pixels, normalize: torch.eye(len(pairs))[nearest]
    images = [open_image_of(0), open_image_of(1)]
    assert demo.zero_shot(clip, images, records) == {"colour": 0.5, "shape": 1.0}


def open_image_of(seed: int):
    import random

    return demo.draw(random.Random(seed), demo.IMAGE_SIZE)[0]


def info_clip(folder) -> dict:
    return json.loads((folder / "base" / checkpoint.CONFIG_FILE).read_text())["clip"]


def test_same_seed_writes_identical_clip(made):
    a, b = (m / "base" / checkpoint.CLIP_FILE for m in made)
    assert a.read_bytes() == b.read_bytes()


def test_caption_tokens_end_at_the_highest_id():
    text_cfg = demo.clip_config(demo.CLIP)["text_cfg"]
    tokens = demo.caption_tokens(["A red circle.", "An orange star."])
    assert tokens.shape == (2, text_cfg["context_length"])
    assert tokens.argmax(dim=1).tolist() == [4, 4] and int(tokens.max()) == text_cfg["vocab_size"] - 1
    assert tokens[0, 2] != tokens[1, 2] and tokens[0, 3] != tokens[1, 3]  # colour and shape have their own ids


def test_negative_clip_steps_is_refused(tmp_path):
    with pytest.raises(Lav2Error, match="clip_steps"):
        demo.generate(tmp_path / "d", images=4, heldout=1, clip_steps=-1)
