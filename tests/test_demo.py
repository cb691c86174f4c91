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


def training_pairs(folder, clip) -> tuple[torch.Tensor, torch.Tensor]:
    records = [json.loads(line) for line in (folder / "data" / "captions.jsonl").read_text().splitlines()]
    images = [open_image(folder / "data" / r["image"]) for r in records]
    tokens = demo.caption_tokens([r["caption"] for r in records], demo.clip_config(demo.CLIP)["text_cfg"])
    return demo.clip_pixels(clip, images), tokens


def test_pretraining_moves_the_clip_and_lowers_the_contrastive_loss(made):
    folder = made[0]
    written = load_file(folder / "base" / checkpoint.CLIP_FILE)
    clip = random_clip(3)
    init = clip.visual.state_dict()
    assert written.keys() == init.keys()
    moved = [k for k in init if not torch.equal(written[k], init[k])]
    assert len(moved) > len(init) // 2 and not torch.equal(written["conv1.weight"], init["conv1.weight"])

    # the losses the demo records, before and after, over the training pairs as saved
    info = json.loads((folder / "base" / checkpoint.CONFIG_FILE).read_text())["source"]["demo"]
    assert info["clip_steps"] == STEPS
    before, after = info["clip_loss"]["before"], info["clip_loss"]["after"]
    assert after < before
    pixels, tokens = training_pairs(folder, clip)
    assert demo.clip_loss(clip, pixels, tokens) == pytest.approx(before, rel=1e-5)

    # the written vision tower with the random text tower is no longer the random pair: it scores differently
    clip.visual.load_state_dict(written)
    assert demo.clip_loss(clip, pixels, tokens) != pytest.approx(before, rel=1e-5)

    # the folder loads as a base with the pretrained tower, frozen
    visual, transform = checkpoint.load_clip(info_clip(folder), folder / "base", "cpu")
    assert not any(p.requires_grad for p in visual.parameters())
    assert torch.equal(visual.conv1.weight, written["conv1.weight"])
    assert torch.allclose(transform(images_of(folder)[0]), pixels[0])


def info_clip(folder) -> dict:
    return json.loads((folder / "base" / checkpoint.CONFIG_FILE).read_text())["clip"]


def images_of(folder) -> list:
    return [open_image(folder / "data" / "images" / "0.png")]


def test_same_seed_writes_identical_clip(made):
    a, b = (m / "base" / checkpoint.CLIP_FILE for m in made)
    assert a.read_bytes() == b.read_bytes()


def test_caption_tokens_end_at_the_highest_id():
    text_cfg = demo.clip_config(demo.CLIP)["text_cfg"]
    tokens = demo.caption_tokens(["A red circle.", "An orange star."], text_cfg)
    assert tokens.shape == (2, text_cfg["context_length"])
    assert tokens.argmax(dim=1).tolist() == [4, 4] and int(tokens.max()) == text_cfg["vocab_size"] - 1
    assert tokens[0, 2] != tokens[1, 2] and tokens[0, 3] != tokens[1, 3]  # colour and shape have their own ids


def test_negative_clip_steps_is_refused(tmp_path):
    with pytest.raises(Lav2Error, match="clip_steps"):
        demo.generate(tmp_path / "d", images=4, heldout=1, clip_steps=-1)
